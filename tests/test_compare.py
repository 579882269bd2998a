"""Provenance in results.json and in `sandbox compare`, which also compares two ablation folders."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_train import tiny_config
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.config import resolve_config
from sandbox.report import compare, compare_ablations
from sandbox.runfolder import save_config_file, write_plan
from sandbox.train import train

ROOT = Path(__file__).resolve().parent.parent


def test_results_carry_provenance(tmp_path):
    folder, results = train(tiny_config(tmp_path, steps=2, eval_every=2), progress=False)
    provenance = json.loads((folder / "results.json").read_text())["provenance"]
    assert provenance == results["provenance"]
    assert provenance["torch"] == torch.__version__ and provenance["threads"] == torch.get_num_threads()
    assert provenance["device"] and provenance["python"] and provenance["command"].startswith(("sandbox", "/"))
    if (ROOT / ".git").exists():   # run from this checkout: its commit, as git says
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert provenance["commit"] == head.stdout.strip()
        assert isinstance(provenance["dirty"], bool)


def fake_run(folder: Path, metric: float, provenance: dict | None, **config) -> Path:
    """A finished run folder: config.toml and results.json (with or without provenance)."""
    folder.mkdir(parents=True)
    save_config_file(resolve_config(config), folder / "config.toml")
    results = {"metric_name": "accuracy", "higher_is_better": True, "final_metric": metric, "final_loss": 1 - metric,
               "parameters": 100, "state_size": 10, "tokens_per_second": 1000.0, "wall_seconds": 1.0,
               "device": "cpu", "impl": "chunk"}
    if provenance is not None:
        results["provenance"] = provenance
    (folder / "results.json").write_text(json.dumps(results))
    return folder


PROVENANCE = {"sandbox": "0.1.0", "commit": "abc", "dirty": False, "torch": "2.13.0", "threads": 2, "command": "sandbox run"}


def test_compare_runs_names_the_provenance_that_differs(tmp_path):
    a = fake_run(tmp_path / "a", 0.9, PROVENANCE)
    b = fake_run(tmp_path / "b", 0.8, dict(PROVENANCE, threads=1, commit="def"))
    lines = compare(a, b).splitlines()
    assert ["threads", "2", "1"] in [line.split() for line in lines]
    assert ["commit", "abc", "def"] in [line.split() for line in lines]
    assert "(4 other provenance entries are equal)" in lines
    old = fake_run(tmp_path / "old", 0.8, None)
    assert "(no provenance in B: made before sandbox recorded it)" in compare(a, old)


def fake_ablation(root: Path, metrics: dict[str, list[float]], threads: int) -> Path:
    """An ablation folder over rule with one finished run per listed metric (one per seed)."""
    runs = []
    for rule, values in metrics.items():
        for seed, metric in enumerate(values):
            name = f"rule={rule}__seed={seed}"
            fake_run(root / "runs" / name, metric, dict(PROVENANCE, threads=threads), rule=rule, seed=seed)
            runs.append({"name": name, "axes": {"rule": rule}, "seed": seed, "config": {"rule": rule, "seed": seed}})
    write_plan(root, {"recipe": root.name, "description": "", "axes": ["rule"], "select_best": None,
                      "plot_x": None, "machine": "CPU", "runs": runs})
    return root


def test_compare_two_ablations_per_configuration(tmp_path):
    a = fake_ablation(tmp_path / "a", {"delta": [0.5, 0.7], "linear": [0.2]}, threads=2)
    b = fake_ablation(tmp_path / "b", {"delta": [0.9, 0.9], "gated_delta": [0.4]}, threads=1)
    text = compare_ablations(a, b)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("rule=")}
    assert rows.keys() == {"rule=delta", "rule=linear", "rule=gated_delta"}
    assert "0.600 ± 0.141 (2)" in rows["rule=delta"] and "0.900 ± 0.000 (2)" in rows["rule=delta"]
    assert rows["rule=delta"].rstrip().endswith("+0.3")
    assert "(not in it)" in rows["rule=linear"] and "(not in it)" in rows["rule=gated_delta"]
    assert ["threads", "2", "1"] in [line.split() for line in text.splitlines()]
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0 and result.output.strip() == text
    mixed = CliRunner().invoke(app, ["compare", str(a), str(a / "runs" / "rule=delta__seed=0")])
    assert mixed.exit_code == 2 and "error: A:" in mixed.output


@pytest.mark.parametrize("command", ["--help", "ablate --help", "plot --help", "run --help"])
def test_help_shows_no_type_after_flags(command):
    result = CliRunner().invoke(app, command.split())
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "--help" in result.output
