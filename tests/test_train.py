"""Training: the loss falls for every mixer, exact resume, the NaN stop, run folders, schedule and config."""

import dataclasses
import json

import pytest
import torch

import sandbox.train as train_module
from sandbox.config import RunConfig, config_to_toml, load_config, resolve_config
from sandbox.rules import list_rules
from sandbox.runfolder import RunFolder, save_config_file
from sandbox.train import NonFiniteLoss, RunInterrupted, lr_factor, resume, train

TINY_TASK = {"vocab_size": 16, "seq_len": 16, "num_kv_pairs": 2}


def tiny_config(tmp_path, **overrides) -> RunConfig:
    values = dict(task="mqar", task_args=TINY_TASK, d_model=16, layers=1, heads=2, batch_size=8, steps=30,
                  lr=1e-2, warmup_steps=3, chunk_size=16, eval_every=10, eval_batches=1, log_every=1,
                  checkpoint_every=10, device="cpu", out=str(tmp_path / "run"))
    values.update(overrides)
    return resolve_config(values)


def train_losses(folder) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.parametrize("rule", list_rules() + ["attention"])
def test_loss_falls_for_every_mixer(tmp_path, rule):
    folder, results = train(tiny_config(tmp_path, rule=rule, lr=2e-2), progress=False)
    losses = train_losses(folder)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert results["steps"] == 30 and results["rule"] == rule


def interrupt_training_batch(monkeypatch, at_step: int) -> None:
    """Make the batch of step ``at_step`` (0-based) raise KeyboardInterrupt, as Ctrl-C in the middle of a step."""
    original = train_module.BatchStream.get

    def get(self, step):
        if step == at_step:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(train_module.BatchStream, "get", get)


def test_interrupted_then_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    config = dict(steps=16, checkpoint_every=8, eval_every=4, rule="momentum_delta")
    whole, _ = train(tiny_config(tmp_path, out=str(tmp_path / "whole"), **config), progress=False)

    with monkeypatch.context() as patch:
        interrupt_training_batch(patch, at_step=11)   # interrupted in step 12, after the checkpoint at step 8
        with pytest.raises(RunInterrupted, match="continue from step 8"):
            train(tiny_config(tmp_path, out=str(tmp_path / "split"), **config), progress=False)
    split = tmp_path / "split"
    assert len(train_losses(split)) == 11   # steps 9..11 were logged and will be recomputed
    resume(split, progress=False)

    assert train_losses(split) == train_losses(whole)   # bit for bit
    evals = [[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
              if '"valid"' in line] for folder in (whole, split)]
    assert [e["loss"] for e in evals[0]] == [e["loss"] for e in evals[1]]
    assert json.loads((split / "results.json").read_text())["final_loss"] == \
        json.loads((whole / "results.json").read_text())["final_loss"]


def test_resume_can_extend_steps_but_not_change_the_model(tmp_path):
    folder, _ = train(tiny_config(tmp_path, steps=4, rule="gated_delta"), progress=False)
    with pytest.raises(ValueError, match="d_model"):
        resume(folder, {"d_model": 32}, progress=False)
    with pytest.raises(ValueError, match="steps"):
        resume(folder, {"steps": 2}, progress=False)
    _, results = resume(folder, {"steps": 6}, progress=False)
    assert results["steps"] == 6 and len(train_losses(folder)) == 6
    assert load_config(folder / "config.toml")["steps"] == 6


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original, calls = train_module.language_model_loss, []

    def loss_turning_nan(logits, targets):
        calls.append(1)
        loss = original(logits, targets)
        return loss * float("nan") if len(calls) >= 7 else loss

    monkeypatch.setattr(train_module, "language_model_loss", loss_turning_nan)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 7") as error:
        train(tiny_config(tmp_path, checkpoint_every=2, eval_every=100, rule="delta"), progress=False)
    assert "checkpoint" in str(error.value)
    folder = tmp_path / "run"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not (folder / "results.json").exists()


def test_existing_folder_gets_a_suffix(tmp_path):
    config = RunConfig()
    folders = [RunFolder.create(str(tmp_path / "run"), config) for _ in range(3)]
    for folder in folders:
        folder.close()
    first, second, third = (folder.path for folder in folders)
    (first / "keep.txt").write_text("earlier run")
    assert (first.name, second.name, third.name) == ("run", "run-1", "run-2")
    assert (first / "keep.txt").read_text() == "earlier run"


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert all(lr_factor(s, 10, 100) >= lr_factor(s + 1, 10, 100) for s in range(10, 100))


def test_config_round_trip_and_layering(tmp_path):
    config = resolve_config({"rule": "delta", "task_args": {"num_kv_pairs": 2, "vocab_size": 32},
                             "lr": 0.002, "short_conv": False, "out": "somewhere"})
    path = tmp_path / "config.toml"
    save_config_file(config, path)
    assert "somewhere" not in path.read_text()   # a saved config says what to train, not where
    assert resolve_config(load_config(path)) == dataclasses.replace(config, out=None)
    # flags override the file; task_args merge key by key
    layered = resolve_config(load_config(path), {"lr": 0.01, "task_args": {"num_kv_pairs": 3}})
    assert layered.lr == 0.01 and layered.rule == "delta"
    assert layered.task_args == {"num_kv_pairs": 3, "vocab_size": 32}
    assert "[task_args]" in config_to_toml(config)


@pytest.mark.parametrize("text, message", [
    ("bogus = 1\n", "bogus"),
    ("steps = 'many'\n", "steps"),
    ("short_conv = 1\n", "short_conv"),
    ("rule = \n", "not valid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)


@pytest.mark.parametrize("values, message", [
    ({"rule": "nope"}, "rule"), ({"d_model": 30, "heads": 4}, "d_model"), ({"impl": "fast"}, "impl"),
    ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"device": "gpu"}, "device"), ({"chunk_size": 48}, "chunk_size"),
])
def test_bad_values_name_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(values)


def test_bad_task_argument_fails_before_a_folder_is_created(tmp_path):
    with pytest.raises(ValueError, match="num_kv_pairs"):
        train(tiny_config(tmp_path, task_args={"num_kv_pairs": "x"}), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["momentum_delta", "attention"])
def test_gpu_run_in_bf16_with_the_automatic_implementation(tmp_path, rule):
    folder, results = train(tiny_config(tmp_path, rule=rule, lr=2e-2, device="cuda", impl="auto", chunk_size=16),
                            progress=False)
    losses = train_losses(folder)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert results["device"].startswith("cuda")
    assert results["impl"] == ("sdpa" if rule == "attention" else "triton")   # the kernels pass their self-test
    resumed, _ = resume(folder, {"steps": 32}, progress=False)
    assert len(train_losses(resumed)) == 32


def compile_for_test(monkeypatch, backend: str = "aot_eager") -> None:
    """Compile through dynamo and AOT autograd without generating C++ (fast on a CPU), and in one piece: a
    graph break anywhere in the forward and loss fails the capture."""
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: original(fn, backend=backend, fullgraph=True))


@pytest.mark.parametrize("rule, impl", [("linear", "triton"), ("attention", "auto")])
def test_compiled_step_matches_eager(tmp_path, monkeypatch, rule, impl):
    eager, _ = train(tiny_config(tmp_path, out=str(tmp_path / "eager"), rule=rule, impl=impl, steps=4,
                                 compile=False), progress=False)
    compile_for_test(monkeypatch)
    compiled, results = train(tiny_config(tmp_path, out=str(tmp_path / "compiled"), rule=rule, impl=impl, steps=4,
                                          inductor=True),
                              progress=False)
    assert results["compiled"]
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-4)


def test_failed_capture_falls_back_to_eager_with_a_note(tmp_path, monkeypatch, capsys):
    eager, _ = train(tiny_config(tmp_path, out=str(tmp_path / "eager"), steps=4, compile=False), progress=False)
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda fn: broken)
    folder, results = train(tiny_config(tmp_path, out=str(tmp_path / "fallback"), steps=4, inductor=True),
                            progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: capturing the training step failed (RuntimeError: no compiler here); "
                     "training without --compile"]
    assert not results["compiled"] and train_losses(folder) == train_losses(eager)


def test_results_hold_valid_and_test_metrics(tmp_path):
    folder, results = train(tiny_config(tmp_path, steps=2, eval_every=1), progress=False)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [1, 2]
    assert results["final_metric"] == valid[-1]["accuracy"] and results["final_loss"] == valid[-1]["loss"]
    assert 0 <= results["test_metric"] <= 1 and results["test_loss"] > 0
    assert results["test_loss"] != results["final_loss"]   # another stream of examples


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rule", ["momentum_delta", "attention"])
def test_gpu_captured_step_matches_eager(tmp_path, rule):
    losses = {}
    for compile, inductor in ((False, False), (True, False), (True, True)):
        folder, results = train(tiny_config(tmp_path, out=str(tmp_path / f"run-{compile}-{inductor}"), rule=rule,
                                            device="cuda", impl="auto", chunk_size=16, steps=12, compile=compile,
                                            inductor=inductor), progress=False)
        assert results["cuda_graph"] == compile and results["compiled"] == inductor
        losses[compile, inductor] = train_losses(folder)
    # bf16 autocast: fused and unfused kernels round differently; the losses must still track each other.
    assert losses[True, False] == pytest.approx(losses[False, False], rel=2e-2)
    assert losses[True, True] == pytest.approx(losses[False, False], rel=2e-2)
