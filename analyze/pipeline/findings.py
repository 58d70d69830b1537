"""Findings: the health summary derived from the analysis tables, one plain sentence each.

Each rule reads a table the pipeline built and states what it saw, where (tensor / layer), when
(step), the value and the threshold it was held against. Long lists are capped: the first few
findings of a kind are listed and one more finding counts the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from analyze.metrics.rho import classify_rho  # numpy only: a cached report imports no torch
from analyze.metrics.growth import spectral_growth
from analyze.metrics.overfitting import memorisation
from analyze.pipeline.tables import SEVERITY_ORDER, Finding, Severity, finite_or_none

__all__ = ["Context", "derive", "MAX_PER_KIND", "checkpoint_to_keep"]

MAX_PER_KIND = 5  # findings of one kind listed before "N more" (a display cap; thresholds are in AnalysisConfig)


@dataclass(frozen=True, slots=True)
class Context:
    cfg: AnalysisConfig
    run_name: str
    is_builtin_corpus: bool
    overfitting: Any  # analyze.metrics.overfitting.Overfitting | None
    val_series: str | None
    n_data_warnings: int
    last_step: int = 0


def _capped(items: list[Finding], code: str, what: str) -> list[Finding]:
    if len(items) <= MAX_PER_KIND:
        return items
    worst = items[0].severity
    rest = len(items) - MAX_PER_KIND
    return items[:MAX_PER_KIND] + [Finding(worst, code, f"{rest} more {what} not listed here (see the tables).",
                                           metric=items[0].metric, n=rest)]


def _spikes(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    out: list[Finding] = []
    labels = {"loss": "Training loss", "grad_norm": "The global gradient norm"}
    for series in ("loss", "grad_norm"):
        ev = t[t["series"] == series]
        spikes, nonfin = [], []
        for r in ev.itertuples(index=False):
            if r.kind == "non-finite":
                nonfin.append(Finding(
                    Severity.ERROR, f"nonfinite_{series}",
                    f"{labels[series]} was NaN or infinite at step {r.first_step}"
                    + (f" and the {int(r.length) - 1} logged step(s) after it." if r.length > 1 else "."),
                    step=int(r.first_step), metric=series))
            else:
                sev = Severity.WARNING if series == "loss" else Severity.INFO
                spikes.append(Finding(
                    sev, f"{series}_spike",
                    f"{labels[series]} spiked at step {r.peak_step}: {float(r.height_mad):.1f} MAD units "
                    f"({float(r.height_sigma):.1f} robust sigmas, threshold {cfg.spike_k:g}) above the "
                    f"median of the previous {cfg.spike_window} logged values (first flagged at step {r.first_step}, "
                    f"{int(r.length)} logged step(s)).",
                    step=int(r.peak_step), value=finite_or_none(r.height_sigma), threshold=cfg.spike_k,
                    metric=f"{series} spike height (robust sigmas)"))
        out += _capped(nonfin, f"nonfinite_{series}", "non-finite events")
        out += _capped(spikes, f"{series}_spike", f"{series} spike events")
    return out


def _overfitting(ctx: Context) -> list[Finding]:
    of = ctx.overfitting
    if of is None or of.verdict is None:
        return []
    cfg = ctx.cfg
    rule = (f"Rule: a rise is sustained when GL (validation loss above its best so far, %) is over "
            f"{cfg.gl_alpha:g} at the last evaluation and still over it where the least-squares trend of the "
            f"last {cfg.overfit_trend_evals} evaluations since the minimum leads over the same span again; a rise "
            f"above {cfg.gl_alpha:g} that is not sustained is a bump the run recovered from.")
    out = []
    what = of.headline.split(": ", 1)[-1]
    what = what[:1].upper() + what[1:]
    if of.verdict in ("overfitting", "unstable"):
        sev = Severity.WARNING if of.verdict == "overfitting" else Severity.ERROR
        # the GL the verdict is about: at the last evaluation (step and value of one row)
        out.append(Finding(sev, of.verdict, f"{what}. {rule}",
                           step=_int(of.final_step), value=finite_or_none(of.final_rise_pct),
                           threshold=cfg.gl_alpha, metric=f"GL at the end (validation {ctx.val_series})"))
    elif of.verdict == "recovered":
        out.append(Finding(Severity.INFO, "overfitting_recovered", f"{what}. {rule}",
                           step=_int(of.max_rise_step), value=finite_or_none(of.max_rise_pct),
                           threshold=cfg.gl_alpha, metric=f"peak GL (validation {ctx.val_series})"))
    if of.verdict not in ("overfitting", "unstable") and of.divergence_step is not None:
        out.append(Finding(Severity.INFO, "train_val_divergence",
                           f"The train/val gap has widened consistently since step {of.divergence_step}, while "
                           "validation loss is still near its best: the model fits its training data faster than "
                           "it generalises.", step=_int(of.divergence_step), metric="train/val gap"))
    return out


def _memorisation(t: pd.DataFrame, ctx: Context) -> list[Finding]:
    """Training loss far below validation loss at the last evaluation with both (ours, beside §10)."""
    cfg = ctx.cfg
    if t.empty:
        return []
    ok = t[np.isfinite(t["train_loss"].astype(float)) & np.isfinite(t["val_loss"].astype(float))]
    if ok.empty:
        return []
    last = ok.iloc[-1]
    tr, va = float(last["train_loss"]), float(last["val_loss"])
    if not memorisation(tr, va, ratio=cfg.memorisation_ratio, min_gap=cfg.memorisation_min_gap):
        return []
    return [Finding(
        Severity.WARNING, "memorisation",
        f"Memorisation: at step {int(last['step'])} training loss is {tr:.4g} against validation loss {va:.4g} "
        f"({tr / va:.1%} of it, {va - tr:.3g} nats below): the model fits its training data far better than "
        f"held-out data. Rule: training loss at most {cfg.memorisation_ratio:g} x validation loss and at least "
        f"{cfg.memorisation_min_gap:g} nats below it at the last evaluation.",
        step=int(last["step"]), value=tr / va, threshold=cfg.memorisation_ratio,
        metric=f"train/val loss ratio (validation {ctx.val_series})")]


def _int(x: Any) -> int | None:
    v = finite_or_none(x)
    return None if v is None else int(v)


def _last(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    return df[df["step"] == df["step"].max()]


def _spectral(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    if t.empty:
        return []
    out: list[Finding] = []
    bad = t[~t["finite"].astype(bool)]
    nonfin = [Finding(Severity.ERROR, "nonfinite_weights", f"{r.tensor}: the weights hold NaN or infinite values at "
                      f"step {r.step}.", step=int(r.step), tensor=str(r.tensor), metric="weights")
              for r in bad.drop_duplicates("tensor").itertuples(index=False)]
    out += _capped(nonfin, "nonfinite_weights", "tensors with non-finite weights")
    ok = t[t["finite"].astype(bool)]
    if ok.empty:
        return out
    growth = []
    sg = spectral_growth(t)  # over the second half of the run (analyze.metrics.growth)
    if sg is not None:
        for name, g in sg.flagged(cfg.spectral_growth).items():
            growth.append(Finding(
                Severity.WARNING, "spectral_growth",
                f"{name}: spectral norm grew {g:.1f}x between steps {sg.ref_step} and {sg.last_step} "
                f"({sg.sigma_ref[name]:.3g} to {sg.sigma_last[name]:.3g}), above the {cfg.spectral_growth:g}x "
                "threshold; late growth of sigma_1 often precedes instability.",
                step=sg.last_step, tensor=str(name), value=float(g), threshold=cfg.spectral_growth,
                metric="spectral norm growth"))
    out += _capped(growth, "spectral_growth", "tensors with spectral-norm growth")
    rel = ok["rel_err"].astype(float)
    worse = ok[rel > cfg.estimator_rel_tol].sort_values("rel_err", ascending=False)
    est = [Finding(Severity.WARNING, "estimator_error",
                   f"{r.tensor} at step {r.step}: the default spectral-norm estimator is off by {float(r.rel_err):.1e} "
                   f"relative to exact SVD, above the {cfg.estimator_rel_tol:g} target (its own bound said "
                   f"{float(r.err_bound):.1e}).", step=int(r.step), tensor=str(r.tensor), value=float(r.rel_err),
                   threshold=cfg.estimator_rel_tol, metric="spectral estimator error")
           for r in worse.itertuples(index=False)]
    out += _capped(est, "estimator_error", f"estimates outside the {cfg.estimator_rel_tol:g} target")
    prel = ok["power_rel_err"].astype(float)
    off = ok[prel > cfg.estimator_rel_tol]
    if len(off):
        worst = off.loc[off["power_rel_err"].astype(float).idxmax()]
        ratio = finite_or_none(worst["sigma_ratio"])  # of the matrix named, not the largest of any
        ratio_txt = "" if ratio is None else f" (sigma_2/sigma_1 = {ratio:.3f} there)"
        out.append(Finding(
            Severity.INFO, "power_iteration_error",
            f"The sheet's power iteration (stop at relative change {cfg.power_tol:g}) was off by more than "
            f"{cfg.estimator_rel_tol:g} on {len(off)} of {len(ok)} matrix estimates, worst "
            f"{float(worst.power_rel_err):.1e} "
            f"on {worst.tensor} at step {worst.step}{ratio_txt}: a change-based stop does not bound the error.",
            step=int(worst.step), tensor=str(worst.tensor), value=float(worst.power_rel_err),
            threshold=cfg.estimator_rel_tol, metric="power iteration error"))
    return out


def _dead(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    out = []
    for r in _last(t).itertuples(index=False):
        if int(r.dead_count) <= 0:
            continue
        frac = float(r.dead_fraction)
        sev = Severity.WARNING if frac >= cfg.dead_fraction_warn else Severity.INFO
        out.append(Finding(
            sev, "dead_neurons",
            f"{r.layer} FFN: {int(r.dead_count)} of {int(r.d_ff)} units dead on {int(r.n_tokens):,} tokens "
            f"(eps {float(r.eps):g}, {r.activation}).", step=int(r.step), tensor=str(r.layer), value=frac,
            threshold=cfg.dead_fraction_warn, metric="dead unit fraction"))
    return out


def _heads(t: pd.DataFrame) -> list[Finding]:
    out = []
    for r in _last(t).itertuples(index=False):
        if not bool(r.dead):
            continue
        ge4 = ("; it stays dead on queries with >= 4 visible keys" if bool(r.dead_ge4)
               else "; on queries with >= 4 visible keys it is not dead (short contexts push toward 'dead')")
        out.append(Finding(
            Severity.INFO, "dead_head",
            f"Layer {r.layer} head {r.head} is dead by the sheet's rule (attention entropy below log 2 on more "
            f"than 99% of queries); label: {r.label}{ge4}.", step=int(r.step), tensor=f"layer {r.layer} head {r.head}",
            value=finite_or_none(r.mean_entropy), threshold=math.log(2), metric="attention entropy"))
    return _capped(out, "dead_head", "dead heads")


def _rho_source(r: Any) -> str:
    """How a grad_ratio row's rho was measured, as the finding says it (§11)."""
    if str(getattr(r, "source", "")) == "training":
        return "from the gradient norms logged in training at that step"
    return "evaluation batch: one backward pass on a sample of the evaluation set, the fallback"


def _rho(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    out = []
    last = _last(t)
    # §11 verdict against this config's band (not the cached `status`, classified when the row was made)
    verdicts = [classify_rho(float(x), cfg.rho_low, cfg.rho_high) for x in last["rho"].astype(float)]
    for r, meaning in zip(last.itertuples(index=False), verdicts):
        meaning = str(meaning)
        if meaning == "healthy":
            continue
        rho = finite_or_none(r.rho)
        side = "outside" if rho is None else "below" if meaning == "barely training" else "above"
        out.append(Finding(
            Severity.WARNING, "grad_ratio",
            f"{r.tensor}: grad-to-weight ratio {rho if rho is not None else float('nan'):.2e} at step {r.step} "
            f"({_rho_source(r)}) is {side} the healthy range {cfg.rho_low:g} to "
            f"{cfg.rho_high:g} ({meaning}).", step=int(r.step),
            tensor=str(r.tensor), value=rho, threshold=cfg.rho_high if side == "above" else cfg.rho_low,
            metric="grad-to-weight ratio"))
    return _capped(out, "grad_ratio", "tensors outside the healthy ratio range")


def _logits(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    out = []
    steps = sorted(t["step"].unique()) if len(t) else []
    if len(steps) < 2:
        return out
    first = t[t["step"] == steps[0]].set_index("layer")["max_logit"].astype(float)
    last = t[t["step"] == steps[-1]].set_index("layer")["max_logit"].astype(float)
    for layer in last.index:
        a, b = first.get(layer, math.nan), last[layer]
        if math.isfinite(a) and a > 0 and b > cfg.logit_growth * a and b > cfg.logit_growth_min:
            out.append(Finding(Severity.INFO, "attention_logit_growth",
                               f"Layer {layer}: the largest attention logit grew from {a:.1f} to {b:.1f} between steps "
                               f"{steps[0]} and {steps[-1]}; attention-logit growth tends to precede entropy collapse.",
                               step=int(steps[-1]), tensor=f"layer {layer}", value=float(b),
                               metric="max attention logit"))
    return out


def _tau(t: pd.DataFrame, ctx: Context) -> list[Finding]:
    band = ctx.cfg.expected_tau_end
    if not ctx.is_builtin_corpus or t.empty or band is None or ctx.last_step < ctx.cfg.tau_band_min_steps:
        return []  # the sheet's end-of-training band is for a full-length demo run
    tr = t[t["source"] == "train"]
    tr = tr[np.isfinite(tr["tau"].astype(float))]
    if tr.empty:
        return []
    last = tr.iloc[-1]
    lo, hi = band
    v = float(last["tau"])
    if lo <= v <= hi:
        return []
    return [Finding(Severity.INFO, "tau_band",
                    f"The irregular-verb tax ended at {v:.2f} nats (window ending step {int(last['step'])}), "
                    "outside the "
                    f"sheet's expected {lo:g} to {hi:g} nats at the end of training.", step=int(last["step"]),
                    value=v, threshold=hi if v > hi else lo, metric="tau")]


def _tau_disagreement(t: pd.DataFrame, cfg: AnalysisConfig) -> list[Finding]:
    """Training-window tau against the checkpoint's held-out tau at the same point (§8: they should
    agree within their SE). Each checkpoint step s is paired with the training window ending at or
    before s, if it ends within one window (`class_window` steps) of s; flagged when
    |tau_train - tau_checkpoint| > tau_disagreement_se * sqrt(se_train^2 + se_checkpoint^2)."""
    if t.empty:
        return []
    num = t.assign(step=t["step"].astype(np.int64), tau=t["tau"].astype(float), se=t["se"].astype(float))
    num = num[np.isfinite(num["tau"]) & np.isfinite(num["se"])]
    tr = num[num["source"] == "train"].sort_values("step")
    ck = num[num["source"] == "checkpoint"].sort_values("step")
    if tr.empty or ck.empty:
        return []
    # each checkpoint with the latest training window ending at or before its step
    pair = pd.merge_asof(ck, tr.assign(tr_step=tr["step"]), on="step", direction="backward", suffixes=("_ck", "_tr"))
    pair = pair[np.isfinite(pair["tau_tr"].astype(float)) & (pair["step"] - pair["tr_step"] < cfg.class_window)]
    combined = np.hypot(pair["se_tr"].astype(float), pair["se_ck"].astype(float))
    diff = (pair["tau_tr"].astype(float) - pair["tau_ck"].astype(float)).abs()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(combined > 0, diff / combined, np.where(diff > 0, np.inf, 0.0))
    out = []
    for r, zz in zip(pair.itertuples(index=False), z):
        if not zz > cfg.tau_disagreement_se:
            continue
        out.append(Finding(
            Severity.WARNING, "tau_disagreement",
            f"tau = L({r.class_a_ck}) - L({r.class_b_ck}) disagrees between the training window ending at step "
            f"{int(r.tr_step)} ({float(r.tau_tr):.3f} +- {float(r.se_tr):.3f}) and the checkpoint's held-out "
            f"evaluation at step {int(r.step)} ({float(r.tau_ck):.3f} +- {float(r.se_ck):.3f}): {float(zz):.2f} "
            f"combined SE apart, more than {cfg.tau_disagreement_se:g} (§8 expects agreement within SE; the "
            "training windows see training examples, the checkpoint held-out ones).",
            step=int(r.step), value=float(zz), threshold=cfg.tau_disagreement_se,
            metric="tau train vs held-out (combined SE)"))
    return _capped(out, "tau_disagreement", "checkpoints where training and held-out tau disagree")


def derive(tables: dict[str, pd.DataFrame], ctx: Context) -> list[Finding]:
    """All findings, errors first, then warnings, then info; by step within a severity."""
    cfg = ctx.cfg
    found: list[Finding] = []
    if ctx.n_data_warnings:
        found.append(Finding(Severity.WARNING, "data_warnings",
                             f"{ctx.n_data_warnings} problem(s) in the run's files were skipped or repaired while "
                             "reading it; see Data issues.", value=float(ctx.n_data_warnings), metric="input data"))
    found += _spikes(tables["spikes"], cfg)
    found += _overfitting(ctx)
    found += _memorisation(tables["overfitting"], ctx)
    found += _spectral(tables["spectral"], cfg)
    found += _dead(tables["dead_neurons"], cfg)
    found += _heads(tables["attention"])
    found += _rho(tables["grad_ratio"], cfg)
    found += _logits(tables["attention_logits"], cfg)
    found += _tau(tables["tau"], ctx)
    found += _tau_disagreement(tables["tau"], cfg)
    # stable: a capped kind keeps its "N more" line after its listed findings
    return sorted(found, key=lambda f: SEVERITY_ORDER[Severity(f.severity)])


def checkpoint_to_keep(tables: dict[str, pd.DataFrame], checkpoints: list[int],
                       val_series: str | None) -> dict[str, int | None]:
    """The checkpoints a reader would keep (summary.json `checkpoint_to_keep`).

    ``best_val_step``: the saved checkpoint whose validation loss is lowest, its loss being the
    chosen validation series' evaluation at its step, else the latest one before it (the
    checkpoint's own pass over the stored evaluation set, `eval_set`, when the run logs no
    validation series); the earliest on ties; None when no checkpoint has one.
    ``last_stable_step``: the last saved checkpoint before the first spike or non-finite event of
    the loss or gradient norm (or the first checkpoint with non-finite weights); the last
    checkpoint when there is none; None when no checkpoint precedes it.
    """
    steps = sorted(int(s) for s in checkpoints)
    out: dict[str, int | None] = {"best_val_step": None, "last_stable_step": None}
    if not steps:
        return out
    ck = pd.DataFrame({"step": np.asarray(steps, dtype=np.int64)})
    ev = tables["evals"]
    ev = ev[ev["series"].astype(str) == val_series] if val_series is not None and len(ev) else ev.iloc[0:0]
    src = ev if len(ev) else tables["eval_set"]
    step = pd.to_numeric(src["step"], errors="coerce").astype(float)
    loss = pd.to_numeric(src["loss"], errors="coerce").astype(float)
    keep_rows = np.isfinite(step) & np.isfinite(loss)
    val = pd.DataFrame({"step": step[keep_rows].astype(np.int64), "loss": loss[keep_rows]})
    val = val.sort_values("step", kind="stable").drop_duplicates("step", keep="last")
    if len(val):
        at = pd.merge_asof(ck, val, on="step", direction="backward")
        at = at[np.isfinite(at["loss"])]
        if len(at):
            out["best_val_step"] = int(at.loc[at["loss"].idxmin(), "step"])  # idxmin: first on ties
    events = []
    sp = tables["spikes"]
    if len(sp):
        events.append(int(sp["first_step"].astype(float).min()))
    spec = tables["spectral"]
    if len(spec):
        bad = spec[~spec["finite"].astype(bool)]
        if len(bad):
            events.append(int(bad["step"].astype(np.int64).min()))
    first = min(events) if events else None
    stable = [s for s in steps if first is None or s < first]
    out["last_stable_step"] = stable[-1] if stable else None
    return out
