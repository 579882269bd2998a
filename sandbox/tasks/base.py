"""What every task shares: the ``Task`` base class, the split-aware generator, the accuracy metric.

A task is a dataclass whose fields are its parameters. ``batch`` returns ``inputs, targets``, two
LongTensors ``[batch, seq_len]`` on the CPU; ``targets`` holds the token the model should predict at each
input position, or ``IGNORE_INDEX`` (-100, PyTorch's ``cross_entropy`` default) where nothing is scored.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

IGNORE_INDEX = -100
SPLITS = ("train", "eval")


def check(condition: bool, param: str, expected: str) -> None:
    """Raise the ValueError that names the offending parameter (the CLI prints it as one line)."""
    if not condition:
        raise ValueError(f"task_arg '{param}': {expected}")


def split_generator(generator: torch.Generator, split: str) -> torch.Generator:
    """A fresh generator for one batch of one split, seeded from ``generator``.

    Train batches get even seeds and eval batches odd ones, so the two splits never share a random stream,
    whatever the caller's seeds are (examples can still coincide by chance when a task has few possible ones).
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(2 * seed + SPLITS.index(split))


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

    def batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """``inputs, targets``: LongTensors ``[batch_size, seq_len]``, deterministic given ``generator``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        inputs, targets = self.generate(batch_size, split_generator(generator, split), split)
        return inputs, targets

    @abstractmethod
    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from a generator already specific to ``split`` (most tasks ignore ``split`` itself)."""

    def metric(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        return accuracy(logits, targets)

    def params(self) -> dict[str, Any]:
        """The parameters (the dataclass fields a user can set), resolved."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
