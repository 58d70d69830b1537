"""The one place where a problem with the user's files becomes exit code 2 and one line on stderr
(``trainaudit: error: <path>: <problem>``), never a traceback."""
from __future__ import annotations

from typing import Any, NoReturn

import click

from loaders.errors import TrainauditError

__all__ = ["PREFIX", "say_error", "fail", "ErrorsExit2", "Command"]

PREFIX = "trainaudit: error: "


def say_error(message: object) -> None:
    """Print one error line on stderr (the exit code is the caller's)."""
    click.echo(f"{PREFIX}{message}", err=True)


def fail(message: object) -> NoReturn:
    """Print one error line on stderr and end the command with exit code 2."""
    say_error(message)
    raise click.exceptions.Exit(2)


class ErrorsExit2:
    """Mixin for a click command or group: a TrainauditError raised while it runs ends as `fail`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except TrainauditError as exc:
            fail(exc)


class Command(ErrorsExit2, click.Command):
    """A trainaudit command (`@click.command(cls=Command)`): TrainauditError -> exit 2."""
