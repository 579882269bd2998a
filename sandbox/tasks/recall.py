"""Associative recall: the model reads key-value pairs and must answer with the value when a key comes back.

All three tasks here score only the positions where a value must be recalled; the metric is accuracy there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import IGNORE_INDEX, Task, check, sample_distinct


@dataclass
class MQAR(Task):
    """Multi-query associative recall (Zoology): recall the value of each key queried after the key-value pairs.

    Layout, as in Zoology: ``k1 v1 k2 v2 ... kn vn`` then a query region where each key appears once more,
    followed by its value; every other position of the query region holds a random token. Keys are distinct,
    drawn from ``[1, vocab_size/2)``, values from ``[vocab_size/2, vocab_size)``. A key's slot in the query
    region is drawn with probability proportional to ``gap ** (power_a - 1)`` (``power_a = 0.01``: short
    gaps favoured, long ones still present). The target at a query key is its value (-100 elsewhere).

    Metric: accuracy over the query positions.

    Defaults: Zoology uses ``vocab_size 8192, seq_len 64, num_kv_pairs 8``; a vocabulary of 8192 makes the
    embedding and output layers dominate a tiny model and slows training on a CPU for no gain in what the
    task measures (recall through the state), so the default here is ``vocab_size 64`` (31 possible keys)
    with Zoology's smallest sweep point ``seq_len 64, num_kv_pairs 4``, which a 2-layer model with a short
    convolution learns in minutes on a CPU. Pass ``vocab_size=8192 num_kv_pairs=8`` for Zoology's setting.
    """

    name = "mqar"

    vocab_size: int = 64
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01

    def __post_init__(self) -> None:
        check(self.vocab_size >= 4, "vocab_size", f"expected at least 4, got {self.vocab_size}")
        check(self.num_kv_pairs >= 1, "num_kv_pairs", f"expected at least 1, got {self.num_kv_pairs}")
        check(self.num_kv_pairs <= self.vocab_size // 2 - 1, "num_kv_pairs",
              f"{self.num_kv_pairs} distinct keys need vocab_size >= {2 * self.num_kv_pairs + 2}, "
              f"got vocab_size {self.vocab_size}")
        check(self.seq_len >= 4 * self.num_kv_pairs, "num_kv_pairs",
              f"{self.num_kv_pairs} pairs and their queries need seq_len >= {4 * self.num_kv_pairs}, "
              f"got seq_len {self.seq_len}")
        check(self.power_a > 0, "power_a", f"expected a positive number, got {self.power_a}")

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, half = self.num_kv_pairs, self.vocab_size // 2
        keys = sample_distinct(batch_size, pairs, 1, half, generator)
        values = torch.randint(half, self.vocab_size, (batch_size, pairs), generator=generator)
        context = torch.stack([keys, values], dim=2).reshape(batch_size, 2 * pairs)

        # The query region is cut into two-token slots; each key takes one slot, its value right after it.
        query_len = self.seq_len - 2 * pairs
        slots = query_len // 2
        gap = torch.arange(1, slots + 1, dtype=torch.float64)
        slot_weights = (self.power_a * gap ** (self.power_a - 1)).expand(batch_size, slots)
        key_slots = torch.multinomial(slot_weights, pairs, replacement=False, generator=generator)

        # One token more than seq_len: inputs are tokens [0, T), the next-token answers come from [1, T].
        queries = torch.randint(0, self.vocab_size, (batch_size, query_len + 1), generator=generator)
        queries.scatter_(1, 2 * key_slots, keys)
        queries.scatter_(1, 2 * key_slots + 1, values)
        inputs = torch.cat([context, queries[:, :-1]], dim=1)

        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets.scatter_(1, 2 * pairs + 2 * key_slots, values)
        return inputs, targets
