"""State tracking: the answer at each position depends on the whole prefix, folded through a group.

Parity (the group Z2) and permutation composition (S3, S5) are where the sign of the transition eigenvalues
matters: delta rules whose ``beta`` may exceed 1 can flip the state and track parity; gates in (0, 1) cannot.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
    import torch

from .base import IGNORE_INDEX, Task, check

GROUP_DEGREES = {"S3": 3, "S5": 5}


def keep_last_target(targets: torch.Tensor) -> torch.Tensor:
    """Only the answer after the whole sequence is scored."""
    targets[:, :-1] = IGNORE_INDEX
    return targets


@dataclass
class Parity(Task):
    """Parity: after each bit of a random bit stream, output the parity of all the bits so far.

    Inputs are bits (tokens 0 and 1); the target at position t is ``(x_0 + ... + x_t) mod 2``, at every
    position, or only at the last one with ``score_every_position=false``.

    Metric: accuracy over the scored positions (0.5 is chance).
    """

    name = "parity"

    seq_len: int = 64
    score_every_position: bool = True
    vocab_size: int = field(default=2, init=False)

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        bits = torch.randint(0, 2, (batch_size, self.seq_len), generator=generator)
        targets = bits.cumsum(dim=1) % 2
        return bits, targets if self.score_every_position else keep_last_target(targets)


@dataclass
class Permutation(Task):
    """Permutation composition (S3 or S5): after each permutation, output the composition of all so far.

    Tokens are the ``n!`` permutations of ``n`` items in lexicographic order (token 0 is the identity).
    The target at position t is the permutation obtained by applying ``x_0``, then ``x_1``, ..., then ``x_t``.
    S3 is solvable (a product of cyclic groups); S5 is not, the hardest case for models whose state updates
    are diagonal or nearly so. Scored at every position, or only at the last with ``score_every_position=false``.

    Metric: accuracy over the scored positions (chance is 1/6 for S3, 1/120 for S5).
    """

    name = "permutation"

    group: str = "S3"
    seq_len: int = 32
    score_every_position: bool = True
    vocab_size: int = field(init=False)
    composition: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch
        check(self.group in GROUP_DEGREES, "group", f"expected one of {', '.join(GROUP_DEGREES)}, got {self.group!r}")
        degree = GROUP_DEGREES[self.group]
        self.vocab_size = math.factorial(degree)
        permutations = list(itertools.permutations(range(degree)))
        index = {p: i for i, p in enumerate(permutations)}
        # composition[a, b]: applying permutation a, then b, to the sequence 0..n-1.
        self.composition = torch.tensor([[index[tuple(a[j] for j in b)] for b in permutations] for a in permutations])

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        elements = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=generator)
        # Prefix products by a Hillis-Steele scan: log2(seq_len) steps instead of one per position.
        prefix = elements.clone()
        step = 1
        while step < self.seq_len:
            prefix[:, step:] = self.composition[prefix[:, :-step], prefix[:, step:]]
            step *= 2
        return elements, prefix if self.score_every_position else keep_last_target(prefix)
