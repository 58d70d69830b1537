"""The self-contained HTML report of one run: one string, inline CSS, figures as base64 PNG data
URIs. The panels come from `reports.panels`, the page machinery and its safety rules from
`reports.page`.

Only `analyze.pipeline.tables` and `analyze.config` are imported from `analyze`: the report reads
the result's tables, findings, notes and headlines, and never touches torch or the metric math.
It writes no file (`analyze.pipeline.output.write_report` does).
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from analyze.pipeline.tables import TABLE_COLUMNS
from reports.page import CSP, as_cache, environment, fmt_num, footer
from reports.panels import build_panels

__all__ = ["render_report", "build_panels"]


def _header_rows(result: Any) -> list[tuple[str, str]]:
    info = result.run_info
    rows = [("source format", info.get("source_format")), ("path", info.get("path")),
            ("steps logged", fmt_num(info.get("steps_logged")))]
    ck = info.get("checkpoints") or []
    rows.append(("checkpoints", f"{len(ck)}" + (f" (steps {ck[0]} to {ck[-1]})" if ck else "")))
    model = info.get("model")
    if model:
        cfg = ", ".join(f"{k}={v}" for k, v in (model.get("config") or {}).items())
        rows.append(("model", f"{model.get('name')} ({cfg})" if cfg else str(model.get("name"))))
    else:
        rows.append(("model", "none named by the run"))
    if info.get("class_names"):
        rows.append(("classes", ", ".join(str(c) for c in info["class_names"])))
    if info.get("created"):
        rows.append(("created", str(info["created"])))
    ex = info.get("exact_svd")
    rows.append(("exact SVD", "\u2013" if ex is None else ("on" if ex else "off")))
    cached = f"; {result.cache_hits} checkpoint(s) from the cache" if getattr(result, "cache_hits", 0) else ""
    rows.append(("analysis", f"{info.get('analysis_seconds', 0.0):.1f} s{cached}"))
    return [(k, "" if v is None else str(v)) for k, v in rows]


def render_report(result: Any, run_meta: Mapping[str, Any] | None = None, *,
                  figure_cache: MutableMapping[str, str] | None = None) -> str:
    """The report as one HTML string (an AnalysisResult in; `run_meta` adds header rows).

    `figure_cache`: a mapping where drawn figures are kept by a hash of their input tables, so a
    re-render of unchanged results draws nothing (None: draw everything).
    """
    cache = as_cache(figure_cache)
    panels = build_panels(result, cache)
    cache.prune()
    header = _header_rows(result)
    for k, v in (run_meta or {}).items():
        header.append((str(k), str(v)))
    counts = {sev: sum(1 for f in result.findings if str(f.severity) == sev) for sev in ("error", "warning", "info")}
    return environment().get_template("report.html.j2").render(
        csp=CSP, run_name=str(result.run_info.get("name", "")), header=header, findings=result.findings,
        counts=counts, headlines=result.headlines, panels=panels, notes=result.notes,
        data_warnings=result.data_warnings, table_names=list(TABLE_COLUMNS), **footer())
