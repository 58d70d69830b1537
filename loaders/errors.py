"""The one project exception, and the warning list every loader fills."""
from __future__ import annotations

import os


class TrainauditError(Exception):
    """A problem with user data: message is ``"<path>: <problem>"`` on one line.

    The CLI turns it into exit code 2 and prints the message, never a traceback.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = " ".join(str(problem).split())  # one line, always
        super().__init__(self.problem if self.path is None else f"{self.path}: {self.problem}")


class DataWarnings(list):
    """Warnings about skipped or repaired input: ``"<path>[:line]: <problem>"`` strings.

    Loaders append to it instead of failing; the report lists them under "Data issues",
    summary.json puts them in ``notes`` and ``--strict`` turns any of them into exit 2.
    """

    def add(self, path: str | os.PathLike[str], problem: str, line: int | None = None) -> None:
        where = os.fspath(path) if line is None else f"{os.fspath(path)}:{line}"
        self.append(f"{where}: {' '.join(str(problem).split())}")
