"""The ``sandbox`` command line. Each command lives in its own module; this file wires them together.

A user mistake ends with one line on stderr and exit code 2, never a traceback: commands check their values
and call ``sandbox.errors.fail``; an unknown option or a malformed value, which the argument parser itself rejects, is turned
into the same one line by ``cli_main``, the console entry point.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from typer.core import TyperGroup

try:
    from typer._click.exceptions import UsageError  # typer >= 0.29 vendors click
except ImportError:
    from click.exceptions import UsageError

from sandbox.ablate import PARENT_PID_VARIABLE, end_with_parent

# Every command: (module, function, one-line help). A command's module is imported only when that command
# runs or shows its help, so `sandbox --help`, `rules`, `tasks` and the commands that only read folders start
# without importing torch (tests/test_startup.py).
COMMANDS = {
    "run": ("sandbox.train", "run_command", "Train a small model with one update rule on a task; results land in a new run folder."),
    "ablate": ("sandbox.ablate", "ablate_command", "Run every configuration x seed of a RECIPE (skipping finished runs), then write summary.csv/md/png."),
    "report": ("sandbox.report", "report_command", "Rebuild summary.csv, summary.md and summary.png of an ablation folder from its finished runs."),
    "compare": ("sandbox.report", "compare_command", "Print what differs between two run folders, or between two ablation folders."),
    "plot": ("sandbox.plot", "plot_command", "Plot loss and metric curves (training and held-out) of runs and ablations, overlaid, seeds as a band."),
    "bench": ("sandbox.bench", "bench_command", "Time forward and forward+backward, and peak memory, of the rules' implementations (and fla's)."),
    "rules": ("sandbox.cli", "rules_command", "List the update rules with their gates and recurrence, one line each."),
    "tasks": ("sandbox.tasks.command", "tasks_command", "List the tasks: name, metric, one-line description, parameters with defaults."),
    "doctor": ("sandbox.doctor", "doctor_command", "Report Python, torch, Triton and GPU, and whether the Triton kernels run here."),
}


class LazyCommands(TyperGroup):
    """The command group: lists the commands from ``COMMANDS`` and builds one only when it is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        module, function, _ = COMMANDS[name]
        single = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
        single.command(name)(getattr(importlib.import_module(module), function))
        return typer.main.get_command(single)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help) for name, (_, _, short_help) in COMMANDS.items()])


# Plain help (no rich panels): it starts faster and shows no type after a flag that takes no value.
app = typer.Typer(cls=LazyCommands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Understand and compare linear-attention update rules: train, ablate, benchmark.")


@app.callback()
def main() -> None:
    """Understand and compare linear-attention update rules: train, ablate, benchmark."""


def rules_command() -> None:
    """List the update rules with their gates and recurrence, one line each."""
    from sandbox.rules import get_rule, list_rules

    names = list_rules()
    width = max(len(n) for n in names)
    gate_width = max(len(", ".join(get_rule(n).gates) or "-") for n in names)
    for name in names:
        rule = get_rule(name)
        gates = ", ".join(rule.gates) or "-"
        typer.echo(f"{name:<{width}}  gates: {gates:<{gate_width}}  {rule.recurrence}")


def cli_main() -> None:
    """Run the CLI; a parser error (unknown option, bad value, missing argument) becomes one line and exit 2."""
    if PARENT_PID_VARIABLE in os.environ:   # a run started by `sandbox ablate` ends with it
        end_with_parent(int(os.environ[PARENT_PID_VARIABLE]))
    try:
        result = app(standalone_mode=False, prog_name="sandbox")
    except UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError" and error.ctx is not None:
            typer.echo(error.ctx.get_help())
        else:
            typer.echo(f"error: {error.format_message()}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
