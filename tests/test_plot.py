"""``sandbox plot``: runs found in run and ablation folders, seeds grouped into a mean with a band, PNG out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.config import resolve_config
from sandbox.plot import curve, differing_keys, find_runs, plot
from sandbox.runfolder import save_config_file

pytest.importorskip("matplotlib")   # in the dev extra, so CI runs these


def fake_run(folder: Path, seed: int, lr: float, losses: list[float], *, finished: bool = True) -> Path:
    """A run folder as `sandbox run` leaves it: config.toml, metrics.jsonl (train every step, eval at 2 and 4)."""
    folder.mkdir(parents=True)
    config = resolve_config({"seed": seed, "lr": lr, "batch_size": 8, "seq_len": 32})
    save_config_file(config, folder / "config.toml")
    records = []
    for step, loss in enumerate(losses, start=1):
        records.append({"step": step, "split": "train", "loss": loss, "accuracy": 1 - loss, "lr": lr,
                        "grad_norm": 1.0, "tokens_per_second": 100.0})
        if step % 2 == 0:
            records.append({"step": step, "split": "eval", "loss": loss / 2, "accuracy": 1 - loss / 2})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (folder / "results.json").write_text(json.dumps({"metric_name": "accuracy"}))
    return folder


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    root = tmp_path / "ablation"
    fake_run(root / "runs" / "lr=0.01__seed=0", 0, 0.01, [0.9, 0.7, 0.5, 0.3])
    fake_run(root / "runs" / "lr=0.01__seed=1", 1, 0.01, [0.8, 0.6, 0.4, 0.2])
    fake_run(root / "runs" / "lr=0.001__seed=0", 0, 0.001, [0.9, 0.85, 0.8], finished=False)   # still running
    (root / "plan.json").write_text("{}")
    return root


def test_runs_are_found_below_an_ablation_and_as_single_folders(ablation):
    runs = find_runs(str(ablation))
    assert sorted(run.folder.name for run in runs) == ["lr=0.001__seed=0", "lr=0.01__seed=0", "lr=0.01__seed=1"]
    assert {run.metric_name for run in runs} == {"accuracy"}        # from the records when results.json is missing
    (single,) = find_runs(str(ablation / "runs" / "lr=0.01__seed=1"))
    assert single.config["seed"] == 1
    assert differing_keys(runs) == ["lr"]                             # seed and out never label a curve


def test_seeds_become_a_mean_and_a_band_at_the_steps_every_seed_reached(ablation):
    runs = [run for run in find_runs(str(ablation)) if run.config["lr"] == 0.01]
    train = curve(runs, "train", "loss", "steps")
    assert train.xs == [1, 2, 3, 4]
    assert train.mean == pytest.approx([0.85, 0.65, 0.45, 0.25])
    assert train.low == pytest.approx([0.8, 0.6, 0.4, 0.2]) and train.high == pytest.approx([0.9, 0.7, 0.5, 0.3])
    evals = curve(runs, "eval", "accuracy", "tokens")
    assert evals.xs == [2 * 8 * 32, 4 * 8 * 32]                       # steps x batch size x sequence length
    assert evals.mean == pytest.approx([1 - 0.65 / 2, 1 - 0.25 / 2])
    shorter = [runs[0], find_runs(str(ablation / "runs" / "lr=0.001__seed=0"))[0]]
    assert curve(shorter, "train", "loss", "steps").xs == [1, 2, 3]


def test_plot_writes_a_png_of_several_folders(ablation, tmp_path):
    out = plot([str(ablation / "runs" / "lr=0.01__seed=0"), str(ablation)], tmp_path / "curves.png", x="tokens")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_what_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="RUN_OR_ABLATION: no such folder"):
        plot([str(tmp_path / "missing")], tmp_path / "a.png")
    with pytest.raises(ValueError, match="neither a run folder"):
        plot([str(tmp_path)], tmp_path / "a.png")
    with pytest.raises(ValueError, match="--x: expected steps or tokens"):
        plot([str(tmp_path)], tmp_path / "a.png", x="epochs")


def test_plot_command_writes_a_new_file_and_never_overwrites(ablation, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sandbox.cli import app

    monkeypatch.chdir(tmp_path)
    first = CliRunner().invoke(app, ["plot", str(ablation)])
    second = CliRunner().invoke(app, ["plot", str(ablation), "--x", "tokens"])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "curves-1.png").is_file()
    taken = CliRunner().invoke(app, ["plot", str(ablation), "--out", "curves.png"])
    assert taken.exit_code == 2 and taken.output.startswith("error: --out: curves.png already exists")
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "RUN_OR_ABLATION: no such folder" in missing.output
