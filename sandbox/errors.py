"""How a command ends on a user mistake: one line on stderr, no traceback, a meaningful exit code."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` to stderr and exit (code 2: a usage error)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
