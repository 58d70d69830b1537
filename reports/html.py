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

__all__ = ["render_report", "build_panels", "key_facts", "not_analysed"]


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


def _code(finding: Any) -> str | None:
    return finding.get("code") if isinstance(finding, dict) else getattr(finding, "code", None)


def _first_instability(result: Any) -> int | None:
    """The step of the first spike or non-finite event (spikes table) or non-finite weights (spectral
    table): the event the analysis' last stable checkpoint precedes, named beside it."""
    T = getattr(result, "tables", None) or {}
    steps = []
    sp, spec = T.get("spikes"), T.get("spectral")
    if sp is not None and len(sp):
        steps.append(float(sp["first_step"].astype(float).min()))
    if spec is not None and len(spec) and (~spec["finite"].astype(bool)).any():
        steps.append(float(spec.loc[~spec["finite"].astype(bool), "step"].astype(float).min()))
    return int(min(steps)) if steps else None


def key_facts(result: Any) -> list[tuple[str, str]]:
    """What a reader needs first, as (label, text): the verdict, the worst finding and the
    checkpoints worth keeping. Read from the result's `headline` (the analysis chooses them), with
    the summary's verdict and checkpoints and the first finding for results that lack it."""
    head = getattr(result, "headline", None) or {}
    summary = result.summary or {}
    facts: list[tuple[str, str]] = []
    verdict = head.get("verdict_text") or (result.headlines or {}).get("overfitting")
    if verdict:
        facts.append(("verdict", str(verdict)))
    worst = head.get("worst_finding", result.findings[0] if result.findings else None)
    if head.get("memorisation") and _code(worst) != "memorisation":
        facts.append(("memorisation", "training loss far below validation loss (see finding 'memorisation')"))
    if worst is not None:
        if isinstance(worst, dict):
            sev, msg = worst.get("severity", ""), worst.get("message", "")
        elif isinstance(worst, str):
            sev, msg = "", worst
        else:
            sev, msg = getattr(worst, "severity", ""), getattr(worst, "message", str(worst))
        facts.append(("worst finding", f"{sev}: {msg}" if sev else str(msg)))
    else:
        facts.append(("worst finding", "none: every check passed"))
    keep = head.get("checkpoint_to_keep") or summary.get("checkpoint_to_keep")
    if isinstance(keep, dict):
        best, stable = keep.get("best_val_step"), keep.get("last_stable_step")
        parts = [f"step {fmt_num(best)} (lowest validation loss)"] if best is not None else []
        first = _first_instability(result)
        if stable is not None:
            parts.append(f"step {fmt_num(stable)} (last stable: " + (
                f"the last saved before the first spike or non-finite value, at step {fmt_num(first)})"
                if first is not None else "no spike or non-finite value in the run)"))
        elif best is not None:
            parts.append("no checkpoint was saved before the first spike or non-finite value")
        facts.append(("checkpoint to keep", "; ".join(parts) if parts else "no saved checkpoint to choose from"))
    return facts


def not_analysed(result: Any) -> list[str]:
    """Files of the run that were found but not read, each as one line (path and reason)."""
    items = getattr(result, "not_analysed", None) or (result.run_info or {}).get("not_analysed") or []
    out = []
    for it in items:
        if isinstance(it, dict):
            out.append(f"{it.get('path', '')}: {it.get('reason', '')}".rstrip(": "))
        else:
            out.append(str(it))
    return out


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
    counts = getattr(result, "counts", None) or {
        sev: sum(1 for f in result.findings if str(f.severity) == sev) for sev in ("error", "warning", "info")}
    return environment().get_template("report.html.j2").render(
        csp=CSP, run_name=str(result.run_info.get("name", "")), header=header, findings=result.findings,
        counts=counts, headlines=result.headlines, key_facts=key_facts(result),
        panels=panels, notes=result.notes, data_warnings=result.data_warnings, not_analysed=not_analysed(result),
        table_names=list(TABLE_COLUMNS), **footer())
