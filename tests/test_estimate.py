"""The ablation time estimate comes from costs measured here (start-up included) and is within 2x of the
real time on the CPU."""

from __future__ import annotations

import time

from test_ablate import TINY_BASE, invoke, write

from sandbox.ablate import Costs, PlannedRun, ablate, estimate_seconds, load_recipe, measure_costs, plan_runs
from sandbox.threads import default_threads


def test_estimate_is_within_2x_of_the_real_time(tmp_path):
    recipe = write(tmp_path / "tiny.toml", TINY_BASE.replace("steps = 4", "steps = 30") +
                   '[grid]\nrule = ["delta", "momentum_delta"]\n')
    pending = plan_runs(load_recipe(recipe))
    costs = measure_costs(pending, default_threads())
    estimate, basis = estimate_seconds(pending, [], 1, costs, cores=1)
    assert costs.startup > 0 and "start-up" in basis

    start = time.perf_counter()
    ablate(recipe, tmp_path / "ablation", jobs=1)
    real = time.perf_counter() - start
    assert real / 2 <= estimate <= 2 * real, (estimate, real, costs)


def test_probe_estimate_counts_start_up_evaluations_and_parallel_runs():
    costs = Costs(startup=5.0, step=0.1, units=64 * 64 * 2 * 128 ** 2, probed="probe")
    run = PlannedRun("r", {"steps": 400, "eval_every": 100, "eval_batches": 3}, {}, 0)   # the defaults otherwise
    assert costs.run_seconds(run.config) == 5.0 + 400 * 0.1 + 3 * 3 * 0.1 / 3
    two = [run, PlannedRun("s", run.config, {}, 1)]
    assert estimate_seconds(two, [], jobs=2, costs=costs, cores=2)[0] == costs.run_seconds(run.config)
    assert estimate_seconds(two, [], jobs=2, costs=costs, cores=1)[0] == 2 * costs.run_seconds(run.config)


def test_dry_run_prints_the_measured_estimate(tmp_path):
    recipe = write(tmp_path / "tiny.toml", TINY_BASE + '[grid]\nrule = ["delta", "no_such_rule"]\n')
    dry = invoke("ablate", recipe, "--out", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "estimate: about" in dry.output and "measured here: start-up" in dry.output
    assert "rule=delta__seed=0" in dry.output.split("per step of")[1]   # the bad grid point is not probed
    assert not (tmp_path / "out").exists()
