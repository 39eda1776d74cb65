"""What every ``pipemedic`` subcommand prints with, and how a user mistake ends a command."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

# Piped output (CI logs, `| tee`) is not clipped to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, soft_wrap=True)


def fail(exc: Exception) -> None:
    """One line naming the problem, exit status 2: no traceback for a user mistake."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)
