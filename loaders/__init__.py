"""trainaudit run format: the in-loop writer (RunLogger) and readers of ours and foreign runs.

`RunLogger` is imported lazily and needs only torch and safetensors; `load_run` needs pandas.
`import loaders.logger` therefore never loads pandas, scipy or seaborn.
"""
from __future__ import annotations

from typing import Any

from loaders.errors import DataWarnings, TrainauditError

__all__ = ["RunLogger", "load_run", "open_run", "TrainauditError", "DataWarnings"]


def __getattr__(name: str) -> Any:
    if name == "RunLogger":
        from loaders.logger import RunLogger

        return RunLogger
    if name == "load_run":
        from loaders.rundir import load_run

        return load_run
    if name == "open_run":
        from loaders.detect import open_run

        return open_run
    raise AttributeError(f"module 'loaders' has no attribute {name!r}")
