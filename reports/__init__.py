"""trainaudit reports: the self-contained HTML report drawn from an analysis result's tables.

    from analyze import analyze_run
    from reports import render_report
    html = render_report(analyze_run("runs/demo"))

Presentation only: nothing here computes a metric or writes a file (`analyze.pipeline.output`
writes report.html, summary.json and the tables). Imported lazily, so `import reports` loads
neither jinja2 nor matplotlib.
"""
from __future__ import annotations

from typing import Any

__all__ = ["render_report", "render_comparison"]
_HOME = {"render_report": "reports.html", "render_comparison": "reports.compare"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
