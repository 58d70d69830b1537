"""The comparison page of several runs: one self-contained HTML file beside each run's report.

Same safety rules as the report (`reports.page`): autoescape always on, every run-derived string
cleaned and shortened, a restrictive CSP, figures as PNG data URIs. The only links are relative
``runs/NN-<slug>/report.html`` paths whose slug is re-checked here against ``[a-z0-9._-]``, so
nothing a run supplies can become a URL.
"""
from __future__ import annotations

import re
from collections.abc import MutableMapping, Sequence
from typing import Any

import pandas as pd

from reports.page import CSP, Panel, add_figure, as_cache, environment, footer

__all__ = ["render_comparison", "FOLDER_RE"]

FOLDER_RE = re.compile(r"^runs/[0-9]{2,}-[a-z0-9._-]{1,40}$")


def _link(folder: str) -> str:
    if not FOLDER_RE.match(folder) or ".." in folder:
        raise ValueError(f"unsafe report folder {folder!r}")  # a bug in analyze.pipeline.compare, not user data
    return f"{folder}/report.html"


def render_comparison(rows: Sequence[Any], curves: pd.DataFrame, *,
                      figure_cache: MutableMapping[str, str] | None = None) -> str:
    """The comparison page as one HTML string (rows: analyze.pipeline.compare.RunComparison;
    `figure_cache` as in `reports.render_report`)."""
    cache = as_cache(figure_cache)
    fig = Panel("losses", "", "", "")
    if len(curves):
        add_figure(fig, cache, "training and validation loss of every run", "plot_compare_losses", curves,
                   ncols=2, height=3.4, width=11.0)
    cache.prune()
    items = [{"r": r, "href": _link(r.folder) if r.ok else "", "n": i} for i, r in enumerate(rows, 1)]
    ok = [r for r in rows if r.ok]
    return environment().get_template("compare.html.j2").render(
        csp=CSP, items=items, n_ok=len(ok), n_runs=len(rows), figures=fig.figures, figure_lines=fig.lines,
        **footer())
