"""The report's panels (formula-sheet sections §1-§12 plus logits; docs/metrics), built from an analysis result's
tables: one function per panel fills its figures, tables and lines. Nothing here computes a
metric; thresholds shown (healthy bands) come from the result's AnalysisConfig.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from reports.page import FigureCache, Panel, Table, add_figure, fmt_num, fmt_sci, records

__all__ = ["build_panels", "PANEL_SPECS"]

Fill = Callable[[Panel, Any, FigureCache], None]


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
    return Table("Overfitting (§10)", [("what", "", "text"), ("value", "", "name")], rows)


def _spectral_tables(t: pd.DataFrame, power_limit: int | None = None) -> tuple[list[Table], list[str]]:
    lines = []
    ok = t[t["finite"].astype(bool)]
    if len(ok) and not (ok["power_iterations"].astype(float) > 0).any():
        limit = f"{power_limit:,}" if power_limit is not None else "no"
        lines.append(f"The sheet's power iteration did not run (AnalysisConfig.power_iteration_max_params: it runs "
                     f"on checkpoints up to {limit} parameters, unless power_iteration is off): its columns "
                     "(power: sigma, rel err, iters) are empty; the default estimator and its bound are on every row.")
    if len(ok):
        rel, prel = ok["rel_err"].astype(float), ok["power_rel_err"].astype(float)
        n = len(ok)
        warm = int(ok["warm_start"].astype(bool).sum())
        pwarm = int(ok["power_warm_start"].astype(bool).sum())
        if np.isfinite(rel).any():
            lines.append(f"Over all {n} estimates: default estimator ({ok['method'].iloc[0]}) max relative error "
                         f"{fmt_num(np.nanmax(rel), 2)} (target 1e-3), largest own error bound "
                         f"{fmt_num(ok['err_bound'].astype(float).max(), 2)}"
                         + (f"; the sheet's power iteration max relative error {fmt_num(np.nanmax(prel), 2)}, above "
                            f"1e-3 on {int((prel > 1e-3).sum())} of {n}. " if np.isfinite(prel).any() else ". ")
                         + f"Warm-started from the previous checkpoint's vector: {warm} of {n} default estimates, "
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
    cols = [("tensor", "tensor", "name"), ("shape", "shape", "text"), ("sigma_exact", "sigma exact", "num"),
            ("sigma_est", "default: sigma", "num"), ("err_bound", "default: own bound", "num"),
            ("rel_err", "default: rel err", "num"), ("iterations", "default: iters", "num"),
            ("sigma_power", "power: sigma", "num"), ("power_rel_err", "power: rel err", "num"),
            ("power_iterations", "power: iters", "num"), ("sigma_ratio", "sigma2/ sigma1", "num"),
            ("stable_rank", "stable rank", "num")]
    last_step = int(t["step"].max())
    # model order: numbers in names compared as numbers (blocks.2 before blocks.10)
    last = t[t["step"] == last_step].sort_values(
        "tensor", key=lambda c: c.astype(str).str.replace(r"\d+", lambda m: m.group().zfill(10), regex=True))
    n_show = 60
    tables = [Table(f"Validation at the last checkpoint (step {last_step}), by tensor name: the default estimator "
                    f"({t['method'].iloc[0] if len(t) else '-'}) and the sheet's power iteration against exact SVD",
                    cols, records(last, n_show),
                    note=f"{len(last) - n_show} more rows in tables/spectral.csv" if len(last) > n_show else "")]
    if len(ok) and np.isfinite(ok["power_iterations"].astype(float)).any():
        # slowest = most iterations; sigma2/sigma1 beside them says why (power iteration converges as (s2/s1)^k)
        slow = ok.assign(_it=ok["power_iterations"].astype(float), _err=ok["power_rel_err"].astype(float))
        slow = slow.sort_values(["_it", "_err"], ascending=False, na_position="last").head(5)
        tables.append(Table("Slowest cases for the sheet's power iteration (most iterations, all checkpoints)", [
            ("step", "step", "num"), ("tensor", "tensor", "name"), ("shape", "shape", "text"),
            ("power_iterations", "power: iters", "num"), ("power_warm_start", "warm start", "bool"),
            ("sigma_ratio", "sigma2/ sigma1", "num"), ("power_rel_err", "power: rel err", "num"),
            ("iterations", "default: iters", "num"), ("rel_err", "default: rel err", "num")], records(slow)))
    return tables, lines




def _config(result: Any) -> AnalysisConfig:
    """The thresholds the analysis ran with (the defaults for a result that does not carry them)."""
    cfg = getattr(result, "config", None)
    return cfg if isinstance(cfg, AnalysisConfig) else AnalysisConfig()


def _loss(p: Panel, result: Any, cache: FigureCache) -> None:
    T, of = result.tables, result.summary.get("overfitting") or {}
    if "overfitting" in result.headlines:
        p.lines.append("Verdict: " + result.headlines["overfitting"])
    add_figure(p, cache, "training and validation loss", "plot_loss", T["train"], T["evals"],
               divergence_step=of.get("divergence_step"), val_min_step=of.get("val_min_step"),
               gl_step=of.get("gl5_step"), val_series=of.get("val_series"), height=3.6)
    facts = _of_facts(result)
    if facts:
        p.tables.append(facts)
    w = (result.run_info.get("window_averaged") or {}).get("loss")
    if w and w > 1:
        p.lines.append(f"The training loss is a mean over {w} steps per logged value.")


def _spikes(p: Panel, result: Any, cache: FigureCache) -> None:
    p.lines.append(result.headlines.get("spikes", ""))
    score = (result.summary or {}).get("spike_score")
    if isinstance(score, dict):
        parts = [f"{name} {100 * v:.3g}%" if v is not None else f"{name} not logged"
                 for name, v in (("loss", score.get("loss")), ("grad norm", score.get("grad_norm")))]
        p.lines.append("Spike score (§9: share of logged points flagged): " + ", ".join(parts) + ".")
    add_figure(p, cache, "loss and grad-norm spikes", "plot_spikes", result.tables["train"], nrows=2, height=2.6,
               sharex=True)
    sp = result.tables["spikes"]
    if len(sp):
        both = "height_sigma" in sp.columns  # MAD units (§9) beside robust sigmas (1.4826 MAD)
        cols = [("series", "series", "text"), ("kind", "kind", "text"), ("first_step", "first step", "num"),
                ("peak_step", "peak step", "num"),
                ("height_mad", "height (MAD units)" if both else "height (robust sigmas)", "num"),
                *([("height_sigma", "height (robust sigmas, 1.4826 MAD)", "num")] if both else []),
                ("length", "length (logged steps)", "num")]
        more = f"{len(sp) - 50} more in tables/spikes.csv" if len(sp) > 50 else ""
        p.tables.append(Table("Spike events", cols, records(sp, 50), note=more))


def _grad_norm(p: Panel, result: Any, cache: FigureCache) -> None:
    add_figure(p, cache, "global gradient norm", "plot_grad_norm", result.tables["train"])


def _activations(p: Panel, result: Any, cache: FigureCache) -> None:
    add_figure(p, cache, "activation magnitude", "plot_activations", result.tables["activations"])
    p.lines.append("Mean |A| of each block's output on the stored evaluation set, over real tokens only "
                   "(padding positions excluded by the attention mask); the band is +-1 sigma over evaluation "
                   "batches (Welford), clipped at 0 since |A| >= 0.")


def _spectral(p: Panel, result: Any, cache: FigureCache) -> None:
    add_figure(p, cache, "spectral norm per weight matrix", "plot_spectral", result.tables["spectral"], height=3.6)
    tables, lines = _spectral_tables(result.tables["spectral"], _config(result).power_iteration_max_params)
    p.lines += lines
    p.tables += tables


def _dead_neurons(p: Panel, result: Any, cache: FigureCache) -> None:
    dn = result.tables["dead_neurons"]
    add_figure(p, cache, "dead FFN units", "plot_dead_neurons", dn, height=3.0)
    last = dn[dn["step"] == dn["step"].max()]
    for r in last.itertuples(index=False):
        p.lines.append(f"{r.layer}: {int(r.dead_count)} of {int(r.d_ff)} units dead on {int(r.n_tokens):,} tokens "
                       f"(eps {float(r.eps):g}, {r.activation}); {int(r.near_dead_count)} near-dead "
                       f"(active on < 0.1% of tokens); activation sparsity {float(r.activation_sparsity):.1%} "
                       "(share of |H| < eps over all elements, a different metric).")


def _attention(p: Panel, result: Any, cache: FigureCache) -> None:
    at = result.tables["attention"]
    add_figure(p, cache, "attention entropy per head over checkpoints", "plot_attention_entropy", at, height=3.0)
    n_layers = at["layer"].nunique()  # the heat map grows with the layers, up to 9 inches
    add_figure(p, cache, "attention entropy per layer and head", "plot_attention_heads", at,
               height=min(9.0, max(2.6, 0.18 * n_layers + 1.2)), width=6.5)
    p.lines.append("Entropies over real query tokens only: padding queries are skipped and padding keys are "
                   "not attended to (the evaluation set's attention mask).")
    last = at[at["step"] == at["step"].max()].sort_values(["layer", "head"])
    p.tables.append(Table(f"Heads at step {int(at['step'].max())}", [
        ("layer", "layer", "num"), ("head", "head", "num"), ("mean_entropy", "mean H (nats)", "num"),
        ("mean_norm_entropy", "mean H / log(keys)", "num"), ("dead", "dead", "bool"),
        ("dead_ge4", "dead (>= 4 keys)", "bool"), ("share_2_3_keys", "share 2-3 keys", "num"),
        ("sink_mass", "sink mass", "num"), ("offset_mode", "offset mode", "num"),
        ("offset_share", "offset share", "num"), ("label", "label", "name")], records(last, 200)))


def _class_losses(p: Panel, result: Any, cache: FigureCache) -> None:
    T, info = result.tables, result.run_info
    add_figure(p, cache, "per-class loss", "plot_class_losses", T["class_losses"])
    if "tau" in result.headlines:
        p.lines.append(result.headlines["tau"])
    if not len(T["tau"]):
        p.lines.append("tau needs two classes; this run has fewer.")
        return
    builtin = bool(info.get("builtin_corpus"))
    cfg = _config(result)
    last_step = float(max(T["train"]["step"].max() if len(T["train"]) else 0, T["tau"]["step"].max()))
    # the sheet's expected shape describes its ~2000-step demo; shorter runs are neither judged by the
    # tau_band finding nor drawn against it (the same cfg.tau_band_min_steps)
    compare = builtin and last_step >= cfg.tau_band_min_steps
    add_figure(p, cache, "tau with 2-SE band", "plot_tau", T["tau"], bands=cfg.expected_tau_bands if compare else (),
               last_step=last_step)
    if compare:
        boxes = "; ".join(f"{lo:g} to {hi:g} nats " + (f"from step {a:g} to {b:g}" if a is not None and b is not None
                                                        else "over the last 20% of the run")
                          for a, b, lo, hi in cfg.expected_tau_bands)
        p.lines.append(f"Grey boxes: the sheet's expected tau on the built-in corpus ({boxes}); a box is drawn "
                       "only where it lies inside the run's steps.")
    elif builtin:
        p.lines.append(f"No expected-tau boxes: the sheet's expected shape describes its ~2000-step demo, and this "
                       f"run ends at step {last_step:g}, under the {cfg.tau_band_min_steps} steps a run needs to be "
                       "compared with it (the tau_band finding uses the same limit).")
    last_rows = T["tau"].sort_values("step").groupby("source", sort=True).tail(1)
    p.tables.append(Table("Latest tau per source", [
        ("source", "source", "name"), ("step", "step", "num"), ("class_a", "class a", "name"),
        ("class_b", "class b", "name"), ("tau", "tau (nats)", "num"), ("se", "SE", "num"),
        ("n_a", "n a", "num"), ("n_b", "n b", "num")], records(last_rows)))


def _grad_ratio(p: Panel, result: Any, cache: FigureCache) -> None:
    T, cfg = result.tables, _config(result)
    gr = T["grad_ratio"]
    if len(gr):
        add_figure(p, cache, "grad-to-weight ratio", "plot_grad_ratio", gr, healthy=(cfg.rho_low, cfg.rho_high),
                   height=3.4)
        src = set(gr["source"].astype(str)) if "source" in gr.columns else {"evaluation batch"}
        if src == {"training"}:
            p.lines.append("rho from the per-tensor gradient norms the logger recorded during training (§11).")
        elif "training" in src:
            p.lines.append("rho from the per-tensor gradient norms the logger recorded during training where it "
                           "recorded them (source 'training'), else from one backward pass on an evaluation "
                           "batch (source 'evaluation batch').")
        else:
            p.lines.append("rho from one backward pass on a sample of the evaluation set at each checkpoint "
                           "(offline fallback: the run has no logged per-tensor gradient norms).")
    elif result.panels.get("activations"):
        p.lines.append(f"No offline rho: {result.panels['activations']}")
    if len(T["update_ratio"]):
        add_figure(p, cache, "update ratio per step", "plot_update_ratio", T["update_ratio"],
                   healthy=(cfg.update_ratio_low, cfg.update_ratio_high), height=3.4)
    if len(gr):
        last = gr[gr["step"] == gr["step"].max()].sort_values("rho", ascending=False)
        p.tables.append(Table(f"Grad-to-weight ratio at step {int(gr['step'].max())}", [
            ("tensor", "tensor", "name"), ("rho", "rho", "num"), ("grad_norm", "||G||", "num"),
            ("weight_norm", "||W||", "num"), ("status", "status", "text"),
            *([("source", "source", "text")] if "source" in gr.columns else [])], records(last, 60)))


def _logits(p: Panel, result: Any, cache: FigureCache) -> None:
    T = result.tables
    if not (len(T["attention_logits"]) or len(T["eval_set"])):
        p.reason = "no model pass produced attention logits"
        return
    add_figure(p, cache, "max attention logit and log Z", "plot_logits", T["attention_logits"], T["eval_set"],
               ncols=2, height=3.0, width=9.0)
    es = T["eval_set"]
    if len(es):
        r = es.sort_values("step").iloc[-1]
        p.lines.append(f"Token-weighted loss on the stored evaluation set at step {int(r['step'])}: "
                       f"{fmt_num(r['loss'])} nats over {int(r['n_tokens']):,} target tokens.")


def _grad_ratio_healthy(cfg: AnalysisConfig) -> str:
    return (f"Healthy: rho = ||G||/||W|| between {fmt_sci(cfg.rho_low)} and {fmt_sci(cfg.rho_high)} for every matrix "
            "(below: barely training; above: unstable); update ratio between checkpoints, per step elapsed, "
            f"inside the shaded {fmt_sci(cfg.update_ratio_low)} to {fmt_sci(cfg.update_ratio_high)} (the sheet: "
            "typically near 1e-3 per step).")


# (id, number, title, healthy text, fill); the healthy text of 7b is built from the config's band
PANEL_SPECS: list[tuple[str, str, str, str, Fill]] = [
    ("loss", "1", "Train and validation loss",
     "Healthy: both curves fall and flatten, validation stays close to training, and validation loss does "
     "not climb again after its minimum (no GL5 mark after the val-min mark).", _loss),
    ("spikes", "2", "Loss and gradient-norm spikes",
     "Healthy: no red marks. Isolated grad-norm spikes early in training are common; repeated loss spikes "
     "or any NaN/inf are not.", _spikes),
    ("grad_norm", "3", "Global gradient norm",
     "Healthy: after warm-up the norm settles into a band that drifts slowly; jumps of 10x or a steady "
     "climb point at instability.", _grad_norm),
    ("activations", "4", "Activation magnitude per layer",
     "Healthy: each block's mean |A| stays in a narrow range across checkpoints with a thin band; growth by "
     "orders of magnitude means runaway activations.", _activations),
    ("spectral", "5", "Spectral norm per weight matrix",
     "Healthy: sigma_1 rises early and then levels off; a matrix whose sigma_1 keeps growing late in training "
     "is a candidate for instability. The default estimator should stay within 1e-3 of exact SVD.", _spectral),
    ("dead_neurons", "6a", "Dead FFN units",
     "Healthy: no dead units (a unit is dead when |H| < eps on every evaluation token) and few "
     "near-dead ones.", _dead_neurons),
    ("attention", "6b", "Attention entropy and dead heads",
     "Healthy: most heads keep a spread of attention; low-entropy heads are fine when their label explains "
     "a positional job (offset d, sink). A head is dead when > 99% of its queries have entropy < log 2.",
     _attention),
    ("class_losses", "7a", "Per-class loss and tau",
     "Healthy on the built-in corpus: tau near 0 at the start, about 0.5-1.0 nats around step 500, narrowing "
     "to 0.2-0.5 by the end; the training-window and checkpoint estimates agree within their SE.", _class_losses),
    ("grad_ratio", "7b", "Grad-to-weight and update ratios", "", _grad_ratio),
    ("logits", "8", "Attention logits and output log Z (beyond the sheet)",
     "Healthy: the largest attention logit levels off (fast growth precedes entropy collapse) and the "
     "output log-partition stays bounded.", _logits),
]


def build_panels(result: Any, cache: FigureCache | None = None) -> list[Panel]:
    """Every panel of the sheet, with figures, tables and the reason when it cannot be computed."""
    cache = cache if cache is not None else FigureCache(None)
    panels = []
    for pid, number, title, healthy, fill in PANEL_SPECS:
        p = Panel(pid, number, title, healthy or _grad_ratio_healthy(_config(result)))
        if result.panels.get(pid):
            p.reason = result.panels[pid]
        else:
            fill(p, result, cache)
        panels.append(p)
    return panels
