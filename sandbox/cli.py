"""The ``sandbox`` command line. Each command lives in its own module; this file wires them together.

A user mistake ends with one line on stderr and exit code 2, never a traceback: commands check their values
and call ``sandbox.errors.fail``; an unknown option or a malformed value, which the argument parser itself rejects, is turned
into the same one line by ``cli_main``, the console entry point.
"""

from __future__ import annotations

import os
import sys

import typer

try:
    from typer._click.exceptions import UsageError  # typer >= 0.29 vendors click
except ImportError:
    from click.exceptions import UsageError

from sandbox.ablate import PARENT_PID_VARIABLE, ablate_command, end_with_parent
from sandbox.bench import bench_command
from sandbox.doctor import doctor_command
from sandbox.report import compare_command, report_command
from sandbox.rules import get_rule, list_rules
from sandbox.tasks.command import tasks_command
from sandbox.train import run_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Understand and compare linear-attention update rules: train, ablate, benchmark.")


@app.callback()
def main() -> None:
    """Understand and compare linear-attention update rules: train, ablate, benchmark."""


@app.command("rules")
def rules_command() -> None:
    """List the update rules with their gates and recurrence, one line each."""
    names = list_rules()
    width = max(len(n) for n in names)
    gate_width = max(len(", ".join(get_rule(n).gates) or "-") for n in names)
    for name in names:
        rule = get_rule(name)
        gates = ", ".join(rule.gates) or "-"
        typer.echo(f"{name:<{width}}  gates: {gates:<{gate_width}}  {rule.recurrence}")


app.command("bench")(bench_command)


app.command("tasks")(tasks_command)


app.command("ablate")(ablate_command)
app.command("report")(report_command)
app.command("compare")(compare_command)
app.command("run")(run_command)
app.command("doctor")(doctor_command)


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
