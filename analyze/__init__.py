"""trainaudit offline analysis: pure metric functions (one module per metric family, docs/metrics)
and the pipeline that turns a run into tidy tables, findings and notes.

`from analyze import analyze_run` is the notebook entry point. This module imports neither
the CLI, nor the demo, nor the report, so `import analyze` stays cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["analyze_run", "AnalysisConfig", "AnalysisResult"]


def __getattr__(name: str) -> Any:  # lazy: the pipeline pulls in pandas (and torch when it computes)
    if name in __all__:
        from analyze import config
        from analyze.pipeline import analysis

        return getattr(analysis if hasattr(analysis, name) else config, name)
    raise AttributeError(f"module 'analyze' has no attribute {name!r}")
