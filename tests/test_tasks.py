"""Tasks: shapes, label masking, correct answers, determinism, train/eval streams, bad parameters, CLI."""

import pytest
import torch
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.tasks import IGNORE_INDEX, TASKS, create_task, list_tasks


def make_batch(task, seed=0, split="train", batch_size=16):
    return task.batch(batch_size, torch.Generator().manual_seed(seed), split)


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
    assert not torch.equal(first[0], make_batch(task, seed=1, split="eval")[0])


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
    with pytest.raises(ValueError, match="split: expected one of train, eval, got 'test'"):
        make_batch(create_task("mqar"), split="test")


def test_list_tasks_and_cli():
    rows = list_tasks()
    assert [name for name, *_ in rows] == list(TASKS)
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 0
    for name, description, defaults, metric_name in rows:
        assert name in result.output and description in result.output and metric_name in result.output
        for param, default in defaults.items():
            assert f"{param}={default}" in result.output
