"""Selective copying: find the few content tokens scattered among blanks and write them out in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
    import torch

from .base import IGNORE_INDEX, Task, check, sample_distinct

BLANK, SEPARATOR = 0, 1


@dataclass
class SelectiveCopy(Task):
    """Selective copying (MAD): after a separator, reproduce in order the tokens scattered among blanks.

    Layout: ``seq_len - num_tokens_to_copy`` positions of blanks (token 0) with ``num_tokens_to_copy``
    content tokens from ``[2, vocab_size)`` at random places, the separator (token 1), then the content
    tokens in order, read one at a time (teacher forcing): the target at the separator is the first content
    token, the target at each copied token the next one.

    Metric: accuracy over the ``num_tokens_to_copy`` copy positions. Defaults: MAD's baseline (vocabulary 16,
    16 tokens to copy) with the sequence shortened from 256 to 128 so that a CPU trains it in minutes.
    """

    name = "selective_copy"

    vocab_size: int = 16
    seq_len: int = 128
    num_tokens_to_copy: int = 16

    def __post_init__(self) -> None:
        check(self.vocab_size >= 3, "vocab_size", f"expected at least 3 (blank, separator, content), got {self.vocab_size}")
        check(self.num_tokens_to_copy >= 1, "num_tokens_to_copy", f"expected at least 1, got {self.num_tokens_to_copy}")
        check(self.seq_len >= 2 * self.num_tokens_to_copy, "num_tokens_to_copy",
              f"{self.num_tokens_to_copy} tokens to scatter and copy need seq_len >= {2 * self.num_tokens_to_copy}, "
              f"got seq_len {self.seq_len}")

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        count = self.num_tokens_to_copy
        scatter_length = self.seq_len - count
        content = torch.randint(2, self.vocab_size, (batch_size, count), generator=generator)
        places = sample_distinct(batch_size, count, 0, scatter_length, generator).sort(dim=1).values
        scattered = torch.full((batch_size, scatter_length), BLANK).scatter_(1, places, content)
        separator = torch.full((batch_size, 1), SEPARATOR)
        # The last content token is only a target, never an input.
        inputs = torch.cat([scattered, separator, content[:, :-1]], dim=1)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, scatter_length:] = content
        return inputs, targets
