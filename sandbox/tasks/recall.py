"""Associative recall: the model reads key-value pairs and must answer with the value when a key comes back.

All three tasks here score only the positions where a value must be recalled; the metric is accuracy there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # for annotations only: functions import torch where they use it, so listing tasks needs no torch
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
        import torch
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


def key_value_stream(batch_size: int, length: int, num_pairs: int, key_length: int, value_length: int,
                     key_range: tuple[int, int], value_range: tuple[int, int],
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A stream of key-value pairs, each drawn (with replacement) from ``num_pairs`` pairs fixed per sequence.

    Keys are distinct motifs of ``key_length`` tokens from ``key_range``, values motifs of ``value_length``
    tokens from ``value_range``. Returns ``tokens, answers`` ``[batch_size, length]``: ``answers[i]`` is
    ``tokens[i + 1]`` where that token belongs to the value of a pair whose key appeared earlier in the
    sequence (only then is the value recallable), else -100.
    """
    import torch
    key_low, key_high = key_range
    key_tokens = key_high - key_low
    pair_length = key_length + value_length
    # Distinct motifs: draw distinct codes in [0, key_tokens ** key_length) and spell them in base key_tokens.
    codes = sample_distinct(batch_size, num_pairs, 0, key_tokens**key_length, generator)
    place_values = key_tokens ** torch.arange(key_length - 1, -1, -1)
    keys = codes[:, :, None] // place_values % key_tokens + key_low
    values = torch.randint(*value_range, (batch_size, num_pairs, value_length), generator=generator)
    pairs = torch.cat([keys, values], dim=2)

    # One token more than asked for, so the answer of the last position is known.
    stream_pairs = -(-(length + 1) // pair_length)
    chosen = torch.randint(0, num_pairs, (batch_size, stream_pairs), generator=generator)
    tokens = pairs.gather(1, chosen[:, :, None].expand(-1, -1, pair_length)).reshape(batch_size, -1)
    one_hot = torch.nn.functional.one_hot(chosen, num_pairs)
    seen_before = (one_hot.cumsum(dim=1) - one_hot).gather(2, chosen[:, :, None]) > 0
    is_value = torch.arange(pair_length) >= key_length
    recallable = (seen_before & is_value).reshape(batch_size, -1)

    answers = torch.where(recallable[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return tokens[:, :length], answers[:, :length]


@dataclass
class FuzzyRecall(Task):
    """Fuzzy in-context recall (MAD): keys and values are multi-token motifs; recall a value when its key recurs.

    The sequence is a stream of key-value pairs drawn at random from ``num_kv_pairs`` pairs fixed per
    sequence; keys are distinct motifs of ``key_length`` tokens from ``[0, vocab_size/2)``, values motifs of
    ``value_length`` tokens from ``[vocab_size/2, vocab_size)``. Every value token of a pair whose key has
    appeared before is scored (the target at the position before it is that token); first occurrences are not.

    Metric: accuracy over the scored value tokens. Defaults: MAD's baseline (vocabulary 16, sequence 128,
    motifs up to 3 tokens); here motifs have a fixed length so batches are built without per-example loops.
    """

    name = "fuzzy_recall"

    vocab_size: int = 16
    seq_len: int = 128
    num_kv_pairs: int = 8
    key_length: int = 3
    value_length: int = 3

    def __post_init__(self) -> None:
        check(self.vocab_size >= 4, "vocab_size", f"expected at least 4, got {self.vocab_size}")
        check(self.key_length >= 1, "key_length", f"expected at least 1, got {self.key_length}")
        check(self.value_length >= 1, "value_length", f"expected at least 1, got {self.value_length}")
        motifs = (self.vocab_size // 2) ** self.key_length
        check(1 <= self.num_kv_pairs <= motifs, "num_kv_pairs",
              f"expected 1 to {motifs} (distinct keys of {self.key_length} tokens from {self.vocab_size // 2}), "
              f"got {self.num_kv_pairs}")
        pair_length = self.key_length + self.value_length
        check(self.seq_len >= 2 * pair_length, "seq_len",
              f"expected at least {2 * pair_length} (two key-value pairs), got {self.seq_len}")

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.vocab_size // 2
        return key_value_stream(batch_size, self.seq_len, self.num_kv_pairs, self.key_length, self.value_length,
                                (0, half), (half, self.vocab_size), generator)


@dataclass
class NoisyRecall(Task):
    """Noisy in-context recall (MAD): recall values of recurring keys while noise tokens are interleaved.

    A stream of single-token key-value pairs (as ``fuzzy_recall`` with motifs of length 1) over the first
    ``vocab_size - noise_vocab_size`` tokens (keys in the lower half, values in the upper half), with a
    fraction ``noise_fraction`` of all positions replaced by noise tokens from the last ``noise_vocab_size``
    ids, inserted at random places (also between a key and its value). The target at a key whose value is
    recallable is that value, the next non-noise token; noise positions are never scored.

    Metric: accuracy over the scored keys. Defaults: MAD's baseline (vocabulary 32 plus 16 noise tokens,
    20% noise, sequence 128).
    """

    name = "noisy_recall"

    vocab_size: int = 48
    seq_len: int = 128
    num_kv_pairs: int = 8
    noise_vocab_size: int = 16
    noise_fraction: float = 0.2

    def __post_init__(self) -> None:
        check(1 <= self.noise_vocab_size <= self.vocab_size - 4, "noise_vocab_size",
              f"expected 1 to vocab_size - 4 = {self.vocab_size - 4}, got {self.noise_vocab_size}")
        keys = (self.vocab_size - self.noise_vocab_size) // 2
        check(1 <= self.num_kv_pairs <= keys, "num_kv_pairs",
              f"expected 1 to {keys} (the distinct keys of the vocabulary), got {self.num_kv_pairs}")
        check(0 <= self.noise_fraction < 1, "noise_fraction", f"expected a number in [0, 1), got {self.noise_fraction}")
        check(self.seq_len - self.noise_tokens >= 4, "seq_len",
              f"expected room for two key-value pairs besides {self.noise_tokens} noise tokens, got {self.seq_len}")

    @property
    def noise_tokens(self) -> int:
        return round(self.noise_fraction * self.seq_len)

    def generate(self, batch_size: int, generator: torch.Generator, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        content = self.vocab_size - self.noise_vocab_size
        clean_length = self.seq_len - self.noise_tokens
        clean, clean_answers = key_value_stream(batch_size, clean_length, self.num_kv_pairs, 1, 1,
                                                (0, content // 2), (content // 2, content), generator)
        noise_positions = sample_distinct(batch_size, self.noise_tokens, 0, self.seq_len, generator)
        is_noise = torch.zeros(batch_size, self.seq_len, dtype=torch.bool).scatter_(1, noise_positions, True)
        # Every row has the same number of clean positions, so row-major masked assignment keeps rows apart.
        inputs = torch.empty(batch_size, self.seq_len, dtype=torch.long)
        inputs[is_noise] = torch.randint(content, self.vocab_size, (batch_size * self.noise_tokens,), generator=generator)
        inputs[~is_noise] = clean.reshape(-1)
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[~is_noise] = clean_answers.reshape(-1)
        return inputs, targets
