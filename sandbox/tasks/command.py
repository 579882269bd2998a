"""``sandbox tasks``: list the tasks with their metric, parameters and defaults."""

from __future__ import annotations

import typer

from . import list_tasks


def tasks_command() -> None:
    """List the tasks: name, metric, one-line description, parameters with defaults."""
    rows = list_tasks()
    width = max(len(name) for name, *_ in rows)
    for name, description, defaults, metric_name in rows:
        typer.echo(f"{name:<{width}}  [{metric_name}]  {description}")
        typer.echo(" " * (width + 2) + "  ".join(f"{param}={default}" for param, default in defaults.items()))
