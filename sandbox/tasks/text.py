"""Character-level language modelling on a text file, by default the English prose shipped with CPython."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
    import torch

from .base import IGNORE_INDEX, Task, check, check_logits

BUILTIN_TEXT = "pydoc_data.topics"
HELD_OUT_FRACTION = 0.1   # of the text for valid, and as much again for test


def read_text(data: str) -> str:
    """The text of file ``data``, or of CPython's help topics (about 465k characters) for ``pydoc_data.topics``."""
    if data == BUILTIN_TEXT:
        try:
            from pydoc_data.topics import topics
        except ImportError as error:
            raise ValueError(f"task_arg 'data': this Python has no {BUILTIN_TEXT} ({error}); pass a text file") from None
        return "\n\n".join(topics[name] for name in sorted(topics))
    try:
        return Path(data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"task_arg 'data': expected a readable UTF-8 text file, got {data!r} ({error})") from None


@dataclass
class Text(Task):
    """Character-level language modelling on a text file (default: the English prose that ships with CPython).

    ``data`` is the path of a UTF-8 text file, or ``pydoc_data.topics`` for CPython's help topics. The vocabulary is the set of characters of the whole text, in code-point order (token i is
    ``characters[i]``). The text is cut into three disjoint ranges: the first 80% for ``split="train"``, the
    next 10% for ``"valid"``, the last 10% for ``"test"``; windows never cross a range's end. Each example is a random window of ``seq_len + 1`` characters; the
    targets are the next characters at every position.

    Metric: bits per character, the mean next-character cross-entropy in nats divided by ln 2 (lower is
    better; 0 means certain and right, log2(vocab_size) is a uniform guess).
    """

    name = "text"
    metric_name = "bits_per_char"
    higher_is_better = False

    data: str = BUILTIN_TEXT
    seq_len: int = 128
    vocab_size: int = field(init=False)
    characters: str = field(init=False, repr=False)
    split_ids: dict[str, torch.Tensor] = field(init=False, repr=False)
    splits_by_data_range = True

    def __post_init__(self) -> None:
        import torch
        text = read_text(self.data)
        check(len(text) > 0, "data", f"expected a non-empty text, got an empty file {self.data!r}")
        # Code points as int32 (UTF-32), then unique(sorted) gives the vocabulary and the ids in one pass.
        code_points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32)
        vocabulary, ids = torch.unique(code_points, sorted=True, return_inverse=True)
        self.characters = "".join(map(chr, vocabulary.tolist()))
        self.vocab_size = len(self.characters)
        valid_at = round(len(ids) * (1 - 2 * HELD_OUT_FRACTION))
        test_at = round(len(ids) * (1 - HELD_OUT_FRACTION))
        self.split_ids = {"train": ids[:valid_at], "valid": ids[valid_at:test_at], "test": ids[test_at:]}
        shortest = min(len(ids) for ids in self.split_ids.values())
        check(shortest > self.seq_len, "seq_len",
              f"the shortest split (10%) of {self.data!r} has {shortest} characters, "
              f"expected seq_len < {shortest}, got {self.seq_len}")

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        ids = self.split_ids[split]
        starts = torch.randint(0, len(ids) - self.seq_len, (batch_size, 1), generator=generator)
        windows = ids[starts + torch.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def metric(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """Bits per character over the scored positions."""
        import torch.nn.functional as F
        check_logits(logits, targets)
        nats = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten().to(logits.device), ignore_index=IGNORE_INDEX)
        return nats.item() / math.log(2)
