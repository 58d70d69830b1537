"""The self-contained HTML report: one file, inline CSS, figures as base64 PNG data URIs.

Safety (bad-inputs.md section E): jinja2 with ``autoescape=True`` always (the template's
``.j2`` suffix would defeat ``select_autoescape``); every value printed goes through a
``finalize`` hook that replaces NUL, other control characters, lone surrogates and bidi
overrides; long names are shortened for display with the full name in a quoted ``title``
attribute; no URL derived from input ever reaches ``href`` or ``src``; a Content-Security-Policy
meta tag forbids scripts, fonts, styles and images from anywhere but the page itself.

Only `analyze.pipeline.tables` is imported from `analyze`: the report reads the result's tables,
findings, notes and headlines, and never touches torch or the metric math.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from analyze.pipeline.tables import TABLE_COLUMNS
from loaders.errors import TrainauditError

__all__ = ["render_report", "write_report", "write_text_atomic", "clean_text", "short_name", "CSP", "Panel"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TEMPLATES = Path(__file__).with_name("templates")
NAME_WIDTH = 80
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(s: str) -> str:
    """Text safe to put in an HTML document: NUL, other control characters, lone surrogates and
    non-characters become U+FFFD; bidi controls (RTL override ...) are shown as [U+XXXX]."""
    s = _BAD_CHARS.sub("\ufffd", s)
    return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", s)


def short_name(s: str, width: int = NAME_WIDTH) -> str:
    """Display form of a possibly very long name: head ... tail."""
    return s if len(s) <= width else s[: width - 20] + "\u2026" + s[-19:]


def _finalize(value: Any) -> Any:
    if isinstance(value, Markup):
        return value
    if value is None:
        return ""
    return clean_text(value if isinstance(value, str) else str(value))


def fmt_num(x: Any, digits: int = 4) -> str:
    """A number for a table cell: integers as is, floats to `digits` significant digits, NaN as a dash."""
    if x is None or x == "":
        return "\u2013"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if abs(int(x)) >= 10000 else str(int(x))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "\u2013"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # unconditionally: select_autoescape() would not escape a .j2 template
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_num
    env.filters["short"] = lambda s, w=NAME_WIDTH: short_name(clean_text(str(s)), w)
    env.filters["clean"] = lambda s: clean_text(str(s))
    return env


@dataclass
class Table:
    """A table for the template: caption, (key, header, kind) columns, and rows of plain values.

    kind: "name" (run-derived text: shortened, full name in title), "num", "text", "bool".
    """

    caption: str
    columns: list[tuple[str, str, str]]
    rows: list[dict[str, Any]]
    note: str = ""


@dataclass
class Panel:
    """One section of the report."""

    pid: str
    number: str
    title: str
    healthy: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (data URI, alt text)
    tables: list[Table] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    reason: str = ""  # why it could not be computed


def _records(df: pd.DataFrame, limit: int | None = None) -> list[dict[str, Any]]:
    if limit is not None:
        df = df.head(limit)
    return [dict(zip(df.columns, row)) for row in df.itertuples(index=False, name=None)]


class FigureCache:
    """PNG data URIs keyed by a hash of the drawing function, its tables and options, so a report
    re-rendered from unchanged tables draws nothing. `folder=None` disables it."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.used: set[str] = set()
        self.hits = 0

    @staticmethod
    def key(draw: str, args: tuple, kwargs: dict) -> str:
        h = hashlib.sha256()
        src = FIGURES_SOURCE.stat()  # a change to the drawing code redraws everything
        h.update(f"{draw}|{src.st_size}|{src.st_mtime_ns}|{FIGURE_VERSION}".encode())
        for a in args:
            if isinstance(a, pd.DataFrame):
                h.update(repr((list(a.columns), a.shape)).encode())
                h.update(pd.util.hash_pandas_object(a.astype(str), index=False).to_numpy().tobytes())
            else:
                h.update(repr(a).encode())
        h.update(repr(sorted(kwargs.items())).encode())
        return h.hexdigest()[:24]

    def get(self, key: str) -> str | None:
        if self.folder is None:
            return None
        self.used.add(key)
        try:
            uri = (self.folder / f"{key}.b64").read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None
        if not uri.startswith("data:image/png;base64,"):
            return None
        self.hits += 1
        return uri

    def put(self, key: str, uri: str) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.tmp-{os.getpid()}"
            tmp.write_text(uri, encoding="ascii")
            os.replace(tmp, self.folder / f"{key}.b64")
        except OSError:
            pass  # a cache that cannot be written only costs time

    def prune(self) -> None:
        """Drop figures this render did not use (stale ones from older runs)."""
        if self.folder is None or not self.folder.is_dir():
            return
        for p in self.folder.glob("*.b64"):
            if p.stem not in self.used:
                p.unlink(missing_ok=True)


FIGURE_VERSION = 1
FIGURES_SOURCE = Path(__file__).with_name("figures.py")
_NO_CACHE = FigureCache(None)


def _figure(draw: str, *args: Any, nrows: int = 1, ncols: int = 1, height: float = 3.2,
            width: float = 8.0, sharex: bool = False, **kwargs: Any) -> str:
    """Draw `reports.figures.<draw>` on a new figure and return it as a data URI. matplotlib is
    imported here, on the first figure that is not in the cache."""
    from reports import figures

    fig, axes = figures.new_figure(nrows, ncols, width=width, height=height, sharex=sharex)
    target = axes.flat[0] if nrows * ncols == 1 else list(axes.flat)
    getattr(figures, draw)(*args, target, **kwargs)
    return figures.fig_to_data_uri(fig)


def _safe_figure(panel: Panel, cache: FigureCache, alt: str, draw: str, *args: Any, **kwargs: Any) -> None:
    """Draw one figure (or take it from the cache); a drawing failure becomes a line in the panel
    instead of a lost report."""
    key = FigureCache.key(draw, args, kwargs) if cache.folder is not None else ""
    uri = cache.get(key) if key else None
    if uri is None:
        try:
            uri = _figure(draw, *args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as exc:
            panel.lines.append(f"figure '{alt}' could not be drawn: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]}")
            return
        if key:
            cache.put(key, uri)
    panel.figures.append((uri, alt))


def _of_facts(result: Any) -> Table | None:
    s = result.summary.get("overfitting") or {}
    of = result.tables["overfitting"]
    if s.get("verdict") is None and of.empty:
        return None
    rows = [{"what": "verdict", "value": s.get("verdict") or "\u2013"},
            {"what": "validation series used", "value": s.get("val_series") or "\u2013"},
            {"what": "divergence step (gap keeps widening)", "value": fmt_num(s.get("divergence_step"))},
            {"what": "validation minimum at step", "value": fmt_num(s.get("val_min_step"))},
            {"what": "GL5 first above 5% at step", "value": fmt_num(s.get("gl5_step"))}]
    if len(of):
        rows.append({"what": "final GL (% above best validation loss)", "value": fmt_num(float(of["gl"].iloc[-1]), 3)})
    return Table("Overfitting (formulas.md section 10)", [("what", "", "text"), ("value", "", "name")], rows)


def _spectral_tables(t: pd.DataFrame) -> tuple[list[Table], list[str]]:
    lines = []
    ok = t[t["finite"].astype(bool)]
    if len(ok):
        rel, prel = ok["rel_err"].astype(float), ok["power_rel_err"].astype(float)
        n = len(ok)
        warm = int(ok["warm_start"].astype(bool).sum())
        pwarm = int(ok["power_warm_start"].astype(bool).sum())
        if np.isfinite(rel).any():
            lines.append(f"Over all {n} estimates: default estimator ({ok['method'].iloc[0]}) max relative error "
                         f"{fmt_num(np.nanmax(rel), 2)} (target 1e-3), largest own error bound "
                         f"{fmt_num(ok['err_bound'].astype(float).max(), 2)}; the sheet's power iteration max relative "
                         f"error {fmt_num(np.nanmax(prel), 2)}, above 1e-3 on {int((prel > 1e-3).sum())} of {n}. "
                         f"Warm-started from the previous checkpoint's vector: {warm} of {n} default estimates, "
                         f"{pwarm} of {n} "
                         "power iterations.")
        else:
            lines.append(f"Exact SVD was off, so the estimates are not validated here (largest own error bound "
                         f"{fmt_num(ok['err_bound'].astype(float).max(), 2)}); {warm} of {n} warm-started.")
        for what, wcol, icol in (("default estimator", "warm_start", "iterations"),
                                 ("sheet's power iteration", "power_warm_start", "power_iterations")):
            mean_it = ok.groupby(ok[wcol].astype(bool))[icol].mean()
            if len(mean_it) == 2:
                lines.append(f"Mean iterations of the {what}: cold start {mean_it[False]:.1f}, warm start from the "
                             f"previous checkpoint's vector {mean_it[True]:.1f}.")
    cols = [("tensor", "tensor", "name"), ("shape", "shape", "text"), ("sigma_est", "sigma est", "num"),
            ("err_bound", "own bound", "num"), ("sigma_power", "sigma power", "num"),
            ("sigma_exact", "sigma exact", "num"), ("rel_err", "rel err", "num"),
            ("power_rel_err", "power rel err", "num"), ("iterations", "iters", "num"),
            ("power_iterations", "power iters", "num"), ("warm_start", "warm", "bool"),
            ("power_warm_start", "power warm", "bool"),
            ("sigma_ratio", "sigma2/sigma1", "num"), ("stable_rank", "stable rank", "num")]
    last_step = int(t["step"].max())
    last = t[t["step"] == last_step].sort_values("tensor")
    tables = [Table(f"Validation at the last checkpoint (step {last_step}): default estimator and the sheet's power "
                    "iteration against exact SVD", cols, _records(last, 60),
                    note=f"{len(last) - 60} more rows in tables/spectral.csv" if len(last) > 60 else "")]
    if len(ok) and np.isfinite(ok["power_rel_err"].astype(float)).any():
        worst = ok.sort_values("power_rel_err", ascending=False).head(5)
        tables.append(Table("Slowest cases for the sheet's power iteration (all checkpoints)",
                            [("step", "step", "num"), *cols], _records(worst)))
    return tables, lines


def build_panels(result: Any, cache: FigureCache = _NO_CACHE) -> list[Panel]:
    """Every panel of the sheet, with figures, tables and the reason when it cannot be computed."""
    T = result.tables
    why = result.panels
    info = result.run_info
    s = result.summary
    of = s.get("overfitting") or {}
    panels: list[Panel] = []

    p = Panel("loss", "1", "Train and validation loss",
              "Healthy: both curves fall and flatten, validation stays close to training, and validation loss does "
              "not climb again after its minimum (no GL5 mark after the val-min mark).")
    if why.get("loss"):
        p.reason = why["loss"]
    else:
        if "overfitting" in result.headlines:
            p.lines.append("Verdict: " + result.headlines["overfitting"])
        _safe_figure(p, cache, "training and validation loss", "plot_loss", T["train"], T["evals"],
                     divergence_step=of.get("divergence_step"), val_min_step=of.get("val_min_step"),
                     gl_step=of.get("gl5_step"), val_series=of.get("val_series"), height=3.6)
        facts = _of_facts(result)
        if facts:
            p.tables.append(facts)
        w = (info.get("window_averaged") or {}).get("loss")
        if w and w > 1:
            p.lines.append(f"The training loss is a mean over {w} steps per logged value.")
    panels.append(p)

    p = Panel("spikes", "2", "Loss and gradient-norm spikes",
              "Healthy: no red marks. Isolated grad-norm spikes early in training are common; repeated loss spikes "
              "or any NaN/inf are not.")
    if why.get("spikes"):
        p.reason = why["spikes"]
    else:
        p.lines.append(result.headlines.get("spikes", ""))
        _safe_figure(p, cache, "loss and grad-norm spikes", "plot_spikes", T["train"], nrows=2, height=2.4, sharex=True)
        sp = T["spikes"]
        if len(sp):
            cols = [("series", "series", "text"), ("kind", "kind", "text"), ("first_step", "first step", "num"),
                    ("peak_step", "peak step", "num"), ("height_mad", "height (robust sigmas)", "num"),
                    ("length", "length (logged steps)", "num")]
            more = f"{len(sp) - 50} more in tables/spikes.csv" if len(sp) > 50 else ""
            p.tables.append(Table("Spike events", cols, _records(sp, 50), note=more))
    panels.append(p)

    p = Panel("grad_norm", "3", "Global gradient norm",
              "Healthy: after warm-up the norm settles into a band that drifts slowly; jumps of 10x or a steady "
              "climb point at instability.")
    if why.get("grad_norm"):
        p.reason = why["grad_norm"]
    else:
        _safe_figure(p, cache, "global gradient norm", "plot_grad_norm", T["train"])
    panels.append(p)

    p = Panel("activations", "4", "Activation magnitude per layer",
              "Healthy: each block's mean |A| stays in a narrow range across checkpoints with a thin band; growth by "
              "orders of magnitude means runaway activations.")
    if why.get("activations"):
        p.reason = why["activations"]
    else:
        _safe_figure(p, cache, "activation magnitude", "plot_activations", T["activations"])
        p.lines.append("Mean |A| of each block's output on the stored evaluation set; the band is +-1 sigma "
                       "over evaluation batches (Welford).")
    panels.append(p)

    p = Panel("spectral", "5", "Spectral norm per weight matrix",
              "Healthy: sigma_1 rises early and then levels off; a matrix whose sigma_1 keeps growing late in training "
              "is a candidate for instability. The default estimator should stay within 1e-3 of exact SVD.")
    if why.get("spectral"):
        p.reason = why["spectral"]
    else:
        _safe_figure(p, cache, "spectral norm per weight matrix", "plot_spectral", T["spectral"], height=3.6)
        tables, lines = _spectral_tables(T["spectral"])
        p.lines += lines
        p.tables += tables
    panels.append(p)

    p = Panel("dead_neurons", "6a", "Dead FFN units",
              "Healthy: no dead units (a unit is dead when |H| < eps on every evaluation token) and few "
              "near-dead ones.")
    if why.get("dead_neurons"):
        p.reason = why["dead_neurons"]
    else:
        dn = T["dead_neurons"]
        _safe_figure(p, cache, "dead FFN units", "plot_dead_neurons", dn, height=3.0)
        last = dn[dn["step"] == dn["step"].max()]
        for r in last.itertuples(index=False):
            p.lines.append(f"{r.layer}: {int(r.dead_count)} of {int(r.d_ff)} units dead on {int(r.n_tokens):,} tokens "
                           f"(eps {float(r.eps):g}, {r.activation}); {int(r.near_dead_count)} near-dead "
                           f"(active on < 0.1% of tokens); activation sparsity {float(r.activation_sparsity):.1%} "
                           "(share of |H| < eps over all elements, a different metric).")
    panels.append(p)

    p = Panel("attention", "6b", "Attention entropy and dead heads",
              "Healthy: most heads keep a spread of attention; low-entropy heads are fine when their label explains "
              "a positional job (offset d, sink). A head is dead when > 99% of its queries have entropy < log 2.")
    if why.get("attention"):
        p.reason = why["attention"]
    else:
        at = T["attention"]
        _safe_figure(p, cache, "attention entropy per head over checkpoints", "plot_attention_entropy", at, height=3.0)
        _safe_figure(p, cache, "attention entropy per layer and head", "plot_attention_heads", at, height=2.6,
                     width=6.5)
        last = at[at["step"] == at["step"].max()].sort_values(["layer", "head"])
        p.tables.append(Table(f"Heads at step {int(at['step'].max())}", [
            ("layer", "layer", "num"), ("head", "head", "num"), ("mean_entropy", "mean H (nats)", "num"),
            ("mean_norm_entropy", "mean H / log(keys)", "num"), ("dead", "dead", "bool"),
            ("dead_ge4", "dead (>= 4 keys)", "bool"), ("share_2_3_keys", "share 2-3 keys", "num"),
            ("sink_mass", "sink mass", "num"), ("offset_mode", "offset mode", "num"),
            ("offset_share", "offset share", "num"), ("label", "label", "name")], _records(last, 200)))
    panels.append(p)

    p = Panel("class_losses", "7a", "Per-class loss and tau",
              "Healthy on the built-in corpus: tau near 0 at the start, about 0.5-1.0 nats around step 500, narrowing "
              "to 0.2-0.5 by the end; the training-window and checkpoint estimates agree within their SE.")
    if why.get("class_losses"):
        p.reason = why["class_losses"]
    else:
        cl = T["class_losses"]
        _safe_figure(p, cache, "per-class loss", "plot_class_losses", cl)
        if "tau" in result.headlines:
            p.lines.append(result.headlines["tau"])
        if len(T["tau"]):
            _safe_figure(p, cache, "tau with 2-SE band", "plot_tau", T["tau"],
                         expected=bool(info.get("builtin_corpus")),
                         last_step=float(T["train"]["step"].max()) if len(T["train"]) else None)
            if info.get("builtin_corpus"):
                p.lines.append("Grey boxes: the sheet's expected tau on the built-in corpus (near 0 at the start, "
                               "0.5-1.0 nats around step 500, 0.2-0.5 over the last 20% of the run).")
            tau_t = T["tau"]
            last_rows = tau_t.sort_values("step").groupby("source", sort=True).tail(1)
            p.tables.append(Table("Latest tau per source", [
                ("source", "source", "name"), ("step", "step", "num"), ("class_a", "class a", "name"),
                ("class_b", "class b", "name"), ("tau", "tau (nats)", "num"), ("se", "SE", "num"),
                ("n_a", "n a", "num"), ("n_b", "n b", "num")], _records(last_rows)))
        else:
            p.lines.append("tau needs two classes; this run has fewer.")
    panels.append(p)

    p = Panel("grad_ratio", "7b", "Grad-to-weight and update ratios",
              "Healthy: rho = ||G||/||W|| between 1e-4 and 1e-1 for every matrix (below: barely training; above: "
              "unstable); update ratio between checkpoints near 1e-3 per step.")
    if why.get("grad_ratio"):
        p.reason = why["grad_ratio"]
    else:
        if len(T["grad_ratio"]):
            _safe_figure(p, cache, "grad-to-weight ratio", "plot_grad_ratio", T["grad_ratio"], height=3.4)
            p.lines.append("rho from one backward pass on an evaluation batch at each checkpoint (offline).")
        elif why.get("activations"):
            p.lines.append(f"No offline rho: {why['activations']}")
        if len(T["update_ratio"]):
            _safe_figure(p, cache, "update ratio per step", "plot_update_ratio", T["update_ratio"], height=3.4)
        gr = T["grad_ratio"]
        if len(gr):
            last = gr[gr["step"] == gr["step"].max()].sort_values("rho", ascending=False)
            p.tables.append(Table(f"Grad-to-weight ratio at step {int(gr['step'].max())}", [
                ("tensor", "tensor", "name"), ("rho", "rho", "num"), ("grad_norm", "||G||", "num"),
                ("weight_norm", "||W||", "num"), ("status", "status", "text")], _records(last, 60)))
    panels.append(p)

    p = Panel("logits", "8", "Attention logits and output log Z (beyond the sheet)",
              "Healthy: the largest attention logit levels off (fast growth precedes entropy collapse) and the "
              "output log-partition stays bounded.")
    if why.get("logits"):
        p.reason = why["logits"]
    elif len(T["attention_logits"]) or len(T["eval_set"]):
        _safe_figure(p, cache, "max attention logit and log Z", "plot_logits", T["attention_logits"], T["eval_set"],
                     ncols=2, height=3.0, width=9.0)
        es = T["eval_set"]
        if len(es):
            r = es.sort_values("step").iloc[-1]
            p.lines.append(f"Token-weighted loss on the stored evaluation set at step {int(r['step'])}: "
                           f"{fmt_num(r['loss'])} nats over {int(r['n_tokens']):,} target tokens.")
    else:
        p.reason = "no model pass produced attention logits"
    panels.append(p)
    return panels


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
                  figure_cache: str | os.PathLike[str] | None = None) -> str:
    """The report as one HTML string (an AnalysisResult in; `run_meta` adds header rows).

    `figure_cache`: a folder where drawn figures are kept by a hash of their input tables, so a
    re-render of unchanged results draws nothing (None: draw everything).
    """
    cache = FigureCache(None if figure_cache is None else Path(figure_cache))
    panels = build_panels(result, cache)
    cache.prune()
    header = _header_rows(result)
    for k, v in (run_meta or {}).items():
        header.append((str(k), str(v)))
    counts = {sev: sum(1 for f in result.findings if str(f.severity) == sev) for sev in ("error", "warning", "info")}
    from importlib import metadata

    try:
        version = metadata.version("trainaudit")
    except metadata.PackageNotFoundError:
        version = "dev"
    return _env().get_template("report.html.j2").render(
        csp=CSP, run_name=str(result.run_info.get("name", "")), header=header, findings=result.findings,
        counts=counts, headlines=result.headlines, panels=panels, notes=result.notes,
        data_warnings=result.data_warnings, version=version,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        table_names=list(TABLE_COLUMNS))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) via a temp file in the same folder and os.replace; the old file stays
    untouched on failure and the temp file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", errors="replace", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainauditError(path, f"cannot write report: {(exc.strerror or str(exc)).lower()}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_report(result: Any, path: str | os.PathLike[str], run_meta: Mapping[str, Any] | None = None, *,
                 figure_cache: str | os.PathLike[str] | None = None) -> Path:
    """Render and write the report atomically; returns the path."""
    return write_text_atomic(path, render_report(result, run_meta, figure_cache=figure_cache))
