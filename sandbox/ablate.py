"""``sandbox ablate``: run a grid of training runs described by a recipe, then summarise them.

A recipe is a TOML file with a base run configuration and the axes to vary::

    name = "quick"                      # optional, default: the file name
    description = "one line for the summary"
    seeds = [0, 1, 2]                   # every configuration runs once per seed
    select_best = "lr"                  # optional: per configuration, the value of this axis that scores best
                                        # on the valid stream; the summary reports its test metric
    plot_x = "d_model"                  # optional: x axis of summary.png
    plot_x_values = "state_size"        # optional: place plot_x's points at this result instead
                                        # (state_size or parameters), e.g. accuracy against state size

    [compare]                           # optional: differences with a 95% interval and Welch's test
    axis = "rule"
    pairs = [["gated_delta", "momentum_delta"]]   # (a, b): b - a, per setting of the other axes
    # or: reference = "gated_delta"     # every other value of the axis against this one

    [base]                              # keys of sandbox.config.RunConfig, like the `sandbox run` flags
    config = "file.toml"                # optional, a run config file that the other keys override
    task = "mqar"
    steps = 2000
    [base.task_args]
    num_kv_pairs = 4

    [grid]                              # lists; the runs are their Cartesian product
    rule = ["delta", "gated_delta"]
    lr = [1e-3, 3e-3]
    "task_args.num_kv_pairs" = [4, 8]

``base = "file.toml"`` is short for ``[base] config = "file.toml"``. Several ``[[grid]]`` tables instead of
one ``[grid]`` give the union of their products, for axes that only mean something for some rules (the
stability constraint only exists for the momentum rules).

Each run is its own ``sandbox run`` subprocess, so the ablation does not depend on the training code's
internals and ``--jobs N`` is just N subprocesses, spread over the GPUs, each with its share of the idle CPU
cores. By default ``--jobs`` packs several runs onto each GPU (``default_jobs``): a tiny run leaves its GPU
idle most of its wall time (start-up, kernel compilation, evaluation), so a few at a time finish the ablation
sooner. ``--backend ray`` starts the same subprocesses inside Ray tasks instead, across the GPUs and machines
of a Ray cluster (``sandbox/ray_backend.py``). The runs end with the ablation: killed, it leaves no training
behind (see ``end_with_parent``). Layout of an ablation folder
(``sandbox.runfolder`` owns its files)::

    plan.json            the planned runs (name, configuration, axes); `sandbox report` reads only these runs
    configs/NAME.toml    the resolved run config handed to `sandbox run --config`
    logs/NAME.log        the run's stdout and stderr, ending with its exit code
    runs/NAME/           the run folder (config.toml, metrics.jsonl, results.json, TensorBoard events)
    incomplete/NAME-N/   a run folder set aside because its run stopped before its first checkpoint
    summary.csv, summary.md, summary.png, summaries.json (what `sandbox report` wrote)

``--out`` must be a new or empty folder, or an ablation folder of the same recipe (it then resumes); one
``sandbox ablate`` at a time works in a folder. The command exits with code 1 if any run failed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
from tqdm import tqdm

from sandbox.config import FIELD_TYPES, RunConfig, check_type, flatten, load_config, read_toml, resolve_config
from sandbox.errors import fail
from sandbox.ray_backend import import_ray, run_on_ray
from sandbox.report import SUMMARY_FILES, format_duration, format_value, write_summaries
from sandbox.runfolder import (CHECKPOINT, CONFIG, LOCK, FolderLock, ablation_run_folder, check_summaries_replaceable,
                               is_locked, read_plan, read_results, read_run_config, save_config_file, write_plan)
from sandbox.threads import default_threads, usable_cores

if TYPE_CHECKING:
    from sandbox.tasks.base import Task

RECIPE_KEYS = ("name", "description", "base", "seeds", "grid", "select_best", "plot_x", "plot_x_values", "compare")
PLOT_X_VALUES = ("state_size", "parameters")   # results that can stand in for plot_x's values
# The ablation owns these: one folder per run, one seed per entry of `seeds`.
RESERVED_KEYS = {"out": "the ablation chooses each run's folder", "seed": "use seeds = [...] at the top level"}
# Set in the environment of each run: the ablation's pid, so that the run ends when the ablation does.
PARENT_PID_VARIABLE = "SANDBOX_ABLATE_PID"
BACKENDS = ("local", "ray")
# `--dry-run` measures what runs cost here (see ``measure_costs``): a run of PROBE_STEPS steps, whose own
# tokens/s give the time of a step, and whose time from start to end less its steps gives the start-up
# (Python, imports, building the model, the first step's warm-up, the final evaluation and checkpoint).
PROBE_STEPS = 6
# A rough cost model for `--dry-run`: seconds per run = start-up + steps x (per-step overhead + tokens per
# step x layers x d_model^2 x seconds per unit), about 80 flops per unit for forward and backward. Once runs
# of the ablation have finished, the estimate is rescaled by how far off the model was for them.
ROUGH_COST = {  # device: (start-up s, overhead s/step, s per token x layer x d_model^2)
    "cuda": (40.0, 0.0025, 4e-12),  # one H100, the default run captured as a CUDA graph: 2.9 ms/step, 44 s cold
    "cpu": (5.0, 0.005, 8e-9),     # one busy 2-core machine: 400 steps of mqar at d_model 64 took 120 s (model: 114 s)
}


# At most, by default. A tiny run spends most of its wall time starting (imports, CUDA context, loading the
# kernels: ~10 s of one core) and little on the GPU, so many runs per GPU keep it busy; their GPU work is
# time-sliced between the processes, so beyond the CPU cores more runs buy nothing.
RUNS_PER_GPU = 12
RUN_OVERHEAD_BYTES = 2 * 2**30    # one run's CUDA context, kernels and allocator slack, beyond its tensors


@dataclass
class Recipe:
    name: str
    description: str
    base: dict                    # RunConfig keys (task_args nested), without out and seed
    grids: list[dict[str, list]]  # flat axis keys ("lr", "task_args.num_kv_pairs") -> values
    seeds: list[int]
    select_best: str | None
    plot_x: str | None
    plot_x_values: str | None = None
    compare: dict | None = None   # {"axis": key, "pairs": [[a, b], ...]}, reference expanded into pairs

    @property
    def axes(self) -> list[str]:
        """Every grid key, in order of first appearance."""
        return list(dict.fromkeys(key for grid in self.grids for key in grid))


@dataclass
class PlannedRun:
    name: str    # folder name, derived from the axes and the seed
    config: dict  # what goes into configs/NAME.toml
    axes: dict    # grid key -> value
    seed: int


def _check_key(where: str, key: str) -> None:
    if key in RESERVED_KEYS:
        raise ValueError(f"{where}{key}: not allowed in a recipe ({RESERVED_KEYS[key]})")
    names = [f.name for f in fields(RunConfig)]
    if key.startswith("task_args."):
        if len(key) == len("task_args."):
            raise ValueError(f"{where}{key}: expected task_args.NAME")
        return
    if key not in names:
        raise ValueError(f"{where}{key}: unknown key, expected one of: {', '.join(n for n in names if n not in RESERVED_KEYS)}")


def _check_scalar(where: str, value: object) -> None:
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"{where}: expected a string, number or boolean, got {type(value).__name__}")


def _check_run_value(where: str, key: str, value: object) -> None:
    """The type a run config key takes (task parameters are the task's to check, when the run starts)."""
    if key.startswith("task_args."):
        return
    try:
        check_type(key, value)
    except ValueError:
        raise ValueError(f"{where}: expected {FIELD_TYPES[key].__name__}, got {value!r}") from None


def _load_base(base: object, recipe_dir: Path) -> dict:
    if isinstance(base, str):
        base = {"config": base}
    if not isinstance(base, dict):
        raise ValueError(f"base: expected a table of run-config keys or a file name, got {type(base).__name__}")
    resolved: dict = {"task_args": {}}
    if "config" in base:
        path = recipe_dir / str(base["config"])
        if not path.is_file():
            raise ValueError(f"base.config: file not found: {path}")
        from_file = load_config(path)
        # A resolved run config names its own seed and folder; the ablation sets both.
        resolved.update({k: v for k, v in from_file.items() if k not in RESERVED_KEYS})
        resolved["task_args"] = dict(from_file.get("task_args") or {})
    for key, value in base.items():
        if key == "config":
            continue
        if key == "task_args":
            if not isinstance(value, dict):
                raise ValueError(f"base.task_args: expected a table, got {type(value).__name__}")
            resolved["task_args"].update(value)
            continue
        _check_key("base.", key)
        _check_scalar(f"base.{key}", value)
        _check_run_value(f"base.{key}", key, value)
        resolved[key] = value
    return resolved


def _load_grid(where: str, grid: object) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{where}: expected a table of lists, e.g. rule = [\"delta\", \"gated_delta\"]")
    for key, values in grid.items():
        if key == "task_args" and isinstance(values, dict):
            raise ValueError(f"{where}.task_args: write task_args axes as \"task_args.NAME\" = [...]")
        _check_key(f"{where}.", key)
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.{key}: expected a non-empty list, got {values!r}")
        for value in values:
            _check_scalar(f"{where}.{key}", value)
            _check_run_value(f"{where}.{key}", key, value)
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"{where}.{key}: repeated value in {values!r}")
    return dict(grid)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; a mistake raises ValueError naming the key."""
    path = Path(path)
    raw = read_toml(path, "recipe")
    for key in raw:
        if key not in RECIPE_KEYS:
            raise ValueError(f"{key}: unknown recipe key, expected one of: {', '.join(RECIPE_KEYS)}")

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"name: expected letters, digits, '.', '_' or '-', got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"description: expected a string, got {type(description).__name__}")
    base = _load_base(raw.get("base", {}), path.parent)

    grid = raw.get("grid")
    if grid is None:
        raise ValueError("grid: missing; a recipe needs at least one axis, e.g. [grid] rule = [\"delta\"]")
    if isinstance(grid, list):
        if not grid:
            raise ValueError("grid: expected at least one [[grid]] table")
        grids = [_load_grid(f"grid[{i}]", g) for i, g in enumerate(grid)]
    else:
        grids = [_load_grid("grid", grid)]

    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"seeds: expected a non-empty list of distinct integers, got {seeds!r}")

    recipe = Recipe(name, description, base, grids, seeds, raw.get("select_best"), raw.get("plot_x"),
                    raw.get("plot_x_values"))
    for key in ("select_best", "plot_x"):
        value = getattr(recipe, key)
        if value is not None and value not in recipe.axes:
            raise ValueError(f"{key}: expected one of the grid axes ({', '.join(recipe.axes)}), got {value!r}")
    if recipe.plot_x_values is not None:
        if recipe.plot_x_values not in PLOT_X_VALUES:
            raise ValueError(f"plot_x_values: expected one of {', '.join(PLOT_X_VALUES)}, got {recipe.plot_x_values!r}")
        if recipe.plot_x is None:
            raise ValueError("plot_x_values: needs plot_x, the axis whose points it places")
    if "compare" in raw:
        recipe.compare = _load_compare(raw["compare"], recipe)
    return recipe


def _load_compare(compare: object, recipe: Recipe) -> dict:
    """``[compare]``: an axis and the pairs of its values to compare (``reference`` = every value against one)."""
    if not isinstance(compare, dict):
        raise ValueError("compare: expected a table with axis and pairs (or reference)")
    unknown = set(compare) - {"axis", "pairs", "reference"}
    if unknown:
        raise ValueError(f"compare.{sorted(unknown)[0]}: unknown key, expected axis, pairs or reference")
    axis = compare.get("axis")
    if axis not in recipe.axes:
        raise ValueError(f"compare.axis: expected one of the grid axes ({', '.join(recipe.axes)}), got {axis!r}")
    if axis == recipe.select_best:
        raise ValueError(f"compare.axis: '{axis}' is the select_best axis, whose best value is already chosen")
    values = [value for grid in recipe.grids for value in grid.get(axis, [])]
    if ("pairs" in compare) == ("reference" in compare):
        raise ValueError("compare: expected exactly one of pairs = [[a, b], ...] or reference = value")
    if "reference" in compare:
        reference = compare["reference"]
        if reference not in values:
            raise ValueError(f"compare.reference: expected one of the values of {axis} ({values}), got {reference!r}")
        pairs = [[reference, value] for value in dict.fromkeys(values) if value != reference]
    else:
        pairs = compare["pairs"]
        if not isinstance(pairs, list) or not pairs or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f"compare.pairs: expected a list of [a, b] pairs, got {pairs!r}")
        for pair in pairs:
            for value in pair:
                if value not in values:
                    raise ValueError(f"compare.pairs: {value!r} is not a value of {axis} ({values})")
    return {"axis": axis, "pairs": pairs}


def run_name(axes: dict, seed: int) -> str:
    """A stable, readable folder name, e.g. ``rule=delta__lr=0.001__seed=0``."""
    parts = [f"{key.removeprefix('task_args.')}={format_value(value)}" for key, value in axes.items()]
    parts.append(f"seed={seed}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "__".join(parts))


def plan_runs(recipe: Recipe) -> list[PlannedRun]:
    """Every (grid point, seed) of the recipe, in order; identical configurations are run once."""
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for grid in recipe.grids:
        for values in product(*grid.values()):
            axes = dict(zip(grid, values))
            for seed in recipe.seeds:
                config = json.loads(json.dumps(recipe.base))  # a deep copy of plain data
                for key, value in axes.items():
                    if key.startswith("task_args."):
                        config["task_args"][key.removeprefix("task_args.")] = value
                    else:
                        config[key] = value
                config["seed"] = seed
                if not config["task_args"]:
                    del config["task_args"]
                fingerprint = json.dumps(config, sort_keys=True)
                if fingerprint in seen:
                    continue
                seen.add(fingerprint)
                runs.append(PlannedRun(run_name(axes, seed), config, axes, seed))
    names = [run.name for run in runs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ValueError(f"grid: two different configurations would share the folder '{duplicate}'; "
                         "give the [[grid]] tables the same keys")
    return runs


def check_resume(run: PlannedRun, folder: Path) -> None:
    """Refuse to reuse (or continue) a run whose configuration no longer matches the recipe."""
    done = flatten(read_run_config(folder))
    for key, wanted in flatten(run.config).items():
        if key in done and done[key] != wanted:
            raise ValueError(f"{folder} was run with {key} = {done[key]!r} but the recipe now says {wanted!r}; "
                             "choose another --out to keep both")


def with_defaults(config: dict) -> dict:
    """A planned run's keys over RunConfig's defaults (a recipe names only what it changes)."""
    return {**RunConfig().to_dict(), **config}


def planned_task(config: dict) -> Task | None:
    """The task a planned run (its keys over the defaults) would build, or None if its task keys are invalid
    (that run will stop at its bad value)."""
    from sandbox.tasks import create_task

    try:
        return create_task(config["task"], config["task_args"], seq_len=config["seq_len"])
    except ValueError:
        return None


def work_units(config: dict) -> float | None:
    """Tokens per step x layers x d_model^2, which a step's time is taken proportional to when one measured
    configuration stands for the others; None if the config's task is invalid (that run will fail at once)."""
    config = with_defaults(config)
    task = planned_task(config)
    if task is None:
        return None
    return config["batch_size"] * task.seq_len * config["layers"] * config["d_model"] ** 2


def modeled_seconds(config: dict) -> float:
    """Seconds one run should take according to ROUGH_COST (config: the planned keys, defaults for the rest)."""
    config = with_defaults(config)
    device = config["device"]
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    startup, overhead, per_unit = ROUGH_COST["cpu" if device == "cpu" else "cuda"]
    units = work_units(config)
    if units is None:
        return startup  # the run will stop at its bad value
    return startup + config["steps"] * (overhead + units * per_unit)


def probe_run(config: dict, threads: int) -> tuple[float, dict]:
    """A `sandbox run` subprocess of ``config`` cut to PROBE_STEPS steps: the seconds it took here from start
    to end, and its results (whose tokens/s time the steps alone, the first one left out)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        probe = {**with_defaults(config), "steps": PROBE_STEPS, "warmup_steps": 0,
                 "eval_every": PROBE_STEPS, "checkpoint_every": PROBE_STEPS}
        save_config_file(RunConfig(**probe), Path(scratch) / "probe.toml")
        command = [sys.executable, "-m", "sandbox", "run", "--config", str(Path(scratch) / "probe.toml"),
                   "--out", str(Path(scratch) / "run")]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ValueError(f"estimate: a {PROBE_STEPS}-step probe run of the first pending configuration failed: {last}")
        return seconds, read_results(Path(scratch) / "run")


@dataclass
class Costs:
    """What one run costs here, measured by a probe run of one configuration."""

    startup: float           # seconds outside the training steps: start-up, final evaluation, checkpoint
    step: float              # seconds per training step of the probed configuration
    units: float             # its work_units, to scale the step time to other configurations
    probed: str              # the name of the run whose configuration was probed

    def run_seconds(self, config: dict) -> float:
        config = with_defaults(config)
        units = work_units(config)
        if units is None:
            return self.startup
        step = self.step * units / self.units
        # Evaluations: eval_batches forward passes (about a third of a training step each) every eval_every
        # steps; the probes included the last one in the start-up.
        evaluations = max(0, config["steps"] // config["eval_every"] - 1) * config["eval_batches"] * step / 3
        return self.startup + config["steps"] * step + evaluations


def measure_costs(pending: list[PlannedRun], threads: int) -> Costs | None:
    """Start-up and step cost here, from a probe run of the first pending run with a valid config (None if none)."""
    def valid(run: PlannedRun) -> bool:
        try:
            resolve_config(run.config)
        except ValueError:
            return False
        return work_units(run.config) is not None

    probed = next((run for run in pending if valid(run)), None)
    if probed is None:
        return None
    seconds, results = probe_run(probed.config, threads)
    step = _step_seconds(probed.config, results)
    return Costs(startup=max(seconds - PROBE_STEPS * step, 0.0), step=step, units=work_units(probed.config),
                 probed=probed.name)


def estimate_seconds(pending: list[PlannedRun], finished: list[tuple[PlannedRun, dict]], jobs: int,
                     costs: Costs | None = None, cores: int | None = None) -> tuple[float, str]:
    """Wall-clock estimate for the pending runs, and what it is based on.

    Once runs have finished, each pending run costs the finished runs' median start-up (wall time not spent
    in training steps) plus its steps at the measured cost per step of the finished run most like it (same
    model and batch shape if there is one, else scaled by the cost model's per-step ratio). Before that, the
    ``costs`` a probe run measured here (``measure_costs``), or without them the rough cost model. The sum is
    shared among ``jobs`` runs at a time, and on a CPU among at most its ``cores``.
    """
    share = max(1, min(jobs, max(len(pending), 1), cores or jobs))
    if not finished:
        if costs is not None:
            total = sum(costs.run_seconds(run.config) for run in pending)
            return total / share, (f"measured here: start-up {costs.startup:.1f} s, {costs.step:.3g} s per step "
                                   f"of {costs.probed}")
        total = sum(modeled_seconds(run.config) for run in pending)
        return total / share, "rough cost model, no run has finished yet"
    measured = []   # (run, seconds per step, start-up seconds)
    for run, results in finished:
        step_seconds = _step_seconds(run.config, results)
        measured.append((run, step_seconds, max(0.0, results["wall_seconds"] - results["steps"] * step_seconds)))
    startup = statistics.median(m[2] for m in measured)

    def pending_seconds(run: PlannedRun) -> float:
        config = with_defaults(run.config)
        same = [m for m in measured if _shape(m[0].config) == _shape(run.config)]
        if same:
            step = statistics.median(m[1] for m in same)
        else:
            step = statistics.median(m[1] * _modeled_step(run.config) / _modeled_step(m[0].config) for m in measured)
        return startup + config["steps"] * step

    total = sum(pending_seconds(run) for run in pending)
    return total / share, (f"measured: {len(finished)} finished run(s), start-up {format_duration(startup)}, "
                           "their cost per step")


def _shape(config: dict) -> tuple:
    """What a step's cost depends on: the rule and the model and batch sizes."""
    config = with_defaults(config)
    return tuple(json.dumps(config[key], sort_keys=True) for key in
                 ("rule", "task", "task_args", "seq_len", "d_model", "layers", "heads", "batch_size", "impl", "device"))


def _modeled_step(config: dict) -> float:
    config = with_defaults(config)
    return max(modeled_seconds({**config, "steps": 1}) - modeled_seconds({**config, "steps": 0}), 1e-9)


def _step_seconds(config: dict, results: dict) -> float:
    """A finished run's measured seconds per training step (from its tokens per second)."""
    config = with_defaults(config)
    return config["batch_size"] * results["seq_len"] / results["tokens_per_second"]


def default_jobs(pending: list[PlannedRun]) -> tuple[int, str]:
    """Runs at a time when ``--jobs`` is not given, and why: one on a CPU-only machine; with GPUs, up to
    ``RUNS_PER_GPU`` per GPU, as many as the free memory of the fullest GPU holds (at the largest pending
    run's estimated need plus ``RUN_OVERHEAD_BYTES``) and no more than the CPU cores."""
    import torch

    from sandbox.train import estimate_training_bytes

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return 1, "no GPU"
    free = min(torch.cuda.mem_get_info(index)[0] for index in range(gpus))
    need = RUN_OVERHEAD_BYTES
    for run in pending:
        config = with_defaults(run.config)
        task = planned_task(config)
        if task is None:
            continue   # that run will stop at its bad value
        sizes = {"d_model": config["d_model"], "layers": config["layers"], "batch_size": config["batch_size"],
                 "seq_len": task.seq_len, "vocab_size": task.vocab_size}
        need = max(need, RUN_OVERHEAD_BYTES + estimate_training_bytes(sizes, config["heads"], config["chunk_size"]))
    per_gpu = max(1, min(RUNS_PER_GPU, free // need, (os.cpu_count() or 1) // gpus))
    return gpus * per_gpu, (f"{gpus} GPU(s) x {per_gpu} runs: {free / 2**30:.0f} GiB free on the fullest, "
                            f"about {need / 2**30:.1f} GiB a run, {os.cpu_count()} CPU cores")


def end_with_parent(parent_pid: int) -> None:
    """In a run started by ``sandbox ablate`` (pid ``parent_pid``): end this process when the ablation ends,
    however it ends (kill -9 included), so that no orphan keeps training and writing its run folder.

    Linux sends SIGTERM at the parent's death (prctl PR_SET_PDEATHSIG); elsewhere (macOS), and in case the
    parent died before that was set, a watchdog thread notices the new parent pid within a second.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="end-with-ablation", daemon=True).start()


def launch_run(arguments: list[str], log_path: Path, gpu: int | None, threads: int | None) -> int:
    """One `sandbox run ARGUMENTS` subprocess; its output goes to the log, its exit code is appended to it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_PID_VARIABLE: str(os.getpid())})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    command = [sys.executable, "-m", "sandbox", "run", *arguments]
    with open(log_path, "a") as log:  # append: an earlier failed attempt's log is kept
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        log.write(f"exit code: {code}\n")
    return code


class RunsFailed(RuntimeError):
    """Some runs of the ablation failed (the summaries are written all the same)."""


def check_out_folder(root: Path, recipe: Recipe) -> None:
    """``--out`` must be new, empty, or an ablation folder of this recipe whose summaries are ours to replace."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out: {root} exists and is not a folder")
    if not root.is_dir():
        return
    plan = read_plan(root)
    if plan is None:
        if any(path.name != LOCK for path in root.iterdir()):   # a lock alone: killed before it wrote the plan
            raise ValueError(f"--out: {root} is not empty and holds no ablation (no plan.json); "
                             "choose a new or empty folder")
        return
    if plan["recipe"] != recipe.name:
        raise ValueError(f"--out: {root} holds the ablation '{plan['recipe']}'; choose another folder for '{recipe.name}'")
    check_summaries_replaceable(root, list(SUMMARY_FILES))


def set_aside(folder: Path, root: Path) -> Path:
    """Move a run folder whose run stopped before its first checkpoint to incomplete/ (kept, not reused)."""
    target, suffix = root / "incomplete" / folder.name, 0
    target.parent.mkdir(exist_ok=True)
    while target.exists():
        suffix += 1
        target = root / "incomplete" / f"{folder.name}-{suffix}"
    folder.rename(target)
    return target


def ablate(recipe_path: str | Path, out: str | Path | None = None, jobs: int | None = None,
           dry_run: bool = False, backend: str = "local", address: str | None = None,
           gpus_per_run: float | None = None) -> Path:
    """Run (or with ``dry_run`` only list) every run of a recipe that has no results yet, then summarise.
    ``backend`` "local": ``jobs`` subprocesses at a time (``jobs=None``: ``default_jobs``); "ray": Ray tasks
    (see sandbox/ray_backend.py). Raises RunsFailed, after writing the summaries, if any run failed."""
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs: expected a positive integer, got {jobs!r}")
    if backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "local" and (address is not None or gpus_per_run is not None):
        raise ValueError(f"--{'address' if address is not None else 'gpus-per-run'}: only with --backend ray")
    if backend == "ray":
        if jobs is not None:
            raise ValueError("--jobs: with --backend ray the cluster runs as many runs at a time as its GPUs "
                             "(see --gpus-per-run) or CPUs allow; drop --jobs")
        import_ray()   # before any folder is made: a missing ray is one line
    recipe = load_recipe(recipe_path)
    runs = plan_runs(recipe)
    root = Path(out) if out is not None else Path("ablations") / recipe.name
    check_out_folder(root, recipe)

    finished, pending = [], []
    resumable: dict[str, Path] = {}
    for run in runs:
        folder = ablation_run_folder(root, run.name)
        results = read_results(folder)
        if results is not None:
            check_resume(run, folder)
            finished.append((run, results))
            continue
        pending.append(run)
        if is_locked(folder):
            raise ValueError(f"--out: {folder} is being written by another process; wait for it or stop it")
        if (folder / CHECKPOINT).is_file() and (folder / CONFIG).is_file():
            check_resume(run, folder)
            resumable[run.name] = folder

    configurations = len({json.dumps(flatten(run.config) | {"seed": None}, sort_keys=True) for run in runs})
    from_checkpoint = f" ({len(resumable)} from a checkpoint)" if resumable else ""
    print(f"recipe {recipe.name}: {len(runs)} runs ({configurations} configurations x {len(recipe.seeds)} seeds), "
          f"{len(finished)} finished, {len(pending)} to run{from_checkpoint}, in {root}")
    if jobs is None:
        jobs, why = default_jobs(pending)
        if backend == "local":
            print(f"--jobs {jobs} ({why})")
    if dry_run:
        pending_names = {run.name for run in pending}
        for run in runs:
            state = "resume " if run.name in resumable else "pending" if run.name in pending_names else "done   "
            print(f"  {state}  {run.name}")
        import torch

        threads = default_threads(jobs)
        costs = None if finished else measure_costs(pending, threads)   # finished runs measured it already
        # On the CPU the runs share its cores; on GPUs each job is taken to run at full speed.
        cores = jobs if torch.cuda.is_available() else usable_cores()
        seconds, basis = estimate_seconds(pending, finished, jobs, costs, cores)
        print(f"estimate: about {format_duration(seconds)} with --jobs {jobs}, {threads} thread(s) each ({basis})")
        return root

    import torch
    gpus = torch.cuda.device_count()
    machine = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU, {os.cpu_count()} cores"

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out: cannot create the folder {root} ({error.strerror})") from None
    lock = FolderLock(root, "--out", "running an ablation in")
    try:
        failed = _run_pending(recipe, runs, pending, resumable, root, jobs, gpus, machine,
                              (address, gpus_per_run) if backend == "ray" else None)
    finally:
        lock.release()
    if failed:
        raise RunsFailed(f"{failed} of {len(pending)} run(s) failed; their logs are under {root / 'logs'}, "
                         f"the summary is {root / 'summary.md'}")
    return root


def _run_pending(recipe: Recipe, runs: list[PlannedRun], pending: list[PlannedRun], resumable: dict[str, Path],
                 root: Path, jobs: int, gpus: int, machine: str, ray: tuple[str | None, float | None] | None) -> int:
    """Write the plan and run configs, run the pending runs (through Ray when ``ray`` is its address and GPU
    share), write the summaries; returns how many failed."""
    try:
        plan = {"recipe": recipe.name, "description": recipe.description, "axes": recipe.axes,
                "select_best": recipe.select_best, "plot_x": recipe.plot_x,
                "plot_x_values": recipe.plot_x_values, "compare": recipe.compare, "machine": machine,
                "runs": [{"name": r.name, "axes": r.axes, "seed": r.seed, "config": r.config} for r in runs]}
        write_plan(root, plan)
        for sub in ("configs", "logs", "runs"):
            (root / sub).mkdir(exist_ok=True)
        for run in pending:
            # Unchecked on purpose: `sandbox run` checks the values, so one bad grid point fails alone.
            save_config_file(RunConfig(**with_defaults(run.config)), root / "configs" / f"{run.name}.toml")
            folder = ablation_run_folder(root, run.name)
            if folder.exists() and run.name not in resumable:
                set_aside(folder, root)
    except OSError as error:
        raise ValueError(f"--out: cannot write into {root} ({error.strerror})") from None
    except ValueError as error:
        raise ValueError(f"--out: {error}") from None

    def arguments(run: PlannedRun) -> list[str]:
        folder = ablation_run_folder(root, run.name).resolve()
        if run.name in resumable:
            return ["--resume", str(folder)]
        return ["--config", str((root / "configs" / f"{run.name}.toml").resolve()), "--out", str(folder)]

    def log(run: PlannedRun) -> Path:
        return (root / "logs" / f"{run.name}.log").resolve()

    failed = 0
    with tqdm(total=len(runs), initial=len(runs) - len(pending), desc=f"ablate {recipe.name}", unit="run") as bar:
        def finished(code: int) -> None:
            nonlocal failed
            failed += code != 0
            bar.set_postfix(failed=failed)
            bar.update()

        try:
            if ray is not None:
                address, gpus_per_run = ray
                run_on_ray([(arguments(run), log(run)) for run in pending], launch_run, address=address,
                           gpus_per_run=gpus_per_run, on_finished=finished)
            else:
                _run_locally(pending, arguments, log, jobs, gpus, finished)
        finally:
            write_summaries(root)
    return failed


def _run_locally(pending: list[PlannedRun], arguments: Callable[[PlannedRun], list[str]],
                 log: Callable[[PlannedRun], Path], jobs: int, gpus: int, finished: Callable[[int], None]) -> None:
    """``jobs`` runs at a time as subprocesses of this one, spread over the GPUs; ``finished(code)`` as each ends."""
    # Parallel runs share the CPU cores: each gets its share of the idle ones (more threads than cores makes
    # small models many times slower).
    threads = default_threads(jobs)
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(jobs):
        slots.put(slot)

    def run_one(run: PlannedRun) -> int:
        slot = slots.get()
        # Spread runs over the GPUs, unless the config names one itself (cuda:N).
        gpu = slot % gpus if gpus > 1 and run.config.get("device", "auto") in ("auto", "cuda") else None
        try:
            return launch_run(arguments(run), log(run), gpu, threads)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, run) for run in pending]
        try:
            for future in as_completed(futures):
                finished(future.result())
        except BaseException:  # Ctrl-C: start no further runs (the running ones get the signal too)
            for future in futures:
                future.cancel()
            raise


def ablate_command(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe TOML file, e.g. recipes/quick.toml.")],
    out: Annotated[Optional[Path], typer.Option(help="Ablation folder (default: ablations/<recipe name>); new, "
                                                "empty, or an ablation of the same recipe (which resumes).")] = None,
    jobs: Annotated[Optional[int], typer.Option(help="Runs at a time, spread over the GPUs (default: one on a CPU; "
                                                f"with GPUs, up to {RUNS_PER_GPU} per GPU as free memory and CPU cores allow).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and estimate the time; run nothing.")] = False,
    backend: Annotated[str, typer.Option(help="local (subprocesses of this command) or ray (Ray tasks, pip install -e '.[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="With --backend ray: the cluster to join (HOST:6379, or auto); default: start a Ray on this machine.")] = None,
    gpus_per_run: Annotated[Optional[float], typer.Option(help="With --backend ray: GPUs each run reserves, e.g. 0.5 for two runs per GPU (default 1 if the cluster has GPUs, else 0).")] = None,
) -> None:
    """Run every configuration x seed of a RECIPE (skipping finished runs), then write summary.csv/md/png.
    Exits with code 1 if any run failed (the summaries are written all the same)."""
    try:
        ablate(recipe, out, jobs, dry_run, backend, address, gpus_per_run)
    except ValueError as error:
        fail(str(error))
    except RunsFailed as error:
        fail(str(error), code=1)
