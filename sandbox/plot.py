"""``sandbox plot``: training and evaluation curves of runs and ablations, overlaid, to a PNG.

Each argument is a run folder, an ablation folder, or any folder with run folders below it. Runs that differ
only in their seed are one configuration: its curve is the mean over the seeds, with a band from the lowest
to the highest seed. The four panels are the loss and the task's metric, on the training batches (every
``log_every`` steps) and on the held-out batches (every ``eval_every`` steps), against optimizer steps or
against training tokens (``--x tokens``: steps x batch size x sequence length, which lines up runs of
different batch sizes). The legend names each configuration by the config keys that differ between them.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from sandbox.config import flatten
from sandbox.errors import fail
from sandbox.report import NOT_AXES, format_value
from sandbox.runfolder import METRICS, is_run_folder, read_metrics, read_results, read_run_config

NOT_METRICS = {"step", "split", "loss", "lr", "grad_norm", "tokens_per_second"}
MAX_CONFIGURATIONS = 20   # colours that can still be told apart (matplotlib's tab20)


@dataclass
class Run:
    folder: Path
    config: dict                      # flattened config.toml
    records: list[dict]               # metrics.jsonl, in order
    metric_name: str | None


@dataclass
class Curve:
    """One configuration's values of one quantity: x -> the seeds' values (only x that every seed reached)."""

    xs: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)


def read_run(folder: Path) -> Run:
    """A run folder's config and metric records; the metric's name from results.json, else from the records."""
    records = read_metrics(folder)
    results = read_results(folder)
    if results is not None:
        metric_name = results["metric_name"]
    else:
        names = [key for record in records for key in record if key not in NOT_METRICS]
        metric_name = names[0] if names else None
    return Run(folder, flatten(read_run_config(folder)), records, metric_name)


def find_runs(argument: str) -> list[Run]:
    """The runs of one command-line argument: the folder itself if it is a run, else every run below it."""
    path = Path(argument)
    if not path.is_dir():
        raise ValueError(f"RUN_OR_ABLATION: no such folder: {argument}")
    if is_run_folder(path):
        folders = [path]
    else:
        folders = sorted(p.parent for p in path.rglob(METRICS) if is_run_folder(p.parent))
    if not folders:
        raise ValueError(f"RUN_OR_ABLATION: {argument} is neither a run folder nor a folder with runs below it")
    return [read_run(folder) for folder in folders]


def configuration_key(run: Run) -> str:
    return json.dumps({k: v for k, v in run.config.items() if k not in NOT_AXES}, sort_keys=True)


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys (other than seed, folder and the like) whose values differ between the runs."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    return [key for key in keys if key not in NOT_AXES
            and len({json.dumps(run.config.get(key)) for run in runs}) > 1]


def curve(runs: list[Run], split: str, quantity: str, x: str) -> Curve:
    """Mean and seed band of ``quantity`` on ``split`` records, against steps or tokens."""
    per_seed = []
    for run in runs:
        values = {r["step"]: r[quantity] for r in run.records
                  if r["split"] == split and isinstance(r.get(quantity), (int, float))}
        per_seed.append(values)
    steps = sorted(set.intersection(*(set(values) for values in per_seed))) if per_seed else []
    tokens_per_step = runs[0].config["batch_size"] * (runs[0].config.get("seq_len") or 0)
    result = Curve()
    for step in steps:
        values = [seed[step] for seed in per_seed]
        result.xs.append(step * tokens_per_step if x == "tokens" else step)
        result.mean.append(statistics.fmean(values))
        result.low.append(min(values))
        result.high.append(max(values))
    return result


def plot(arguments: list[str], out: Path, x: str = "steps") -> Path:
    """Draw the curves of every run under ``arguments`` into the PNG ``out``; returns ``out``."""
    if x not in ("steps", "tokens"):
        raise ValueError(f"--x: expected steps or tokens, got '{x}'")
    runs = [run for argument in arguments for run in find_runs(argument)]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(configuration_key(run), []).append(run)
    if len(groups) > MAX_CONFIGURATIONS:
        raise ValueError(f"RUN_OR_ABLATION: {len(groups)} configurations are too many to tell apart in one plot "
                         f"(at most {MAX_CONFIGURATIONS}); pass fewer folders")
    metric_names = {run.metric_name for run in runs} - {None}
    metric_name = metric_names.pop() if len(metric_names) == 1 else "metric"
    labels_from = differing_keys([group[0] for group in groups.values()])

    try:
        import matplotlib
    except ImportError:
        raise ValueError('plot: needs matplotlib, which is not installed (pip install -e ".[plot]")') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    palette = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for index, members in enumerate(groups.values()):
        config = members[0].config
        label = ", ".join(f"{k.removeprefix('task_args.')}={format_value(config.get(k))}" for k in labels_from)
        label = (label or members[0].folder.name) + (f" ({len(members)} seeds)" if len(members) > 1 else "")
        for column, split in enumerate(("train", "eval")):
            # The metric row shows each run's own metric (its name labels the axis when all runs share it).
            for row, quantity in enumerate(("loss", members[0].metric_name)):
                c = curve(members, split, quantity, x) if quantity else Curve()
                if not c.xs:
                    continue
                ax = axes[row][column]
                ax.plot(c.xs, c.mean, color=palette(index), label=label if (row, column) == (0, 0) else None,
                        marker="o" if split == "eval" else None, markersize=3)
                if len(members) > 1:
                    ax.fill_between(c.xs, c.low, c.high, color=palette(index), alpha=0.2, linewidth=0)
    for column, split in enumerate(("train", "eval")):
        axes[0][column].set_title(f"{'training batches' if split == 'train' else 'held-out batches'}")
        axes[0][column].set_ylabel("loss")
        axes[0][column].set_yscale("log")
        axes[1][column].set_ylabel(metric_name)
        axes[1][column].set_xlabel("training tokens" if x == "tokens" else "step")
        for row in range(2):
            axes[row][column].grid(alpha=0.3)
    figure.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    figure.suptitle("mean over seeds, band from the lowest to the highest seed" if any(len(g) > 1 for g in groups.values())
                    else "one run per configuration")
    figure.tight_layout()
    figure.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return out


def free_path(stem: str) -> Path:
    """``stem.png`` in the working directory, or ``stem-1.png``, ``stem-2.png``... if that is taken."""
    path, n = Path(f"{stem}.png"), 1
    while path.exists():
        path, n = Path(f"{stem}-{n}.png"), n + 1
    return path


def plot_command(
    folders: Annotated[list[str], typer.Argument(metavar="RUN_OR_ABLATION...", help="Run folders, ablation folders, or folders with runs below them.")],
    out: Annotated[Optional[Path], typer.Option(help="PNG file to write (must not exist; default curves.png, or curves-N.png if taken).")] = None,
    x: Annotated[str, typer.Option(help="x axis: steps or tokens.")] = "steps",
) -> None:
    """Plot loss and metric curves (training and held-out) of runs and ablations, overlaid, seeds as a band."""
    try:
        if out is not None and out.suffix.lower() != ".png":
            raise ValueError(f"--out: expected a .png file name, got {out}")
        if out is not None and out.exists():
            raise ValueError(f"--out: {out} already exists (earlier files are never overwritten); pick a new name")
        if out is not None and not out.parent.is_dir():
            raise ValueError(f"--out: folder {out.parent} does not exist")
        path = plot(folders, out or free_path("curves"), x)
    except ValueError as error:
        fail(str(error))
    typer.echo(f"wrote {path}")
