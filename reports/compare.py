"""The comparison page of several runs: one self-contained HTML file beside each run's report.

Same safety rules as the report (`reports.html`): autoescape always on, every run-derived string
cleaned and shortened, a restrictive CSP, figures as PNG data URIs. The only links are relative
``runs/NN-<slug>/report.html`` paths whose slug is re-checked here against ``[a-z0-9._-]``, so
nothing a run supplies can become a URL.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from reports.html import CSP, FigureCache, Panel, _env, _safe_figure, write_text_atomic

__all__ = ["render_comparison", "write_comparison_html", "FOLDER_RE"]

FOLDER_RE = re.compile(r"^runs/[0-9]{2,}-[a-z0-9._-]{1,40}$")


def _link(folder: str) -> str:
    if not FOLDER_RE.match(folder) or ".." in folder:
        raise ValueError(f"unsafe report folder {folder!r}")  # a bug in analyze.pipeline.compare, not user data
    return f"{folder}/report.html"


def render_comparison(rows: Sequence[Any], curves: pd.DataFrame, *,
                      figure_cache: str | os.PathLike[str] | None = None) -> str:
    """The comparison page as one HTML string (rows: analyze.pipeline.compare.RunComparison)."""
    cache = FigureCache(None if figure_cache is None else Path(figure_cache))
    fig = Panel("losses", "", "", "")
    if len(curves):
        _safe_figure(fig, cache, "training and validation loss of every run", "plot_compare_losses", curves,
                     ncols=2, height=3.4, width=11.0)
    cache.prune()
    from importlib import metadata

    try:
        version = metadata.version("trainaudit")
    except metadata.PackageNotFoundError:
        version = "dev"
    items = [{"r": r, "href": _link(r.folder) if r.ok else "", "n": i} for i, r in enumerate(rows, 1)]
    ok = [r for r in rows if r.ok]
    return _env().get_template("compare.html.j2").render(
        csp=CSP, items=items, n_ok=len(ok), n_runs=len(rows), figures=fig.figures, figure_lines=fig.lines,
        version=version, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_comparison_html(rows: Sequence[Any], curves: pd.DataFrame, path: str | os.PathLike[str], *,
                          figure_cache: str | os.PathLike[str] | None = None) -> Path:
    """Render and write the comparison page atomically; returns the path."""
    return write_text_atomic(path, render_comparison(rows, curves, figure_cache=figure_cache))
