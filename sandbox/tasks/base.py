"""What every task shares: the ``Task`` base class, the split-aware generator, the accuracy metric.

A task is a dataclass whose fields are its parameters. ``batch`` returns ``inputs, targets``, two
LongTensors ``[batch, seq_len]`` on the CPU; ``targets`` holds the token the model should predict at each
input position, or ``IGNORE_INDEX`` (-100, PyTorch's ``cross_entropy`` default) where nothing is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
    import torch

IGNORE_INDEX = -100
SPLITS = ("train", "valid", "test")

# Every possible example belongs to exactly one split, by a hash of its input tokens: buckets 0-7 of 10 are
# train, 8 valid, 9 test. So no valid or test example is ever trained on, whatever the seeds (tasks with a
# finite data set, like text, split their data by range instead and set ``splits_by_data_range``).
HASH_BUCKETS = 10
SPLIT_BUCKETS = {"train": (0, 8), "valid": (8, 9), "test": (9, 10)}   # [low, high) of the buckets
HASH_SEED = 0x5EED
MIX = 6364136223846793005   # an odd 64-bit multiplier (Knuth's MMIX LCG) that spreads the sums' bits
MAX_DRAWS = 64              # oversampling rounds before a split is declared (nearly) empty


def check(condition: bool, param: str, expected: str) -> None:
    """Raise the ValueError that names the offending parameter (the CLI prints it as one line)."""
    if not condition:
        raise ValueError(f"task_arg '{param}': {expected}")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")


def split_generator(seed: int, split: str, index: int = 0) -> torch.Generator:
    """The CPU generator of block ``index`` of ``split``'s stream for run seed ``seed``.

    Each (seed, split, index) gets its own seed, hashed, so the three splits draw from distinct seed domains
    and block ``index`` of a stream can be regenerated on its own (a resumed run restarts mid-stream).
    """
    import torch
    check_split(split)
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def split_of_examples(inputs: torch.Tensor) -> torch.Tensor:
    """The bucket in ``[0, HASH_BUCKETS)`` of each row of ``inputs`` ``[N, T]``: a fixed hash of its tokens."""
    import torch
    weights = torch.randint(1, 2**31, (inputs.shape[1],), generator=torch.Generator().manual_seed(HASH_SEED))
    mixed = (inputs * weights).sum(dim=1) * MIX   # int64 arithmetic wraps around: a hash, not a sum
    return torch.remainder(mixed >> 24, HASH_BUCKETS)


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of scored positions (targets != -100) where the arg-max of the logits is the target."""
    check_logits(logits, targets)
    targets = targets.to(logits.device)
    scored = targets != IGNORE_INDEX
    predictions = logits.argmax(dim=-1)
    return (predictions[scored] == targets[scored]).float().mean().item()


def check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits: expected shape {list(targets.shape)} + [vocab], got {list(logits.shape)}")
    if not (targets != IGNORE_INDEX).any():
        raise ValueError("targets: no scored position (all are -100)")


def sample_distinct(batch_size: int, count: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct integers from ``[low, high)`` per row, uniformly: LongTensor ``[batch_size, count]``."""
    import torch
    space = high - low
    if space <= 4096 or 2 * count * count > space:
        # Small range: the ``count`` highest of ``space`` random scores are a uniform draw without replacement.
        return torch.rand(batch_size, space, generator=generator).topk(count, dim=1).indices + low
    # Large range: repeats are rare (probability < 1/2 per row), so redraw the rows that have one.
    samples = torch.randint(low, high, (batch_size, count), generator=generator)
    while True:
        ordered = samples.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not repeated.any():
            return samples
        samples[repeated] = torch.randint(low, high, (int(repeated.sum()), count), generator=generator)


@dataclass
class Task(ABC):
    """Base class. Subclasses are dataclasses whose fields are their parameters; each has a ``seq_len`` and a
    ``vocab_size`` (the number of token ids the model must embed and predict), and implements ``generate``."""

    name: ClassVar[str]
    metric_name: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    splits_by_data_range: ClassVar[bool] = False   # True: ``generate`` keeps the splits apart itself

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` examples of ``split``: ``inputs, targets`` LongTensors ``[batch_size, seq_len]`` on the
        CPU, deterministic given ``generator`` (see ``split_generator``).

        Examples are drawn, and those whose hash puts them in another split are dropped (so about 80% of the
        draws are kept for train, 10% for valid and test); tasks with ``splits_by_data_range`` draw directly.
        """
        import torch
        check_split(split)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if self.splits_by_data_range:
            return self.generate(batch_size, generator, split)
        low, high = SPLIT_BUCKETS[split]
        draw = batch_size * HASH_BUCKETS // (high - low) + 16
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = 0
        for _ in range(MAX_DRAWS):
            inputs, targets = self.generate(draw, generator, split)
            bucket = split_of_examples(inputs)
            keep = (bucket >= low) & (bucket < high)
            kept.append((inputs[keep], targets[keep]))
            count += int(keep.sum())
            if count >= batch_size:
                inputs, targets = (torch.cat(parts)[:batch_size] for parts in zip(*kept))
                return inputs, targets
        raise ValueError(f"task {self.name}: the {split} split is (nearly) empty: too few distinct examples "
                         f"with these parameters to hold out disjoint valid and test examples")

    @abstractmethod
    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from a generator already specific to ``split`` (most tasks ignore ``split`` itself)."""

    def metric(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy(logits, targets)

    def params(self) -> dict[str, Any]:
        """The parameters (the dataclass fields a user can set), resolved."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
