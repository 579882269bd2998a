"""`sandbox ablate`, `sandbox report`, `sandbox compare`: recipes, a tiny real ablation, resume, failures.

The end-to-end test launches real `sandbox run` subprocesses on a tiny model (a few steps on CPU), so it
checks the whole path: recipe -> run configs -> run folders -> summaries.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandbox.ablate import load_recipe, plan_runs
from sandbox.cli import app
from sandbox.config import resolve_config
from sandbox.report import Ablation, compare, group, load_ablation, select_best
from sandbox.train import build_model, resolve_task

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

TINY_BASE = """
[base]
task = "mqar"
seq_len = 16
d_model = 8
layers = 1
heads = 1
steps = 4
batch_size = 4
warmup_steps = 1
eval_every = 2
eval_batches = 1
log_every = 2
checkpoint_every = 4
device = "cpu"
impl = "chunk"
chunk_size = 8
[base.task_args]
vocab_size = 16
num_kv_pairs = 2
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(map(str, args)))


@pytest.mark.parametrize("recipe, key", [
    ('seeds = [0]\ncolour = "red"\n[grid]\nrule = ["delta"]\n', "colour"),
    ('[grid]\nrule = ["delta"]\nlearning_rate = [0.1]\n', "grid.learning_rate"),
    ('[grid]\nrule = "delta"\n', "grid.rule"),
    ('[grid]\nrule = []\n', "grid.rule"),
    ('[grid]\nseed = [0, 1]\n', "grid.seed"),
    ('[base]\nout = "x"\n[grid]\nrule = ["delta"]\n', "base.out"),
    ('[base]\nd_modle = 8\n[grid]\nrule = ["delta"]\n', "base.d_modle"),
    ('seeds = [0, 0]\n[grid]\nrule = ["delta"]\n', "seeds"),
    ('select_best = "lr"\n[grid]\nrule = ["delta"]\n', "select_best"),
    ('plot_x = "d_model"\n[grid]\nrule = ["delta"]\n', "plot_x"),
    ('[base]\nsteps = 4\n', "grid"),
    ('base = "missing.toml"\n[grid]\nrule = ["delta"]\n', "base.config"),
    ('[grid\nrule = ["delta"]\n', "recipe"),
])
def test_bad_recipe_names_the_key(tmp_path, recipe, key):
    path = write(tmp_path / "bad.toml", recipe)
    with pytest.raises(ValueError, match=f"^{key}"):
        load_recipe(path)
    result = invoke("ablate", path, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}")
    assert not (tmp_path / "out").exists()


def test_grid_product_union_and_names(tmp_path):
    write(tmp_path / "base.toml", 'task = "mqar"\nsteps = 7\nlr = 0.01\n')
    recipe = load_recipe(write(tmp_path / "r.toml", """
base = "base.toml"
seeds = [0, 1]
[[grid]]
rule = ["delta", "gated_delta"]
lr = [0.01, 0.001]
[[grid]]
rule = ["momentum_delta"]
stability_constraint = [true, false]
"task_args.num_kv_pairs" = [2]
"""))
    runs = plan_runs(recipe)
    assert len(runs) == (2 * 2 + 2) * 2
    assert recipe.axes == ["rule", "lr", "stability_constraint", "task_args.num_kv_pairs"]
    first = runs[0]
    assert first.name == "rule=delta__lr=0.01__seed=0"
    assert first.config == {"task": "mqar", "steps": 7, "lr": 0.01, "rule": "delta", "seed": 0}
    last = runs[-1]
    assert last.name == "rule=momentum_delta__stability_constraint=false__num_kv_pairs=2__seed=1"
    assert last.config["task_args"] == {"num_kv_pairs": 2} and last.config["stability_constraint"] is False
    # The same configuration reached from two grids runs once.
    again = load_recipe(write(tmp_path / "r2.toml", '[[grid]]\nrule = ["delta"]\n[[grid]]\nrule = ["delta", "linear"]\n'))
    assert [run.name for run in plan_runs(again)] == ["rule=delta__seed=0", "rule=linear__seed=0"]


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    runs = plan_runs(recipe)
    assert len(runs) >= len(recipe.seeds) * 2
    assert len({run.name for run in runs}) == len(runs)
    models = set()
    for run in runs:  # every run's config, task arguments and model pass the checks `sandbox run` makes
        config, task = resolve_task(resolve_config(run.config))
        shape = (config.rule, task.vocab_size, config.d_model, config.layers, config.heads)
        if shape not in models:
            models.add(shape)
            build_model(config, task, impl="chunk")


def test_text_recipe_matches_parameter_counts():
    counts = {}
    for run in plan_runs(load_recipe(RECIPES / "text.toml")):
        config, task = resolve_task(resolve_config(run.config))
        counts[config.rule] = build_model(config, task, impl="chunk").parameter_count()
    assert len(counts) == 7 and max(counts.values()) / min(counts.values()) < 1.04, counts


def test_tiny_ablation_resume_failure_report_compare(tmp_path):
    recipe = write(tmp_path / "tiny.toml", 'seeds = [0, 1]\nplot_x = "rule"\n' + TINY_BASE +
                   '[grid]\nrule = ["delta", "gated_delta", "no_such_rule"]\n')
    out = tmp_path / "ablation"

    dry = invoke("ablate", recipe, "--out", out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "6 runs (3 configurations x 2 seeds), 0 finished, 6 to run" in dry.output
    assert "estimate: about" in dry.output and not out.exists()

    first = invoke("ablate", recipe, "--out", out, "--jobs", "2")
    assert first.exit_code == 1, first.output   # two runs failed; the summaries are written all the same
    assert "error: 2 of 6 run(s) failed" in first.output
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rule"], r["seed"], r["status"]) for r in rows] == [
        ("delta", "0", "ok"), ("delta", "1", "ok"), ("gated_delta", "0", "ok"), ("gated_delta", "1", "ok"),
        ("no_such_rule", "0", "failed"), ("no_such_rule", "1", "failed")]
    for row in rows[:4]:
        results = json.loads((out / row["folder"] / "results.json").read_text())
        assert float(row["final_metric"]) == results["final_metric"] and row["metric_name"] == "accuracy"
        assert (out / row["folder"] / "config.toml").is_file()
    failed_log = (out / rows[4]["log"]).read_text()
    assert "rule" in failed_log and failed_log.rstrip().endswith("exit code: 2")

    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out / "summary.png").is_file() == has_matplotlib
    assert has_matplotlib or 'pip install -e ".[plot]"' in first.output

    summary = (out / "summary.md").read_text()
    # The tables report the test metric (valid beside it); a configuration without results has only dashes.
    delta = [json.loads((out / r["folder"] / "results.json").read_text())["test_metric"] for r in rows[:2]]
    assert f"| delta | {sum(delta) / 2:.3f} ± " in summary
    assert "| no_such_rule | - | - | - | - | - | - | 0/2 |" in summary
    assert "`rule=no_such_rule__seed=0` failed" in summary and "unknown rule 'no_such_rule'" in summary

    # Resume: finished runs are not run again (their results stay untouched), failed ones are retried, and a
    # run stopped after a checkpoint (here: its results.json removed) continues in its own folder.
    stamps = {r["folder"]: (out / r["folder"] / "results.json").stat().st_mtime_ns for r in rows[:3]}
    (out / rows[3]["folder"] / "results.json").unlink()
    second = invoke("ablate", recipe, "--out", out)
    assert second.exit_code == 1, second.output
    assert "3 finished, 3 to run (1 from a checkpoint)" in second.output
    assert {f: (out / f / "results.json").stat().st_mtime_ns for f in stamps} == stamps
    assert (out / rows[3]["folder"] / "results.json").is_file()
    assert "--resume" in (out / rows[3]["log"]).read_text()
    assert (out / rows[4]["log"]).read_text().count("exit code: 2") == 2
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(Path(r["folder"]).name for r in rows[:4])

    # A changed recipe does not silently reuse runs made with other settings.
    write(recipe, recipe.read_text().replace("steps = 4", "steps = 5"))
    changed = invoke("ablate", recipe, "--out", out)
    assert changed.exit_code == 2 and "steps = 4 but the recipe now says 5" in changed.output

    # Report rebuilds the same tables; it also reads a plain folder of runs (axes = keys that differ).
    before = (out / "summary.csv").read_text(), summary
    (out / "summary.csv").unlink()
    (out / "summary.md").unlink()
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    assert ((out / "summary.csv").read_text(), (out / "summary.md").read_text()) == before
    plain = load_ablation(out / "runs")
    assert plain.axes == ["rule"]
    assert sorted(row["rule"] for row in plain.rows) == ["delta", "delta", "gated_delta", "gated_delta"]
    assert invoke("report", tmp_path / "nowhere").exit_code == 2

    # Compare names the differing config key and the results of both runs.
    run_a, run_b = out / rows[0]["folder"], out / rows[2]["folder"]
    text = compare(run_a, run_b)
    assert any(line.split() == ["rule", "delta", "gated_delta"] for line in text.splitlines())
    assert "final_metric" in text and "parameters" in text
    result = invoke("compare", run_a, run_b)
    assert result.exit_code == 0 and result.output.strip() == text
    bad = invoke("compare", run_a, tmp_path)
    assert bad.exit_code == 2 and bad.output.startswith("error: B:")


def test_select_best_per_configuration():
    def row(rule, lr, seed, metric, loss, higher_is_better=True):
        return {"rule": rule, "lr": lr, "seed": seed, "status": "ok", "metric_name": "m", "final_metric": metric,
                "final_loss": loss, "higher_is_better": higher_is_better}

    ablation = Ablation("t", "", ["rule", "lr"], "lr", None, rows=[
        row("delta", 0.01, 0, 0.5, 1.0), row("delta", 0.01, 1, 0.7, 1.0),   # mean 0.6
        row("delta", 0.1, 0, 0.9, 0.5), row("delta", 0.1, 1, 0.1, 0.5),     # mean 0.5
        row("linear", 0.01, 0, 1.0, 0.2), row("linear", 0.1, 0, 1.0, 0.1),  # tie: lower loss wins
    ])
    best = select_best(ablation, group(ablation))
    assert [(c.axes["rule"], c.axes["lr"]) for c in best] == [("delta", 0.01), ("linear", 0.1)]
    assert best[0].mean("final_metric") == pytest.approx(0.6) and best[0].std("final_metric") == pytest.approx(0.1414, abs=1e-4)
    for r in ablation.rows:  # the same numbers as a loss-like metric: the lowest mean wins
        r["higher_is_better"] = False
    best = select_best(ablation, group(ablation))
    assert [(c.axes["rule"], c.axes["lr"]) for c in best] == [("delta", 0.1), ("linear", 0.1)]


def test_estimate_uses_the_measured_cost_per_step_and_start_up():
    from sandbox.ablate import PlannedRun, estimate_seconds

    def run(name, **config):
        return PlannedRun(name, {"device": "cuda", **config}, {}, 0)

    # A finished default run: 400 steps of 64 x 64 tokens at 1.024M tokens/s (4 ms a step), 30 s wall.
    finished = [(run("a", steps=400), {"wall_seconds": 30.0, "steps": 400, "seq_len": 64, "tokens_per_second": 1.024e6})]
    seconds, basis = estimate_seconds([run("b", steps=1000), run("c", steps=400, seed=1)], finished, jobs=2)
    startup = 30.0 - 400 * 0.004
    assert seconds == pytest.approx((startup + 1000 * 0.004 + startup + 400 * 0.004) / 2)
    assert basis.startswith("measured: 1 finished run(s)")
    # Another shape: the measured step scaled by the cost model's ratio, so a wider model costs more.
    wide, _ = estimate_seconds([run("d", steps=400, d_model=512)], finished, jobs=1)
    assert wide > startup + 400 * 0.004


def test_default_jobs_packs_runs_by_free_gpu_memory_and_cores(monkeypatch):
    import torch

    from sandbox.ablate import default_jobs

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert default_jobs([]) == (1, "no GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: ((70 if index else 5) * 2**30, 80 * 2**30))
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    jobs, why = default_jobs([])
    assert jobs == 2 * 2 and "2 GPU(s) x 2 runs" in why       # 5 GiB free on the fullest GPU, 2 GiB a run
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (70 * 2**30, 80 * 2**30))
    assert default_jobs([])[0] == 2 * 12                        # at most RUNS_PER_GPU
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert default_jobs([])[0] == 2 * 2                         # no more than the cores
