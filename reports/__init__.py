"""trainaudit reports: the self-contained HTML report drawn from an analysis result's tables.

    from analyze import analyze_run
    from reports import write_report
    write_report(analyze_run("runs/demo"), "report.html")

Presentation only: nothing here computes a metric. Imported lazily, so `import reports` loads
neither jinja2 nor matplotlib.
"""
from __future__ import annotations

from typing import Any

__all__ = ["render_report", "write_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from reports import html

        return getattr(html, name)
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
