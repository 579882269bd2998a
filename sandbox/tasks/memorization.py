"""Memorization: a fixed key-to-value map that can only live in the weights, not in the context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
    import torch

from .base import IGNORE_INDEX, Task, check


@dataclass
class Memorization(Task):
    """Memorization (MAD): predict each key's value under one fixed map, the same for every sequence.

    Sequences are ``k1 v1 k2 v2 ...`` with keys drawn uniformly from ``[0, vocab_size/2)``; each value is
    ``map[key]`` from ``[vocab_size/2, vocab_size)``, where the map is drawn once from ``map_seed``. The
    context never tells the answer of a new key, so the map must be learned in the weights; train and eval
    share the map and differ in the keys drawn.

    Metric: accuracy over the key positions (the target at a key is its value). Defaults: MAD's baseline
    (vocabulary 256, i.e. 128 keys to memorize, sequence 32).
    """

    name = "memorization"

    vocab_size: int = 256
    seq_len: int = 32
    map_seed: int = 0
    value_of_key: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch
        check(self.vocab_size >= 4, "vocab_size", f"expected at least 4, got {self.vocab_size}")
        check(self.seq_len >= 2, "seq_len", f"expected at least 2 (one key and its value), got {self.seq_len}")
        half = self.vocab_size // 2
        map_generator = torch.Generator().manual_seed(self.map_seed)
        self.value_of_key = torch.randint(half, self.vocab_size, (half,), generator=map_generator)

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        pairs = -(-self.seq_len // 2)
        keys = torch.randint(0, self.vocab_size // 2, (batch_size, pairs), generator=generator)
        values = self.value_of_key[keys]
        inputs = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * pairs)[:, :self.seq_len]
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, 0::2] = values  # ceil(seq_len / 2) key positions, one per pair
        return inputs, targets
