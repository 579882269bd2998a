"""``sandbox report`` and ``sandbox compare``: tables and a plot from finished run folders.

``write_summaries(dir)`` reads an ablation folder (its ``plan.json`` and run folders) and writes
``summary.csv`` (one row per run), ``summary.md`` and, with matplotlib installed, ``summary.png`` (the metric
against the swept axis with 95% intervals, one line per configuration).

What the summary reports, and why:
- The number in the tables is the **test** metric (a stream no run saw during training or selection).
  ``select_best`` picks, per setting of the other axes, the value whose mean **valid** metric is best, so the
  reported number is not the one that was maximised.
- Per configuration: mean, standard deviation and a 95% Student t interval over the seeds
  (``sandbox/stats.py``). A seed spread above ``SEED_SPREAD_FLAG`` is flagged and the seeds are listed: a mean
  over seeds that split between solving and not solving describes no seed.
- ``[compare]`` pairs: the difference of the test metrics with its 95% interval, Welch's test and a verdict
  in words (``b better than a`` at p < 0.05, else "not distinguishable with n seeds"; no correction for
  multiple comparisons, so read a single p near 0.05 among many with care).
With ``plan.json``, the runs are exactly those it names (``runs/NAME``); a folder without one (say, a
``runs/`` folder of separate ``sandbox run`` calls) works too: every ``results.json`` below it is one run, and
the axes are the config keys whose values differ. The summaries replace only files that ``sandbox report``
wrote itself (``sandbox.runfolder`` keeps their fingerprints): a user's own ``summary.md`` is never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from sandbox.config import RunConfig, flatten
from sandbox.errors import fail
from sandbox.runfolder import (ablation_run_folder, read_plan, read_results, read_run_config, write_summary_files)
from sandbox.stats import mean_interval, verdict, welch

RESULT_COLUMNS = ("metric_name", "higher_is_better", "final_metric", "final_loss", "test_metric", "test_loss",
                  "parameters", "state_size", "tokens_per_second", "wall_seconds", "device", "impl")
SEED_SPREAD_FLAG = 0.05   # a standard deviation over seeds above this is flagged in summary.md
# Exit codes of a run stopped by Ctrl-C: 130 (128 + SIGINT, what `sandbox run` returns) or killed by a signal.
INTERRUPTED_CODES = {130, -2, -9, -15}
# Keys that never make two runs different configurations.
NOT_AXES = {"seed", "out", "device", "impl", "eval_every", "eval_batches", "log_every", "checkpoint_every"}
MAX_PLOT_LINES = 12
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")


def format_value(value: object) -> str:
    """A value as it appears in folder names and tables: ``true``, ``0.001``, ``delta``; unset is ``-``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "-" if value is None or value == "" else str(value)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Ablation:
    name: str
    description: str
    axes: list[str]            # swept keys, seed excluded
    select_best: str | None
    plot_x: str | None
    machine: str = ""          # the accelerator (or CPU) the ablation was last launched on
    plot_x_values: str | None = None   # a result column that places plot_x's points (state_size)
    compare: dict | None = None        # {"axis": key, "pairs": [[a, b], ...]}
    rows: list[dict] = field(default_factory=list)  # one per run: name, axes..., seed, status, results, folder, log

    @property
    def metric_name(self) -> str:
        names = {row["metric_name"] for row in self.rows if row["status"] == "ok"}
        return names.pop() if len(names) == 1 else "metric"

    @property
    def metrics(self) -> dict[str, bool]:
        """Each metric of the finished runs and whether higher is better (from results.json: a task knows whether
        its metric is an accuracy or a loss). Several when tasks differ, e.g. accuracy and bits per character."""
        found = {row["metric_name"]: row["higher_is_better"] for row in self.rows
                 if row["status"] == "ok" and row["metric_name"] != ""}
        return found or {"metric": True}

    @property
    def reported(self) -> str:
        """The result that the tables report: the test metric, or for runs made before the test stream
        existed, the final metric on the held-out batches (``final_metric``)."""
        finished = [row for row in self.rows if row["status"] == "ok"]
        return "test_metric" if finished and all(row["test_metric"] != "" for row in finished) else "final_metric"


def _read_status(log: Path) -> str:
    """A run without results: 'failed' if its last attempt exited with an error, 'interrupted' if it was
    stopped by a signal (Ctrl-C) or never ended, 'not run' if it never started."""
    if not log.is_file():
        return "not run"
    lines = log.read_text(errors="replace").splitlines()
    if lines and lines[-1].startswith("exit code:") and int(lines[-1].split(":")[1]) not in INTERRUPTED_CODES:
        return "failed"
    return "interrupted"


def _row(root: Path, name: str, axes: list[str], config: dict, seed: int, folder: Path | None,
         log: Path | None) -> dict:
    row = {"name": name}
    row.update({axis: config.get(axis, "") for axis in axes})
    row["seed"] = seed
    results = (read_results(folder) or {}) if folder else {}
    row["status"] = "ok" if folder else _read_status(log) if log else "not run"
    row.update({key: results.get(key, "") for key in RESULT_COLUMNS})
    # Paths relative to the summary's folder, so that the folder can be moved or shared.
    row["folder"] = str(folder.relative_to(root)) if folder else ""
    row["log"] = str(log.relative_to(root)) if log and log.is_file() else ""
    return row


def load_ablation(root: str | Path) -> Ablation:
    """The runs of an ablation folder (with plan.json), or of any folder holding run folders."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"DIR: not a folder: {root}")
    defaults = flatten(RunConfig().to_dict())
    plan = read_plan(root)
    if plan is not None:
        ablation = Ablation(plan["recipe"], plan["description"], plan["axes"], plan["select_best"], plan["plot_x"],
                            plan["machine"], plan.get("plot_x_values"), plan.get("compare"))
        for run in plan["runs"]:
            folder = ablation_run_folder(root, run["name"])
            folder = folder if read_results(folder) is not None else None
            config = dict(defaults, **flatten(run["config"]))
            if folder:
                config.update(flatten(read_run_config(folder)))
            log = root / "logs" / f"{run['name']}.log"
            ablation.rows.append(_row(root, run["name"], ablation.axes, config, run["seed"], folder, log))
        return ablation

    folders = sorted(p.parent for p in root.rglob("results.json"))
    if not folders:
        raise ValueError(f"DIR: no plan.json and no run folder with results.json under {root}")
    configs = [flatten(read_run_config(folder)) for folder in folders]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    axes = [key for key in keys if key not in NOT_AXES
            and len({json.dumps(config.get(key)) for config in configs}) > 1]
    ablation = Ablation(root.name, "", axes, None, None)
    for folder, config in zip(folders, configs):
        name = str(folder.relative_to(root))
        ablation.rows.append(_row(root, name, axes, config, config.get("seed", ""), folder, None))
    return ablation


@dataclass
class Configuration:
    """The runs of one configuration (every axis fixed except the seed)."""

    axes: dict
    rows: list[dict]

    def values(self, key: str) -> list[float]:
        return [float(row[key]) for row in self.rows if row["status"] == "ok" and row[key] != ""]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def half_width(self, key: str) -> float:
        """Half-width of the 95% interval of the mean (NaN with fewer than two seeds)."""
        values = self.values(key)
        return mean_interval(values).half_width if values else math.nan

    @property
    def finished(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def metric_name(self) -> str:
        return next((row["metric_name"] for row in self.rows if row["status"] == "ok"), "-")

    @property
    def higher_is_better(self) -> bool:
        return next((bool(row["higher_is_better"]) for row in self.rows if row["status"] == "ok"), True)


def group(ablation: Ablation) -> list[Configuration]:
    """One Configuration per distinct tuple of axis values, in the order of the plan."""
    groups: dict[str, Configuration] = {}
    for row in ablation.rows:
        axes = {axis: row[axis] for axis in ablation.axes}
        key = json.dumps(axes, sort_keys=True, default=str)
        groups.setdefault(key, Configuration(axes, [])).rows.append(row)
    return list(groups.values())


def select_best(ablation: Ablation, configurations: list[Configuration]) -> list[Configuration]:
    """For each setting of the other axes, the configuration whose value of ``select_best`` scores best on the
    valid stream (mean final valid metric; ties, such as several learning rates at accuracy 1.0, go to the
    lower valid loss). The test metric plays no part in the choice."""
    axis = ablation.select_best

    def badness(configuration: Configuration) -> tuple[float, float]:
        sign = -1 if configuration.higher_is_better else 1
        metric, loss = configuration.mean("final_metric"), configuration.mean("final_loss")
        return (math.inf if metric is None else sign * metric, math.inf if loss is None else loss)

    best: dict[str, Configuration] = {}
    for configuration in configurations:
        others = json.dumps({k: v for k, v in configuration.axes.items() if k != axis}, sort_keys=True, default=str)
        if others not in best or badness(configuration) < badness(best[others]):
            best[others] = configuration
    return list(best.values())


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_std(configuration: Configuration, key: str) -> str:
    mean = configuration.mean(key)
    return "-" if mean is None else f"{mean:.3f} ± {configuration.std(key):.3f}"


def _count(value: float | None) -> str:
    """Parameter and state sizes: 12.3k, 1.25M."""
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def _interval(configuration: Configuration, key: str) -> str:
    mean, half = configuration.mean(key), configuration.half_width(key)
    if mean is None or math.isnan(half):
        return "-"
    return f"[{mean - half:.3f}, {mean + half:.3f}]"


def _spread_flag(configuration: Configuration, key: str) -> bool:
    return configuration.std(key) > SEED_SPREAD_FLAG


def _markdown_table(ablation: Ablation, configurations: list[Configuration], best_axis: str | None = None) -> list[str]:
    metric, key = ablation.metric_name, ablation.reported
    which = "test " if key == "test_metric" else ""
    headers = [f"best {a} (on valid)" if a == best_axis else a.removeprefix("task_args.") for a in ablation.axes]
    mixed = len(ablation.metrics) > 1   # several tasks with different metrics: name each row's
    headers += (["metric"] if mixed else []) + [f"{which}{metric} (mean ± std)", "95% interval"]
    if key == "test_metric":
        headers.append(f"valid {metric}")
    headers += ["parameters", "state size", "tokens/s", "seeds ok"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for c in configurations:
        # A best value chosen among configurations of which none finished is no choice at all.
        cells = ["-" if a == best_axis and not c.finished else format_value(c.axes[a]) for a in ablation.axes]
        flag = " (spread!)" if _spread_flag(c, key) else ""
        cells += ([c.metric_name] if mixed else []) + [_mean_std(c, key) + flag, _interval(c, key)]
        if key == "test_metric":
            cells.append(_number(c.mean("final_metric")))
        cells += [_count(c.mean("parameters")), _count(c.mean("state_size")),
                  _number(c.mean("tokens_per_second"), 0), f"{c.finished}/{len(c.rows)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _describe(configuration: Configuration, axes: list[str]) -> str:
    return ", ".join(f"{a.removeprefix('task_args.')}={format_value(configuration.axes[a])}" for a in axes) or "all runs"


def spread_lines(ablation: Ablation, configurations: list[Configuration]) -> list[str]:
    """The configurations whose seeds disagree by more than SEED_SPREAD_FLAG (std), with every seed's value."""
    key = ablation.reported
    flagged = [c for c in configurations if _spread_flag(c, key)]
    if not flagged:
        return []
    lines = [f"## Seed spread above {SEED_SPREAD_FLAG} (flagged)", "",
             "The mean of these configurations describes no single seed; the seeds' values:", ""]
    for c in flagged:
        seeds = ", ".join(f"{row['seed']}: {float(row[key]):.3f}" for row in c.rows
                          if row["status"] == "ok" and row[key] != "")
        lines.append(f"- {_describe(c, ablation.axes)}: std {c.std(key):.3f} (seeds {seeds})")
    return lines + [""]


def comparisons(ablation: Ablation, configurations: list[Configuration]) -> list[dict]:
    """The recipe's ``[compare]`` pairs, per setting of the other axes: b - a on the reported metric, its 95%
    interval, Welch's p and a verdict. Pairs whose runs are missing, or have fewer than 2 seeds, are skipped."""
    if not ablation.compare:
        return []
    axis, key = ablation.compare["axis"], ablation.reported
    others = [a for a in ablation.axes if a != axis]
    by_setting: dict[str, dict] = {}
    for c in configurations:
        setting = json.dumps({a: c.axes[a] for a in others if a != ablation.select_best}, default=str)  # axis order
        by_setting.setdefault(setting, {})[json.dumps(c.axes[axis], default=str)] = c
    results = []
    for setting, members in by_setting.items():
        for a, b in ablation.compare["pairs"]:
            config_a, config_b = members.get(json.dumps(a, default=str)), members.get(json.dumps(b, default=str))
            if config_a is None or config_b is None:
                continue
            values_a, values_b = config_a.values(key), config_b.values(key)
            if len(values_a) < 2 or len(values_b) < 2:
                continue
            result = welch(values_a, values_b)
            name_a, name_b = (f"{axis.removeprefix('task_args.')}={format_value(v)}" if axis != "rule" else str(v)
                              for v in (a, b))
            results.append({"setting": json.loads(setting), "a": name_a, "b": name_b, "result": result,
                            "verdict": verdict(name_a, name_b, result, config_a.higher_is_better)})
    return results


def comparison_lines(ablation: Ablation, configurations: list[Configuration]) -> list[str]:
    found = comparisons(ablation, configurations)
    if not found:
        return []
    which = "test " if ablation.reported == "test_metric" else ""
    lines = [f"## Comparisons ({which}{ablation.metric_name}, Welch's t test, 95% intervals)", "",
             "| setting | b - a | difference | 95% interval | p | verdict |", "|---|---|---|---|---|---|"]
    for item in found:
        r = item["result"]
        setting = ", ".join(f"{k.removeprefix('task_args.')}={format_value(v)}" for k, v in item["setting"].items()) or "-"
        lines.append(f"| {setting} | {item['b']} - {item['a']} | {r.difference:+.3f} | "
                     f"[{r.low:+.3f}, {r.high:+.3f}] | {r.p_value:.3f} | {item['verdict']} |")
    return lines + ["", "p: two-sided, Welch's unequal-variance t test over seeds; no correction for multiple "
                        "comparisons. Seeds share their data streams and initial weights across the compared "
                        "values, which this unpaired test ignores (it is conservative for that).", ""]


def summary_markdown(ablation: Ablation, root: Path) -> str:
    configurations = group(ablation)
    statuses = [row["status"] for row in ablation.rows]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    metric = " and ".join(f"{name} ({'higher' if higher else 'lower'} is better)"
                          for name, higher in ablation.metrics.items())
    lines = [f"# Ablation `{ablation.name}`", ""]
    if ablation.description:
        lines += [ablation.description, ""]
    if ablation.reported == "test_metric":
        what = (f"Reported: {metric} on the test stream at the end of training, mean ± "
                "standard deviation and 95% t interval over the seeds that finished; "
                + (f"the best {ablation.select_best} was chosen on the valid stream." if ablation.select_best
                   else "valid is the stream evaluated during training."))
    else:
        what = (f"Reported: final {metric} on held-out batches (these runs predate the "
                "separate test stream), mean ± standard deviation and 95% t interval over the seeds that finished.")
    lines += [f"{len(ablation.rows)} runs: {counts}. {what}", ""]
    finished = [row for row in ablation.rows if row["status"] == "ok"]
    if finished:
        where = ", ".join(sorted({f"{row['device']} with {row['impl']}" for row in finished}))
        machine = f" ({ablation.machine})" if ablation.machine else ""
        total = format_duration(sum(float(row["wall_seconds"]) for row in finished))
        lines += [f"Runs on {where}{machine}; {total} of training summed over runs.", ""]
    reported = select_best(ablation, configurations) if ablation.select_best else configurations
    if ablation.select_best:
        lines += [f"## Best {ablation.select_best} per configuration (chosen on valid {ablation.metric_name}, reported on test)", ""]
        lines += _markdown_table(ablation, reported, ablation.select_best) + [""]
    lines += spread_lines(ablation, reported)
    lines += comparison_lines(ablation, reported)
    if ablation.select_best:
        lines += ["## Every configuration", ""]
    lines += _markdown_table(ablation, configurations) + [""]
    unfinished = [row for row in ablation.rows if row["status"] != "ok"]
    if unfinished:
        lines += ["## Runs without results", ""]
        for row in unfinished:
            reason = ""
            if row["log"]:
                log_lines = [line for line in (root / row["log"]).read_text(errors="replace").splitlines()
                             if line.strip() and not line.startswith(("exit code:", "==="))]
                reason = f": {log_lines[-1].strip()}" if log_lines else ""
            where = f" (log: `{row['log']}`)" if row["log"] else ""
            lines.append(f"- `{row['name']}` {row['status']}{where}{reason}")
        lines.append("")
    return "\n".join(lines)


def plot_png(ablation: Ablation) -> bytes | None:
    """summary.png: the reported metric against ``plot_x`` (one line per setting of the other axes, one panel per
    task), each point the mean over seeds with its 95% interval, and each seed as a faint dot."""
    try:
        import matplotlib
    except ImportError:
        print('summary.png skipped: matplotlib is not installed (pip install -e ".[plot]" for plots)')
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configurations = group(ablation)
    if ablation.select_best:
        configurations = select_best(ablation, configurations)
    key = ablation.reported
    configurations = [c for c in configurations if c.mean(key) is not None]
    if not configurations or not ablation.axes:
        return None
    x_axis = ablation.plot_x or ("rule" if "rule" in ablation.axes else ablation.axes[0])
    panel_axis = "task" if "task" in ablation.axes and x_axis != "task" else None
    hidden = {x_axis, panel_axis, ablation.select_best}
    series_axes = [a for a in ablation.axes if a not in hidden]

    x_values = list(dict.fromkeys(c.axes[x_axis] for c in configurations))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values)
    panels = list(dict.fromkeys(c.axes[panel_axis] for c in configurations)) if panel_axis else [None]
    lines = len({tuple(c.axes[a] for a in series_axes) for c in configurations})
    if lines > MAX_PLOT_LINES:
        print(f"summary.png skipped: {lines} lines per panel are too many to read; "
              "summarise fewer runs, or an ablation folder whose recipe sets plot_x")
        return None
    def label(c: Configuration) -> str:
        return ", ".join(f"{a.removeprefix('task_args.')}={format_value(c.axes[a])}" for a in series_axes)

    labels = list(dict.fromkeys(label(c) for c in configurations))  # one colour per line, the same in every panel
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        in_panel = [c for c in configurations if panel_axis is None or c.axes[panel_axis] == panel]
        for index, name in enumerate(labels):
            members = sorted((c for c in in_panel if label(c) == name), key=lambda c: x_values.index(c.axes[x_axis]))
            if not members:
                continue
            # Categories: shift each line a little sideways so that error bars at one category do not overlap.
            if ablation.plot_x_values:
                xs = [c.mean(ablation.plot_x_values) for c in members]
            else:
                xs = [c.axes[x_axis] if numeric else x_values.index(c.axes[x_axis]) + 0.08 * (index - (len(labels) - 1) / 2)
                      for c in members]
            half = [0.0 if math.isnan(c.half_width(key)) else c.half_width(key) for c in members]
            ax.errorbar(xs, [c.mean(key) for c in members], yerr=half,
                        color=f"C{index % 10}", marker="o", capsize=3, linestyle="-" if numeric else "none",
                        label=name or None)
            for x, c in zip(xs, members):
                seeds = c.values(key)
                ax.scatter([x] * len(seeds), seeds, color=f"C{index % 10}", s=14, alpha=0.5, linewidths=0)
        seeds = [v for c in in_panel for v in c.values(key)]
        if seeds and 0 <= min(seeds) and max(seeds) <= 1:
            # A fraction (accuracy): a t interval of 2-3 seeds that split can reach past [0, 1]; keep the axis there.
            ax.set_ylim(-0.03, 1.03)
        if ablation.plot_x_values:
            ax.set_xscale("log", base=2)
        elif numeric and min(x_values) > 0 and max(x_values) / min(x_values) >= 8:
            ax.set_xscale("log", base=2)
        if not numeric:
            ax.set_xticks(range(len(x_values)), [format_value(v) for v in x_values], rotation=30, ha="right")
        x_label = x_axis.removeprefix("task_args.")
        if ablation.plot_x_values:
            x_label = f"{ablation.plot_x_values.replace('_', ' ')} (floats; points are {x_label} values)"
        ax.set_xlabel(x_label)
        best = f", best {ablation.select_best} on valid" if ablation.select_best else ""
        which = "test " if key == "test_metric" else "final "
        panel_metric = in_panel[0].metric_name if in_panel else ablation.metric_name
        ax.set_ylabel(f"{which}{panel_metric} (mean, 95% interval, seeds{best})")
        ax.set_title(f"{ablation.name}" + (f": {panel}" if panel is not None else ""))
        ax.grid(alpha=0.3)
    if series_axes:
        handles = {}
        for ax in axes[0]:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
        figure.legend([handles[n] for n in labels if n in handles], [n for n in labels if n in handles],
                      fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return image.getvalue()


def summary_csv(ablation: Ablation) -> str:
    columns = ["name", *ablation.axes, "seed", "status", *RESULT_COLUMNS, "folder", "log"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in ablation.rows:
        writer.writerow({key: format_value(row[key]) if isinstance(row[key], bool) else row[key] for key in columns})
    return text.getvalue()


def write_summaries(root: str | Path) -> Ablation:
    """(Re)write summary.csv, summary.md and summary.png of an ablation folder from its run folders; refuses
    (ValueError) to replace a summary file that it did not write."""
    root = Path(root)
    ablation = load_ablation(root)
    files = {"summary.csv": summary_csv(ablation).encode(), "summary.md": summary_markdown(ablation, root).encode()}
    image = plot_png(ablation)
    if image is not None:
        files["summary.png"] = image
    write_summary_files(root, files)
    print("wrote " + ", ".join(str(root / name) for name in files))
    return ablation


def _load_run(argument: str, folder: Path) -> tuple[dict, dict]:
    if not (folder / "config.toml").is_file():
        raise ValueError(f"{argument}: {folder} is not a run folder (expected config.toml written by `sandbox run`); "
                         "to compare ablations, give two ablation folders (with plan.json)")
    return flatten(read_run_config(folder)), read_results(folder) or {}


def _difference(a: object, b: object) -> str:
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in (a, b)):
        return ""
    if a == b:
        return "="
    ratio = f", x{b / a:.3g}" if a not in (0, 0.0) else ""
    return f"{b - a:+.4g}{ratio}"


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """The config keys and results that differ between two run folders, as aligned text."""
    config_a, results_a = _load_run("A", Path(run_a))
    config_b, results_b = _load_run("B", Path(run_b))
    missing = "(unset)"
    config_keys = [k for k in dict.fromkeys([*config_a, *config_b]) if k != "out"]
    different = [k for k in config_keys if config_a.get(k, missing) != config_b.get(k, missing)]
    rows = [("config", "A", "B", "")]
    rows += [(k, format_value(config_a.get(k, missing)), format_value(config_b.get(k, missing)), "") for k in different]
    rows.append((f"({len(config_keys) - len(different)} other config keys are equal)", "", "", ""))
    rows.append(("", "", "", ""))
    rows.append(("results", "A", "B", "B - A, B / A"))
    if not results_a or not results_b:
        rows.append(("(no results.json in " + ("A" if not results_a else "B") + ")", "", "", ""))
    for key in dict.fromkeys([*results_a, *results_b]):
        a, b = results_a.get(key, missing), results_b.get(key, missing)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or (a == b and not numbers):
            continue  # labels that agree say nothing; numbers are shown even when equal
        if key == "final_metric" and results_a.get("metric_name") == results_b.get("metric_name"):
            key = f"final_metric ({results_a['metric_name']})"
        rows.append((key, _cell(a), _cell(b), _difference(a, b)))
    rows.append(("", "", "", ""))
    rows += _provenance_rows([results_a.get("provenance")], [results_b.get("provenance")])
    return _align(rows)


def _align(rows: list[tuple[str, str, str, str]]) -> str:
    """Rows as columns; a row whose first cell is in parentheses is a note, printed as it is."""
    widths = [max(len(row[i]) for row in rows if not row[0].startswith("(")) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
                     if not r[0].startswith("(") else r[0] for r in rows)


def _provenance_rows(records_a: list[dict | None], records_b: list[dict | None]) -> list[tuple[str, str, str, str]]:
    """Where A and B came from (results.json's provenance, see sandbox/provenance.py): the entries that differ.

    Each side may be several runs (an ablation): a value shared by all its runs is shown as it is, otherwise
    as the distinct values joined by " / "."""
    def values(records: list[dict | None], key: str) -> str:
        distinct = dict.fromkeys(format_value(record.get(key)) for record in records if record)
        return " / ".join(distinct) or "(unknown)"

    known_a, known_b = [r for r in records_a if r], [r for r in records_b if r]
    if not known_a or not known_b:
        side = "A" if not known_a else "B"
        return [(f"(no provenance in {side}: made before sandbox recorded it)", "", "", "")]
    keys = list(dict.fromkeys(key for record in known_a + known_b for key in record))
    different = [key for key in keys if values(known_a, key) != values(known_b, key)]
    rows = [("provenance", "A", "B", "")]
    rows += [(key, values(known_a, key), values(known_b, key), "") for key in different]
    rows.append((f"({len(keys) - len(different)} other provenance entries are equal)", "", "", ""))
    return rows


def compare_ablations(root_a: str | Path, root_b: str | Path) -> str:
    """Per configuration (matched by its axes), the mean final metric and speed of two ablation folders, and
    what differs in where their runs came from."""
    ablations = [load_ablation(root_a), load_ablation(root_b)]
    axes = list(dict.fromkeys(ablations[0].axes + ablations[1].axes))
    metric = ablations[0].metric_name if ablations[0].metric_name == ablations[1].metric_name else "metric"
    by_axes: list[dict[str, Configuration]] = []
    for ablation in ablations:
        for row in ablation.rows:
            row.update({axis: row.get(axis, "") for axis in axes})
        ablation.axes = axes
        by_axes.append({json.dumps(c.axes, sort_keys=True, default=str): c for c in group(ablation)})
    rows = [(f"A: {ablations[0].name}, {_ok_runs(ablations[0])}; B: {ablations[1].name}, {_ok_runs(ablations[1])}",
             "", "", ""), ("", "", "", ""),
            (f"configuration: final {metric}, mean ± std (seeds)", "A", "B", "B - A")]
    for key in dict.fromkeys([*by_axes[0], *by_axes[1]]):
        a, b = by_axes[0].get(key), by_axes[1].get(key)
        label = ", ".join(f"{axis.removeprefix('task_args.')}={format_value(value)}"
                          for axis, value in json.loads(key).items()) or "(all runs)"
        means = [c.mean("final_metric") if c else None for c in (a, b)]
        cells = [f"{_mean_std(c, 'final_metric')} ({c.finished})" if c else "(not in it)" for c in (a, b)]
        difference = f"{means[1] - means[0]:+.4g}" if None not in means else ""
        rows.append((label, cells[0], cells[1], difference))
    rows.append(("", "", "", ""))
    rows.append(("tokens/s, mean over runs", _number(_mean_over(ablations[0], "tokens_per_second"), 0),
                 _number(_mean_over(ablations[1], "tokens_per_second"), 0), ""))
    rows.append(("", "", "", ""))
    rows += _provenance_rows(*[[(read_results(Path(root) / row["folder"]) or {}).get("provenance")
                                for row in ablation.rows if row["status"] == "ok"]
                               for root, ablation in zip((root_a, root_b), ablations)])
    return _align(rows)


def _ok_runs(ablation: Ablation) -> str:
    return f"{sum(row['status'] == 'ok' for row in ablation.rows)}/{len(ablation.rows)} runs finished"


def _mean_over(ablation: Ablation, key: str) -> float | None:
    values = [float(row[key]) for row in ablation.rows if row["status"] == "ok" and row[key] != ""]
    return statistics.fmean(values) if values else None


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return format_value(value)


def report_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="An ablation folder, or any folder of run folders.")],
) -> None:
    """Rebuild summary.csv, summary.md and summary.png of an ablation folder from its finished runs."""
    try:
        write_summaries(directory)
    except ValueError as error:
        fail(str(error))


def compare_command(
    folder_a: Annotated[Path, typer.Argument(metavar="A", help="A run folder, or an ablation folder.")],
    folder_b: Annotated[Path, typer.Argument(metavar="B", help="Another run folder, or another ablation folder.")],
) -> None:
    """Print what differs between two run folders, or between two ablation folders."""
    try:
        if read_plan(folder_a) is not None and read_plan(folder_b) is not None:
            typer.echo(compare_ablations(folder_a, folder_b))
        else:
            typer.echo(compare(folder_a, folder_b))
    except ValueError as error:
        fail(str(error))
