"""Tasks: shapes, label masking, correct answers, determinism, train/valid/test streams, bad parameters, CLI."""

import pytest
import torch
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.tasks import IGNORE_INDEX, TASKS, create_task, list_tasks
from sandbox.tasks.base import SPLITS, split_generator, split_of_examples


def make_batch(task, seed=0, split="train", batch_size=16, index=0):
    return task.batch(split, batch_size, split_generator(seed, split, index))


@pytest.mark.parametrize("name", list(TASKS))
def test_batch_shapes_and_vocabulary(name):
    task = create_task(name)
    inputs, targets = make_batch(task)
    assert inputs.shape == targets.shape == (16, task.seq_len)
    assert inputs.dtype == targets.dtype == torch.long
    assert 0 <= inputs.min() and inputs.max() < task.vocab_size
    scored = targets[targets != IGNORE_INDEX]
    assert scored.numel() > 0 and 0 <= scored.min() and scored.max() < task.vocab_size


@pytest.mark.parametrize("name", list(TASKS))
def test_determinism_and_splits(name):
    task = create_task(name)
    first, second = make_batch(task, seed=1), make_batch(task, seed=1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], make_batch(task, seed=2)[0])
    assert not torch.equal(first[0], make_batch(task, seed=1, split="valid")[0])
    assert not torch.equal(first[0], make_batch(task, seed=1, index=1)[0])


@pytest.mark.parametrize("name", list(TASKS))
def test_the_three_streams_are_deterministic_and_disjoint(name):
    task = create_task(name)
    streams = {split: make_batch(task, seed=3, split=split, batch_size=64) for split in SPLITS}
    for split, (inputs, targets) in streams.items():
        again = make_batch(task, seed=3, split=split, batch_size=64)
        assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    if task.splits_by_data_range:
        return   # text: the ranges are disjoint (test_text_vocabulary_split_and_bits_per_char)
    examples = {split: {tuple(row) for row in inputs.tolist()} for split, (inputs, _) in streams.items()}
    assert not examples["train"] & examples["valid"] and not examples["train"] & examples["test"]
    assert not examples["valid"] & examples["test"]
    # Disjoint by construction: each example's hash bucket names its split, whatever the seed.
    for split, (inputs, _) in streams.items():
        buckets = set(split_of_examples(inputs).tolist())
        assert buckets <= {"train": set(range(8)), "valid": {8}, "test": {9}}[split]


def test_a_tiny_example_space_still_splits_disjointly():
    task = create_task("parity", seq_len=6)   # 64 possible examples: many repeats within each stream
    streams = {split: {tuple(row) for row in make_batch(task, split=split, batch_size=256)[0].tolist()}
               for split in SPLITS}
    assert streams["valid"] and streams["test"]
    assert not streams["train"] & streams["valid"] and not streams["train"] & streams["test"]
    assert not streams["valid"] & streams["test"]


@pytest.mark.parametrize("name", list(TASKS))
def test_perfect_logits_score_perfectly(name):
    task = create_task(name)
    _, targets = make_batch(task)
    logits = torch.full((*targets.shape, task.vocab_size), -10.0)
    scored = targets != IGNORE_INDEX
    logits[scored] = logits[scored].scatter(1, targets[scored][:, None], 10.0)
    perfect = 0.0 if not task.higher_is_better else 1.0
    assert task.metric(logits, targets) == pytest.approx(perfect, abs=1e-3)


def test_mqar_answers_are_the_values_of_the_queried_keys():
    task = create_task("mqar", {"vocab_size": "64", "num_kv_pairs": "8"}, seq_len=64)
    inputs, targets = make_batch(task, batch_size=64)
    pairs = task.num_kv_pairs
    for row_inputs, row_targets in zip(inputs, targets):
        keys, values = row_inputs[0:2 * pairs:2], row_inputs[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and keys.max() < 32 and keys.min() >= 1 and values.min() >= 32
        lookup = dict(zip(keys.tolist(), values.tolist()))
        scored = (row_targets != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == pairs and scored.min() >= 2 * pairs
        assert sorted(row_inputs[scored].tolist()) == sorted(keys.tolist())  # every key queried once
        for position in scored.tolist():
            assert row_targets[position] == lookup[int(row_inputs[position])]
            if position + 1 < task.seq_len:
                assert row_inputs[position + 1] == row_targets[position]  # the value follows its query


def test_mqar_prefers_short_gaps():
    inputs, targets = make_batch(create_task("mqar", {"num_kv_pairs": 2}, seq_len=256), batch_size=512)
    positions = (targets != IGNORE_INDEX).nonzero()[:, 1].float()
    assert positions.median() < 4 + (256 - 4) / 4  # power law: most queries in the first quarter


@pytest.mark.parametrize("args, seq_len, message", [
    ({"num_kv_pairs": "x"}, None, "task_arg 'num_kv_pairs': expected an int, got 'x'"),
    ({"power_a": "fast"}, None, "task_arg 'power_a': expected a number"),
    ({"pairs": 4}, None, "task_arg 'pairs': not a parameter of task 'mqar', expected one of: vocab_size"),
    ({"num_kv_pairs": 20}, 64, "task_arg 'num_kv_pairs': 20 pairs and their queries need seq_len >= 80"),
    ({"vocab_size": 8, "num_kv_pairs": 4}, None, "need vocab_size >= 10"),
    ({"seq_len": 32}, 64, "seq_len: 64 disagrees with task_arg seq_len=32"),
])
def test_mqar_bad_parameters(args, seq_len, message):
    with pytest.raises(ValueError) as error:
        create_task("mqar", args, seq_len=seq_len)
    assert message in str(error.value)


def test_unknown_task_and_bad_split():
    with pytest.raises(ValueError, match="task: unknown task 'nope', expected one of: mqar"):
        create_task("nope")
    with pytest.raises(ValueError, match="split: expected one of train, valid, test, got 'eval'"):
        make_batch(create_task("mqar"), split="eval")


def test_list_tasks_and_cli():
    rows = list_tasks()
    assert [name for name, *_ in rows] == list(TASKS)
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0
    for name, description, defaults, metric_name in rows:
        assert name in result.output and description in result.output and metric_name in result.output
        for param, default in defaults.items():
            assert f"{param}={default}" in result.output



@pytest.mark.parametrize("name", list(TASKS))
def test_every_parameter_takes_its_default_given_as_a_string(name):
    # A parameter's type comes from its annotation's name (int, float, bool or str): see sandbox.tasks._kind.
    defaults = next(defaults for task, _, defaults, _ in list_tasks() if task == name)
    task = create_task(name, {param: str(default) for param, default in defaults.items()})
    assert task.params() == defaults and all(type(task.params()[p]) is type(d) for p, d in defaults.items())

def pairs_of(row, pair_length):
    return [tuple(row[i:i + pair_length].tolist()) for i in range(0, len(row) - pair_length + 1, pair_length)]


def test_fuzzy_recall_scores_the_values_of_recurring_key_motifs():
    task = create_task("fuzzy_recall", {"key_length": 2, "value_length": 3, "num_kv_pairs": 6}, seq_len=100)
    inputs, targets = make_batch(task, batch_size=32)
    key_length, pair_length = 2, 5
    for row_inputs, row_targets in zip(inputs, targets):
        value_of, expected = {}, torch.full_like(row_targets, IGNORE_INDEX)
        for index, pair in enumerate(pairs_of(row_inputs, pair_length)):
            key, value = pair[:key_length], pair[key_length:]
            assert all(t < 8 for t in key) and all(t >= 8 for t in value)
            if key in value_of:
                assert value_of[key] == value  # a key always brings the same value
                start = index * pair_length + key_length - 1
                expected[start:start + len(value)] = torch.tensor(value)
            value_of[key] = value
        assert len(value_of) <= 6
        assert torch.equal(row_targets[:len(row_targets) - pair_length], expected[:len(row_targets) - pair_length])


def test_noisy_recall_scores_recurring_keys_and_never_noise():
    task = create_task("noisy_recall")
    inputs, targets = make_batch(task, batch_size=32)
    content = task.vocab_size - task.noise_vocab_size
    is_noise = inputs >= content
    assert (is_noise.sum(dim=1) == round(0.2 * task.seq_len)).all()
    assert (targets[is_noise] == IGNORE_INDEX).all()
    for row_inputs, row_targets in zip(inputs, targets):
        clean = row_inputs[row_inputs < content]
        keys, values = clean[0::2].tolist(), clean[1::2].tolist()
        assert all(k < content // 2 for k in keys) and all(v >= content // 2 for v in values)
        value_of, expected = {}, []
        for key, value in zip(keys, values):
            expected.append(value if key in value_of else IGNORE_INDEX)
            assert value_of.setdefault(key, value) == value
        clean_targets = row_targets[row_inputs < content]
        assert clean_targets[0::2].tolist()[:len(expected)] == expected
        assert (clean_targets[1::2] == IGNORE_INDEX).all()


def test_selective_copy_targets_are_the_scattered_tokens_in_order():
    task = create_task("selective_copy", {"num_tokens_to_copy": "5", "vocab_size": 10}, seq_len=30)
    inputs, targets = make_batch(task, batch_size=32)
    for row_inputs, row_targets in zip(inputs, targets):
        scattered = row_inputs[:25]
        assert row_inputs[25] == 1 and (row_targets[:25] == IGNORE_INDEX).all()
        content = scattered[scattered != 0]
        assert len(content) == 5 and content.min() >= 2
        assert torch.equal(row_targets[25:], content)
        assert torch.equal(row_inputs[26:], content[:-1])


def test_memorization_uses_one_fixed_map():
    task = create_task("memorization", seq_len=31)
    inputs, targets = make_batch(task)
    keys, values = inputs[:, 0::2], inputs[:, 1::2]
    assert keys.max() < 128 and values.min() >= 128
    assert torch.equal(targets[:, 0::2], task.value_of_key[keys])
    assert torch.equal(values, task.value_of_key[keys[:, :15]])
    assert (targets[:, 1::2] == IGNORE_INDEX).all()
    assert torch.equal(task.value_of_key, create_task("memorization").value_of_key)
    assert not torch.equal(task.value_of_key, create_task("memorization", {"map_seed": 1}).value_of_key)


def test_parity_targets_and_end_only_scoring():
    inputs, targets = make_batch(create_task("parity"))
    assert torch.equal(targets, inputs.cumsum(dim=1) % 2)
    inputs, targets = make_batch(create_task("parity", {"score_every_position": "false"}, seq_len=9))
    assert (targets[:, :-1] == IGNORE_INDEX).all() and torch.equal(targets[:, -1], inputs.sum(dim=1) % 2)


@pytest.mark.parametrize("group, degree", [("S3", 3), ("S5", 5)])
def test_permutation_targets_are_the_running_composition(group, degree):
    import itertools
    task = create_task("permutation", {"group": group}, seq_len=37)
    permutations = list(itertools.permutations(range(degree)))
    assert task.vocab_size == len(permutations) and permutations[0] == tuple(range(degree))
    inputs, targets = make_batch(task, batch_size=4)
    for row_inputs, row_targets in zip(inputs, targets):
        arrangement = list(range(degree))
        for element, target in zip(row_inputs.tolist(), row_targets.tolist()):
            arrangement = [arrangement[j] for j in permutations[element]]
            assert permutations[target] == tuple(arrangement)


def test_text_vocabulary_split_and_bits_per_char(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("ab" * 400 + "ef" * 50 + "cd" * 50, encoding="utf-8")  # valid is all "ef", test all "cd"
    task = create_task("text", {"data": str(path)}, seq_len=16)
    assert task.characters == "abcdef" and task.vocab_size == 6
    for split, allowed in (("train", {0, 1}), ("valid", {4, 5}), ("test", {2, 3})):
        inputs, targets = make_batch(task, split=split)
        assert set(inputs.unique().tolist()) == allowed
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        assert ((targets - inputs) % 2 == 1).all()  # a is followed by b, c by d, and back
    uniform = torch.zeros(*targets.shape, 4)
    assert task.metric(uniform, targets) == pytest.approx(2.0)  # log2(4) bits for a uniform guess
    assert not task.higher_is_better and task.metric_name == "bits_per_char"


def test_text_default_is_the_cpython_prose():
    task = create_task("text")
    assert sum(len(ids) for ids in task.split_ids.values()) > 100_000 and "e" in task.characters


@pytest.mark.parametrize("name, args, message", [
    ("text", {"data": "/no/such/file.txt"}, "task_arg 'data': expected a readable UTF-8 text file, got '/no/such/file.txt'"),
    ("text", {"seq_len": 10**7}, "task_arg 'seq_len': the shortest split (10%)"),
    ("fuzzy_recall", {"num_kv_pairs": 100, "key_length": 2}, "task_arg 'num_kv_pairs': expected 1 to 64"),
    ("noisy_recall", {"noise_fraction": 1.5}, "task_arg 'noise_fraction': expected a number in [0, 1)"),
    ("noisy_recall", {"noise_vocab_size": 46}, "task_arg 'noise_vocab_size': expected 1 to vocab_size - 4 = 44"),
    ("selective_copy", {"num_tokens_to_copy": 65}, "task_arg 'num_tokens_to_copy': 65 tokens to scatter and copy need seq_len >= 130"),
    ("parity", {"score_every_position": "maybe"}, "task_arg 'score_every_position': expected true or false, got 'maybe'"),
    ("parity", {"vocab_size": 4}, "task_arg 'vocab_size': not a parameter of task 'parity', expected one of: seq_len, score_every_position"),
    ("permutation", {"group": "S4"}, "task_arg 'group': expected one of S3, S5, got 'S4'"),
])
def test_bad_parameters_of_each_task(name, args, message):
    with pytest.raises(ValueError) as error:
        create_task(name, args)
    assert message in str(error.value)


@pytest.mark.parametrize("count, low, high", [(40, 3, 50), (70, 0, 10_000)])  # ranking; redrawing (~20% of rows repeat)
def test_sample_distinct_draws_distinct_values_in_range(count, low, high):
    from sandbox.tasks.base import sample_distinct
    samples = sample_distinct(256, count, low, high, torch.Generator().manual_seed(0))
    assert samples.shape == (256, count) and samples.min() >= low and samples.max() < high
    assert (samples.sort(dim=1).values.diff(dim=1) > 0).all()
    assert torch.equal(samples, sample_distinct(256, count, low, high, torch.Generator().manual_seed(0)))
