"""`sandbox run` and `sandbox doctor` end to end: run folder contents, no overwrites, exit codes, one-line errors."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sandbox.train as train_module
from sandbox.cli import app
from sandbox.config import load_config

TINY = ["--task", "mqar", "--task-arg", "vocab_size=16", "--task-arg", "seq_len=16", "--task-arg", "num_kv_pairs=2",
        "--d-model", "16", "--layers", "1", "--heads", "2", "--batch-size", "8", "--steps", "6", "--chunk-size", "16",
        "--eval-every", "3", "--eval-batches", "1", "--log-every", "2", "--checkpoint-every", "3", "--device", "cpu"]
RESULT_KEYS = {"rule", "task", "steps", "seed", "final_loss", "final_metric", "metric_name", "parameters",
               "state_size", "tokens_per_second", "wall_seconds", "device", "impl"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def run_folder(result) -> Path:
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run folder: "), result.stdout
    return Path(last.removeprefix("run folder: "))


def test_run_writes_results_config_metrics_tensorboard_and_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--rule", "momentum_delta", *TINY)
    assert result.exit_code == 0, result.stderr
    folder = run_folder(result)
    assert folder.parent == Path("runs") and folder.name.startswith("momentum_delta-mqar-")

    results = json.loads((folder / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["rule"] == "momentum_delta" and results["steps"] == 6 and results["metric_name"] == "accuracy"
    assert results["impl"] == "chunk" and results["device"] == "cpu"
    assert 0 <= results["final_metric"] <= 1 and results["state_size"] == 2 * 1 * 2 * 8 * 8

    config = load_config(folder / "config.toml")
    assert config["task_args"] == {"vocab_size": 16, "num_kv_pairs": 2, "power_a": 0.01}
    assert config["seq_len"] == 16 and config["d_model"] == 16

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6]
    assert list(folder.glob("events.out.tfevents.*"))
    assert (folder / "checkpoint.pt").is_file()
    tags = tensorboard_tags(folder)
    assert {"train/loss", "valid/loss", "valid/accuracy", "train/lr", "train/grad_norm", "train/tokens_per_second",
            "layer0/state_norm", "layer0/alpha", "layer0/beta", "layer0/mu", "layer0/eta"} <= tags


def tensorboard_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_config_file_is_reusable_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_folder(invoke("run", "--rule", "delta", *TINY, "--out", "first"))
    result = invoke("run", "--config", str(first / "config.toml"), "--lr", "0.005", "--steps", "3")
    assert result.exit_code == 0, result.stderr
    second = run_folder(result)
    # The saved config says what to train, not where: the repeat gets a new folder of its own.
    assert second.parent == Path("runs") and second.name.startswith("delta-mqar-")
    assert not Path("first-1").exists()
    config = load_config(second / "config.toml")
    assert config["rule"] == "delta" and config["lr"] == 0.005 and config["steps"] == 3
    assert json.loads((first / "results.json").read_text())["steps"] == 6


def test_existing_out_folder_is_never_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("mine").mkdir()
    Path("mine/notes.txt").write_text("keep me")
    result = invoke("run", "--rule", "linear", *TINY, "--out", "mine")
    assert result.exit_code == 0, result.stderr
    assert run_folder(result) == Path("mine-1")
    assert sorted(p.name for p in Path("mine").iterdir()) == ["notes.txt"]


def test_resume_continues_a_run_to_more_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = run_folder(invoke("run", "--rule", "gated_delta", *TINY, "--out", "r"))
    result = invoke("run", "--resume", str(folder), "--steps", "8")
    assert result.exit_code == 0, result.stderr
    assert run_folder(result) == folder
    assert "resuming at step 6 of 8" in result.stdout
    assert json.loads((folder / "results.json").read_text())["steps"] == 8


def test_non_finite_loss_exits_3_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original, calls = train_module.language_model_loss, []

    def loss_turning_inf(logits, targets):
        calls.append(1)
        return original(logits, targets) * (float("inf") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(train_module, "language_model_loss", loss_turning_inf)
    result = invoke("run", "--rule", "momentum_delta", *TINY, "--eval-every", "100", "--out", "boom")
    assert result.exit_code == 3
    last_line = result.stderr.strip().splitlines()[-1]   # the lines before it are the progress bar
    assert last_line.startswith("error: loss is inf at step 5") and "checkpoint" in last_line
    assert "Traceback" not in result.output
    assert Path("boom/checkpoint.pt").is_file()


@pytest.mark.parametrize("args, message", [
    (["--rule", "nope"], "rule: unknown rule 'nope'"),
    (["--task", "nope"], "task"),
    (["--d-model", "30", "--heads", "4"], "d_model"),
    (["--impl", "fast"], "impl"),
    (["--device", "tpu"], "device"),
    (["--task-arg", "num_kv_pairs"], "NAME=VALUE"),
    (["--task-arg", "num_kv_pairs=x"], "num_kv_pairs"),
    (["--task-arg", "colour=red"], "colour"),
    (["--config", "missing.toml"], "config"),
    (["--resume", "not-a-run"], "resume"),
    (["--steps", "0"], "steps"),
    (["--out", "a_file/run"], "not a folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Path("a_file").write_text("")
    result = invoke("run", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not Path("runs").exists()


def test_bad_key_in_config_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c.toml").write_text('rule = "delta"\nlearning_rate = 0.1\n')
    result = invoke("run", "--config", "c.toml")
    assert result.exit_code == 2 and "learning_rate" in result.stderr and result.stderr.count("\n") == 1


def test_resume_rejects_changing_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = run_folder(invoke("run", "--rule", "delta", *TINY, "--out", "r"))
    result = invoke("run", "--resume", str(folder), "--d-model", "32")
    assert result.exit_code == 2 and "d_model" in result.stderr


def test_doctor_reports_versions_without_traceback():
    result = invoke("doctor")
    assert result.exit_code == 0
    for label in ("python", "torch", "triton", "gpu", "impl auto"):
        assert label in result.stdout
    assert "Traceback" not in result.output


@pytest.mark.parametrize("triton, capability, warned", [
    ("3.4.0", (9, 0), True), ("3.6.0", (9, 0), True), ("3.7.0+git1a2b", (9, 0), True), ("3.7.1", (9, 0), False),
    ("3.3.1", (9, 0), False), ("3.6.0", (8, 0), False), ("3.6.0", None, False), (None, (9, 0), False),
])
def test_doctor_warns_about_triton_3_4_to_3_7_0_on_hopper(triton, capability, warned):
    from sandbox.doctor import hopper_miscompile_warning

    assert (hopper_miscompile_warning(triton, capability) is not None) == warned


def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = run_folder(invoke("run", "--rule", "delta", *TINY, "--out", "r"))
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = invoke("run", "--resume", str(folder))
    assert result.exit_code == 2 and result.stderr.startswith("error: resume: cannot load")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
