"""The ``drnn`` command's first instructions: stop signals are handled before the command's modules load
(typer, rich, pydantic and torch take most of a second), then :func:`drnn_cli.cli.program` runs."""

from __future__ import annotations

from drnn_cli.signals import leave_at_once_on_signals


def program() -> None:
    """The ``drnn`` command and ``python -m drnn_cli``."""
    leave_at_once_on_signals()
    from drnn_cli.cli import program as run_command  # imported after the handlers: the heavy part

    run_command()
