"""Selection on valid / reporting on test, the summary's statistics, the new recipe keys, and the CPU-sized
variants of the reproduction recipes (recipes/cpu/), run end to end at a tiny size for the plumbing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandbox.ablate import load_recipe
from sandbox.cli import app
from sandbox.report import Ablation, comparisons, group, select_best, summary_markdown

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def row(rule, lr, seed, valid, test):
    return {"name": f"{rule}-{lr}-{seed}", "rule": rule, "lr": lr, "seed": seed, "status": "ok",
            "metric_name": "accuracy", "higher_is_better": True, "final_metric": valid, "final_loss": 1 - valid,
            "test_metric": test, "test_loss": 1 - test, "parameters": 10, "state_size": 4,
            "tokens_per_second": 1.0, "wall_seconds": 1.0, "device": "cpu", "impl": "chunk", "log": ""}


def test_selection_reads_valid_and_reports_test(tmp_path):
    # lr 0.1 is better on valid, lr 0.01 on test: the choice must follow valid, the table must show test.
    ablation = Ablation("t", "", ["rule", "lr"], "lr", None, rows=[
        row("delta", 0.1, 0, 0.9, 0.50), row("delta", 0.1, 1, 0.8, 0.60),
        row("delta", 0.01, 0, 0.7, 0.95), row("delta", 0.01, 1, 0.6, 0.97),
    ])
    best = select_best(ablation, group(ablation))
    assert [c.axes["lr"] for c in best] == [0.1]
    text = summary_markdown(ablation, tmp_path)
    table = text.split("## Every configuration")[0]
    assert "best lr (on valid)" in table and "test accuracy (mean ± std)" in table
    assert "| delta | 0.1 | 0.550 ± 0.071 (spread!) | [-0.085, 1.185] | 0.850 |" in table
    assert "0.960" not in table   # lr 0.01's test mean is not what is reported
    # The spread flag lists every seed.
    assert "rule=delta, lr=0.1: std 0.071 (seeds 0: 0.500, 1: 0.600)" in text


def test_comparisons_per_setting_with_verdicts():
    ablation = Ablation("t", "", ["task", "rule"], None, None,
                        compare={"axis": "rule", "pairs": [["gated_delta", "momentum_delta"]]}, rows=[
        {**row("gated_delta", 0, s, 0, v), "task": "mqar"} for s, v in enumerate([0.1, 0.2, 0.3])] + [
        {**row("momentum_delta", 0, s, 0, v), "task": "mqar"} for s, v in enumerate([0.6, 0.7, 0.8])] + [
        {**row("gated_delta", 0, s, 0, v), "task": "text"} for s, v in enumerate([1.0, 2.0, 3.0])] + [
        {**row("momentum_delta", 0, s, 0, v), "task": "text"} for s, v in enumerate([3.0, 4.0, 5.0])])
    found = comparisons(ablation, group(ablation))
    assert [item["setting"] for item in found] == [{"task": "mqar"}, {"task": "text"}]
    assert found[0]["result"].difference == pytest.approx(0.5)
    assert found[0]["verdict"] == "momentum_delta better than gated_delta"
    # The hand-worked example of tests/test_stats.py: p = 0.0705, not distinguishable at 3 seeds.
    assert found[1]["result"].p_value == pytest.approx(0.070484, abs=1e-5)
    assert found[1]["verdict"] == "momentum_delta and gated_delta not distinguishable with 3 and 3 seeds"


@pytest.mark.parametrize("text, key", [
    ('plot_x_values = "state_size"\n[grid]\nrule = ["delta"]\n', "plot_x_values: needs plot_x"),
    ('plot_x = "rule"\nplot_x_values = "tokens"\n[grid]\nrule = ["delta"]\n', "plot_x_values: expected one of"),
    ('[grid]\nrule = ["delta"]\n[compare]\naxis = "lr"\npairs = [["a", "b"]]\n', "compare.axis"),
    ('[grid]\nrule = ["delta", "linear"]\n[compare]\naxis = "rule"\npairs = [["delta", "decay"]]\n', "compare.pairs"),
    ('[grid]\nrule = ["delta", "linear"]\n[compare]\naxis = "rule"\npairs = ["delta"]\n', "compare.pairs"),
    ('[grid]\nrule = ["delta", "linear"]\n[compare]\naxis = "rule"\n', "compare: expected exactly one"),
    ('[grid]\nrule = ["delta", "linear"]\n[compare]\naxis = "rule"\nreference = "decay"\n', "compare.reference"),
    ('[grid]\nrule = ["delta", "linear"]\n[compare]\naxis = "rule"\nreference = "delta"\nwho = 1\n', "compare.who"),
    ('select_best = "lr"\n[grid]\nrule = ["delta"]\nlr = [0.1, 0.01]\n[compare]\naxis = "lr"\nreference = 0.1\n',
     "compare.axis: 'lr' is the select_best axis"),
])
def test_bad_new_recipe_keys_are_one_line_errors(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=key):
        load_recipe(path)
    result = CliRunner().invoke(app, ["ablate", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(f"error: {key.split(':')[0]}")


def test_reference_expands_into_pairs(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[grid]\nrule = ["delta", "linear", "attention"]\n[compare]\naxis = "rule"\nreference = "attention"\n')
    assert load_recipe(path).compare == {"axis": "rule", "pairs": [["attention", "delta"], ["attention", "linear"]]}


@pytest.mark.parametrize("name", ["quick", "mqar_state_size", "state_tracking", "mdn"])
def test_cpu_variant_runs_end_to_end(tmp_path, name):
    """The CPU-sized variant of each reproduction recipe: every run finishes, the summary has its sections."""
    full, tiny = load_recipe(RECIPES / f"{name}.toml"), load_recipe(RECIPES / "cpu" / f"{name}.toml")
    assert (tiny.select_best, tiny.plot_x, tiny.plot_x_values) == (full.select_best, full.plot_x, full.plot_x_values)
    assert (tiny.compare or {}).get("axis") == (full.compare or {}).get("axis")
    out = tmp_path / name
    result = CliRunner().invoke(app, ["ablate", str(RECIPES / "cpu" / f"{name}.toml"), "--out", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows and all(r["status"] == "ok" and r["test_metric"] != "" for r in rows)
    text = (out / "summary.md").read_text()
    assert "on the test stream" in text
    if full.select_best:
        assert "chosen on valid" in text
    if full.compare:
        assert "## Comparisons" in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["compare"] == tiny.compare and plan["plot_x_values"] == tiny.plot_x_values


def test_tasks_with_opposite_metrics_summarise_together(tmp_path):
    """MQAR (accuracy, higher is better) and text (bits per character, lower is better) in one ablation: each
    configuration is selected and compared in its own direction, and the table names each row's metric."""
    text = [{**row("gated_delta", lr, s, v, t), "task": "text", "metric_name": "bits_per_character",
             "higher_is_better": False} for lr, s, v, t in
            [(0.1, 0, 2.0, 2.0), (0.1, 1, 2.1, 2.1), (0.01, 0, 1.5, 1.6), (0.01, 1, 1.6, 1.7)]]
    recall = [{**row("gated_delta", lr, s, v, t), "task": "mqar"} for lr, s, v, t in
              [(0.1, 0, 0.9, 0.9), (0.1, 1, 0.8, 0.8), (0.01, 0, 0.5, 0.5), (0.01, 1, 0.6, 0.6)]]
    ablation = Ablation("t", "", ["task", "rule", "lr"], "lr", None, rows=text + recall)
    best = {c.axes["task"]: c.axes["lr"] for c in select_best(ablation, group(ablation))}
    assert best == {"text": 0.01, "mqar": 0.1}   # lowest bits per character, highest accuracy
    summary = summary_markdown(ablation, tmp_path)
    assert "bits_per_character (lower is better) and accuracy (higher is better)" in summary
    assert "| text | gated_delta | 0.01 | bits_per_character | 1.650 ± 0.071 (spread!) |" in summary
