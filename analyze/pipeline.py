"""The offline analysis: a Run in, tidy tables + findings + notes out (issue 4).

Thin orchestration over the metric modules (no formula lives here):

1. logs: training series with spike flags (§9), validation series, the §10 train/val alignment
   and verdict, per-class training losses in Welford windows with tau and its SE (§8);
2. per checkpoint, in step order: tensors one at a time -> both spectral estimators warm-started
   from the previous checkpoint's vectors, exact SVD beside them, stable rank, update ratio
   (§4, §11, §12); then, when the run names a built-in model (or `--model` gives one) and stores
   an evaluation set, a forward pass with hooks and one backward pass (`analyze.probe`);
3. findings from the tables (`analyze.findings`) and the summary.json object.

Per-checkpoint results are cached in the output folder (`analyze.cache`), so a second run on an
unchanged run recomputes nothing.
"""
from __future__ import annotations

import math
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analyze import findings as findings_mod
from analyze.cache import CheckpointCache
from analyze.config import AnalysisConfig
from analyze.losses import ClassLossState, gaps_to_mean, tau
from analyze.overfitting import Overfitting, analyze_overfitting
from analyze.spectral import (as_matrix, estimate_spectral_norm, exact_top_singular_values, is_finite_tensor,
                              matrix_skip_reason, power_iteration, sigma_ratio, stable_rank)
from analyze.spikes import SpikeReport, detect_spikes
from analyze.tables import TABLE_COLUMNS, Finding, build_summary
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef, Run

__all__ = ["analyze_run", "AnalysisResult", "PANELS", "VAL_SERIES_PREFERENCE", "BUILTIN_CLASS_PAIR"]

Progress = Callable[[str], None]
SMALL_MODEL_PARAMS = 10_000_000  # below this the checkpoint passes run on one intra-op thread per worker

VAL_SERIES_PREFERENCE = ("eval_loss", "val_loss", "eval/loss")  # issue 5: the overfitting block's series
TRAIN_EVAL_SERIES = ("train", "train_eval", "eval_train")          # eval-mode loss on a training subset (§10)
BUILTIN_CLASS_PAIR = ("irregular", "regular")                       # tau = L_I - L_R (§8)

# Panel id -> title; AnalysisResult.panels says why a panel could not be computed ("" when it could).
PANELS = {
    "loss": "Train and validation loss",
    "spikes": "Loss and gradient-norm spikes",
    "grad_norm": "Global gradient norm",
    "activations": "Activation magnitude per layer",
    "spectral": "Spectral norm per weight matrix",
    "dead_neurons": "Dead FFN units",
    "attention": "Attention entropy and dead heads",
    "class_losses": "Per-class loss and tau",
    "grad_ratio": "Grad-to-weight and update ratios",
    "logits": "Attention logits and output log Z",
}


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    """Everything the report shows: tables (TABLE_COLUMNS), findings, notes and summary.json.

    ``panels`` maps a panel id (PANELS) to the reason it could not be computed ("" when it was);
    ``headlines`` holds the one-line verdicts (overfitting, spikes, tau); ``data_warnings`` every
    loader warning plus what the analysis skipped; ``run_info`` the run header.
    """

    tables: dict[str, pd.DataFrame]
    findings: list[Finding]
    notes: list[str]
    summary: dict[str, Any]
    run_info: dict[str, Any] = field(default_factory=dict)
    panels: dict[str, str] = field(default_factory=dict)
    headlines: dict[str, str] = field(default_factory=dict)
    data_warnings: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0


# --------------------------------------------------------------------------- helpers


def _frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    cols = list(TABLE_COLUMNS[name])
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    return pd.DataFrame.from_records(rows, columns=cols)


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _iter_tensors(ref: CheckpointRef, warnings: DataWarnings) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time from any checkpoint kind (loaders.checkpoints), names normalised."""
    from loaders.checkpoints import iter_tensors

    yield from iter_tensors(ref, warnings=warnings)


def _param_count(ref: CheckpointRef) -> tuple[int | None, str]:
    """Parameter count from the checkpoint's header / mmap (no tensor data read)."""
    from loaders.checkpoints import checkpoint_info

    try:
        return checkpoint_info(ref).n_params, "checkpoint header"
    except (TrainauditError, OSError, ValueError, RuntimeError):
        return None, "unknown"


# --------------------------------------------------------------------------- logs


def _train_table(run: Run, cfg: AnalysisConfig) -> tuple[pd.DataFrame, dict[str, SpikeReport]]:
    s = run.scalars[run.scalars["series"] != "wall_time"]
    parts, reports = [], {}
    for series, g in s.groupby("series", sort=True):
        g = g.sort_values("step", kind="stable")
        steps = g["step"].to_numpy()
        values = g["value"].to_numpy(dtype=np.float64)
        spike = np.zeros(len(g), bool)
        kind = np.full(len(g), "", dtype=object)
        if series in ("loss", "grad_norm") and len(g):
            rep = detect_spikes(steps, values, window=cfg.spike_window, k=cfg.spike_k,
                                window_averaged=int(run.window_averaged.get(series, 1)))
            reports[series] = rep  # steps are already sorted, so rep's arrays line up with g's rows
            spike, kind = rep.flags, rep.kind.astype(object)
        parts.append(pd.DataFrame({"step": steps, "series": series, "value": values, "spike": spike,
                                   "spike_kind": kind}))
    df = pd.concat(parts, ignore_index=True) if parts else _frame("train", [])
    return df[list(TABLE_COLUMNS["train"])], reports


def _choose_val_series(evals: pd.DataFrame) -> str | None:
    names = sorted(set(evals["series"].astype(str)) - set(TRAIN_EVAL_SERIES))
    for pref in VAL_SERIES_PREFERENCE:
        if pref in names:
            return pref
    return names[0] if names else None


def _overfitting(run: Run, cfg: AnalysisConfig) -> tuple[Overfitting | None, str | None, pd.DataFrame, list[str]]:
    notes: list[str] = []
    val_series = _choose_val_series(run.evals)
    if val_series is None:
        return None, None, _frame("overfitting", []), notes
    ev = run.evals[run.evals["series"].astype(str) == val_series].sort_values("step", kind="stable")
    train_eval = [s for s in TRAIN_EVAL_SERIES if s in set(run.evals["series"].astype(str))]
    if train_eval:
        t = run.evals[run.evals["series"] == train_eval[0]].sort_values("step", kind="stable")
        t_steps, t_loss = t["step"].to_numpy(), t["loss"].to_numpy(dtype=np.float64)
        kind = f"eval-mode loss on a training subset ('{train_eval[0]}')"
    else:
        t = run.series("loss")
        t_steps, t_loss = t["step"].to_numpy(), t["value"].to_numpy(dtype=np.float64)
        kind = "logged training loss (train mode)"
    of = analyze_overfitting(t_steps, t_loss, ev["step"].to_numpy(), ev["loss"].to_numpy(dtype=np.float64),
                             alpha=cfg.gl_alpha, delta=cfg.divergence_delta, train_kind=kind)
    a = of.aligned
    table = pd.DataFrame({"step": a.eval_step, "val_series": val_series, "val_loss": a.val, "train_loss": a.train,
                          "gap": a.gap, "gap_smoothed": a.gap_smooth, "gl": a.gl})
    others = sorted(set(run.evals["series"].astype(str)) - {val_series} - set(TRAIN_EVAL_SERIES))
    if others:
        notes.append(f"validation series {val_series!r} is used for the overfitting verdict; also shown: "
                     + ", ".join(repr(o) for o in others))
    return of, val_series, table, notes


def _class_index(run: Run) -> list[str]:
    names = [str(c) for c in run.class_names]
    seen = set(names)
    for df in (run.class_losses, run.eval_class_losses):
        for c in df["cls"].astype(str).unique() if len(df) else ():
            if c not in seen:
                names.append(c)
                seen.add(c)
    return names


def _state_from_rows(df: pd.DataFrame, names: list[str]) -> ClassLossState:
    """A per-class ClassLossState from (cls, count, loss_sum, loss_m2) rows of one step."""
    idx = {n: i for i, n in enumerate(names)}
    c = len(names)
    count = np.zeros(c, np.int64)
    total = np.zeros(c)
    m2 = np.zeros(c)
    ci = df["cls"].astype(str).map(idx).to_numpy()
    count[ci] = df["count"].to_numpy(np.int64)
    total[ci] = df["loss_sum"].to_numpy(np.float64)
    m2[ci] = df["loss_m2"].to_numpy(np.float64)
    return ClassLossState(torch.from_numpy(count), torch.from_numpy(total), torch.from_numpy(m2),
                          torch.zeros(c, dtype=torch.int64))


def _train_class_windows(df: pd.DataFrame, names: list[str], window: int) -> list[tuple[int, int, ClassLossState]]:
    """Chan-merge the per-step class states into windows of `window` steps, vectorised: the steps
    of all windows are laid out as (n_windows, P, C) and halved by merges (log2 P merges)."""
    if df.empty:
        return []
    idx = {n: i for i, n in enumerate(names)}
    steps_u, step_i = np.unique(df["step"].to_numpy(np.int64), return_inverse=True)
    win_of_step = steps_u // window
    win_u, win_i = np.unique(win_of_step, return_inverse=True)
    first = np.searchsorted(win_i, np.arange(win_u.size))  # steps_u is sorted, so windows are contiguous
    pos = np.arange(steps_u.size) - first[win_i]
    p = int(pos.max()) + 1
    shape = (win_u.size, p, len(names))
    count, total, m2 = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape)
    w, q = win_i[step_i], pos[step_i]
    c = df["cls"].astype(str).map(idx).to_numpy()
    np.add.at(count, (w, q, c), df["count"].to_numpy(np.int64))
    np.add.at(total, (w, q, c), df["loss_sum"].to_numpy(np.float64))
    np.add.at(m2, (w, q, c), np.nan_to_num(df["loss_m2"].to_numpy(np.float64)))
    st = ClassLossState(torch.from_numpy(count), torch.from_numpy(total), torch.from_numpy(m2),
                        torch.zeros(shape, dtype=torch.int64))
    while st.count.shape[1] > 1:
        if st.count.shape[1] % 2:
            pad = ClassLossState.empty(1)
            z = (st.count.shape[0], 1, len(names))
            st = ClassLossState(*(torch.cat([getattr(st, f), torch.zeros(z, dtype=getattr(pad, f).dtype)], 1)
                                  for f in ("count", "loss_sum", "loss_m2", "n_skipped")))
        h = st.count.shape[1] // 2
        left = ClassLossState(st.count[:, :h], st.loss_sum[:, :h], st.loss_m2[:, :h], st.n_skipped[:, :h])
        right = ClassLossState(st.count[:, h:], st.loss_sum[:, h:], st.loss_m2[:, h:], st.n_skipped[:, h:])
        st = left.merge(right)
    start = steps_u[first]
    last = np.r_[steps_u[first[1:] - 1], steps_u[-1]]
    return [(int(start[i]), int(last[i]),
             ClassLossState(st.count[i, 0], st.loss_sum[i, 0], st.loss_m2[i, 0], st.n_skipped[i, 0]))
            for i in range(win_u.size)]


def _class_pair(names: list[str], cfg: AnalysisConfig,
                states: list[ClassLossState]) -> tuple[tuple[int, int] | None, str]:
    if len(names) < 2:
        return None, "fewer than two classes: no class pair for tau"
    if cfg.class_pair is not None:
        a, b = cfg.class_pair
        if a in names and b in names:
            return (names.index(a), names.index(b)), f"tau = L({a}) - L({b}) as configured"
        return None, f"configured class pair {cfg.class_pair!r} not among the run's classes"
    if all(n in names for n in BUILTIN_CLASS_PAIR):
        return (names.index(BUILTIN_CLASS_PAIR[0]), names.index(BUILTIN_CLASS_PAIR[1])), \
            "tau = L(irregular) - L(regular), the sheet's irregular-verb tax"
    if not states:
        return (0, 1), f"tau = L({names[0]}) - L({names[1]}) (the first two classes)"
    final = states[-1].mean().numpy()
    ok = np.isfinite(final)
    if ok.sum() < 2:
        return (0, 1), f"tau = L({names[0]}) - L({names[1]}) (the first two classes)"
    order = np.argsort(np.where(ok, final, np.nan))
    lo, hi = int(order[0]), int(order[ok.sum() - 1])
    return (hi, lo), (f"tau = L({names[hi]}) - L({names[lo]}): the classes with the highest and lowest final loss "
                      "(set class_pair to choose)")


def _class_rows(source: str, step: int, step_start: int, st: ClassLossState, names: list[str],
                pair: tuple[int, int] | None) -> tuple[list[dict], list[dict], list[dict]]:
    mean, var = st.mean().numpy(), st.var().numpy()
    cls_rows = [{"source": source, "step": step, "step_start": step_start, "cls": n, "count": int(st.count[i]),
                 "mean": float(mean[i]), "std": float(np.sqrt(var[i]))}
                for i, n in enumerate(names) if int(st.count[i]) > 0]
    gaps = gaps_to_mean(st)
    gap_rows = [{"source": source, "step": step, "cls": n, "gap_to_mean": float(gaps[i])}
                for i, n in enumerate(names) if int(st.count[i]) > 0]
    tau_rows = []
    if pair is not None:
        t = tau(st, *pair)
        tau_rows.append({"source": source, "step": step, "class_a": names[pair[0]], "class_b": names[pair[1]],
                         "tau": t.tau, "se": t.se, "n_a": t.n_a, "n_b": t.n_b})
    return cls_rows, gap_rows, tau_rows


# --------------------------------------------------------------------------- checkpoints


@dataclass
class _Chain:
    """Warm-start vectors per tensor name, carried from one checkpoint to the next."""

    est: dict[str, torch.Tensor] = field(default_factory=dict)
    power: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_flat(self) -> dict[str, torch.Tensor]:
        return {**{f"est:{k}": v for k, v in self.est.items()}, **{f"pow:{k}": v for k, v in self.power.items()}}

    @staticmethod
    def from_flat(flat: dict[str, torch.Tensor]) -> _Chain:
        c = _Chain()
        for k, v in flat.items():
            kind, _, name = k.partition(":")
            (c.est if kind == "est" else c.power)[name] = v
        return c


def _fit(v: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return v if v is not None and v.numel() == n else None


def _weights_pass(ref: CheckpointRef, prev: CheckpointRef | None, chain: _Chain, cfg: AnalysisConfig,
                  exact: bool, keep_state: bool, warnings: DataWarnings,
                  ) -> tuple[dict[str, list[dict]], _Chain, list[str], dict | None]:
    """Spectral rows (both estimators + exact), update ratios; the state dict when a probe needs it."""
    spectral, updates, skipped, notes = [], [], [], []
    new = _Chain()
    state: dict[str, torch.Tensor] | None = {} if keep_state else None
    prev_iter = _iter_tensors(prev, DataWarnings()) if prev is not None else iter(())
    prev_buf: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, t in _iter_tensors(ref, warnings):
        if state is not None:
            state[name] = t
        m = as_matrix(t)
        if m is None:
            skipped.append((name, matrix_skip_reason(t) or "no spectral norm"))
            continue
        row: dict[str, Any] = {"step": ref.step, "tensor": name, "shape": "x".join(map(str, t.shape))}
        if not is_finite_tensor(m):
            row.update({"method": "", "finite": False})
            spectral.append(row)
            continue
        n = m.shape[1]
        est = estimate_spectral_norm(m, _fit(chain.est.get(name), n), generator=gen)
        pw = power_iteration(m, _fit(chain.power.get(name), n), tol=cfg.power_tol, max_iter=cfg.power_max_iter,
                             generator=gen)
        new.est[name], new.power[name] = est.v.detach().cpu(), pw.v.detach().cpu()
        ex = exact_top_singular_values(m) if exact else None
        s1 = ex.sigma1 if ex is not None else est.sigma
        row.update({
            "method": est.method, "sigma_est": est.sigma, "err_bound": est.err_bound, "sigma_power": pw.sigma,
            "sigma_exact": ex.sigma1 if ex else math.nan, "sigma2_exact": ex.sigma2 if ex else math.nan,
            "rel_err": abs(est.sigma - ex.sigma1) / ex.sigma1 if ex and ex.sigma1 > 0 else math.nan,
            "power_rel_err": abs(pw.sigma - ex.sigma1) / ex.sigma1 if ex and ex.sigma1 > 0 else math.nan,
            "iterations": est.iterations, "power_iterations": pw.iterations, "warm_start": est.warm_start,
            "power_warm_start": pw.warm_start, "power_converged": pw.converged,
            "sigma_ratio": sigma_ratio(ex) if ex else math.nan, "stable_rank": stable_rank(m, s1),
            "frobenius": float(torch.linalg.vector_norm(m.double())), "finite": True})
        spectral.append(row)
        if prev is not None:
            while name not in prev_buf:
                nxt = next(prev_iter, None)
                if nxt is None:
                    break
                prev_buf[nxt[0]] = nxt[1]
            old = prev_buf.pop(name, None)
            if old is not None and old.shape == t.shape:
                from analyze.gradients import update_ratio

                r = update_ratio(t, old)
                elapsed = ref.step - prev.step
                updates.append({"step": ref.step, "prev_step": prev.step, "tensor": name, "update_ratio": r,
                                "update_ratio_per_step": r / elapsed if elapsed > 0 else math.nan})
    if skipped:
        shown = ", ".join(f"{n} ({why})" for n, why in skipped[:6])
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        notes.append(f"{len(skipped)} tensor(s) have no spectral norm and were skipped: {shown}{more}")
    return {"spectral": spectral, "update_ratio": updates}, new, notes, state


@dataclass
class _ProbeCtx:
    reason: str                      # "" when the model panels can run
    probes: queue.Queue | None = None


def _probe_context(run: Run, cfg: AnalysisConfig) -> _ProbeCtx:
    """Build one ModelProbe per worker, or say why the model panels cannot run."""
    if not run.checkpoints:
        return _ProbeCtx("the run has no checkpoints")
    from analyze.probe import ModelProbe, build_run_model, load_eval_set

    name = run.model.name if run.model else None
    config = run.model.config if run.model else {}
    models = []
    for _ in range(cfg.workers):
        model, why = build_run_model(name, config, cfg.model_factory)
        if model is None:
            return _ProbeCtx(why)
        models.append(model)
    if run.eval_set_path is None:
        return _ProbeCtx("the run stores no evaluation set to run the model on (RunLogger.save_eval_set writes one)")
    data = load_eval_set(Path(run.eval_set_path), cfg.max_eval_examples)
    names = [str(c) for c in run.class_names]
    if data.class_ids is not None and names and int(data.class_ids.max()) >= len(names):
        data = type(data)(data.input_ids, data.targets, data.target_mask, data.attention_mask, None)
    q: queue.Queue = queue.Queue()
    for model in models:
        probe = ModelProbe(model, data, names, eps=cfg.dead_eps, batch_size=cfg.eval_batch_size,
                           grad_batch_size=cfg.grad_batch_size)
        missing = probe.missing_hooks()
        if len(missing) == 3:
            return _ProbeCtx("the model has none of the hook points the activation panels read "
                             "(blocks.<i>, mlp.act, attn.probs)")
        q.put(probe)
    return _ProbeCtx("", q)


def _run_probe(ctx: _ProbeCtx, state: dict[str, torch.Tensor], step: int) -> tuple[dict[str, list[dict]], list[str]]:
    assert ctx.probes is not None
    probe = ctx.probes.get()
    try:
        problems = probe.load(state)
        if problems:
            return {}, [f"step {step}: model panels skipped: {problems[0]}"]
        try:
            return probe.run(step), []
        except (RuntimeError, ValueError, TrainauditError) as exc:
            return {}, [f"step {step}: model pass failed: {' '.join(str(exc).split())[:300]}"]
    finally:
        ctx.probes.put(probe)


def _checkpoints(run: Run, cfg: AnalysisConfig, cache: CheckpointCache, progress: Progress | None,
                 ) -> tuple[dict[str, list[dict]], list[str], list[str], str, bool | None]:
    """All per-checkpoint rows (cached or computed), notes, data warnings, probe reason, exact flag."""
    refs = sorted(run.checkpoints, key=lambda r: r.step)
    rows: dict[str, list[dict]] = {}
    notes: list[str] = []
    warns: list[str] = []
    if not refs:
        return rows, notes, warns, "the run has no checkpoints", None
    n_params, how = _param_count(refs[-1])
    exact = cfg.use_exact_svd(n_params if n_params is not None else 0)
    if cfg.exact_svd is None:
        notes.append(f"exact SVD {'on' if exact else 'off'} (auto: {n_params:,} parameters by {how}; "
                     f"on up to 10,000,000)" if n_params is not None else "exact SVD on (auto: size unknown)")
    ctx: _ProbeCtx | None = None
    # What else changes a checkpoint's rows: the model the run names, its classes and the eval set.
    from analyze.cache import checkpoint_fingerprint

    cfg_key = "|".join((cfg.cache_key(), "exact" if exact else "noexact",
                        repr(None if run.model is None else (run.model.name, sorted(run.model.config.items()))),
                        repr(list(run.class_names)),
                        checkpoint_fingerprint(Path(run.eval_set_path)) if run.eval_set_path else "-"))
    threads = torch.get_num_threads()
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        # Ops on small matrices finish faster on one thread than the intra-op pool can split them;
        # on a busy 2-core machine a 2-thread pool made the 2000-step demo 5x slower (92 s vs 17 s).
        torch.set_num_threads(1)
    chain = _Chain()
    prev_ok: CheckpointRef | None = None
    prev_key: str | None = None
    pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else None
    pending: list[tuple[int, CheckpointRef, str, dict, list[str], Future, float]] = []

    def add(part: dict[str, list[dict]]) -> None:
        for k, v in part.items():
            rows.setdefault(k, []).extend(v)

    def finish(i: int, ref: CheckpointRef, key: str, wrows: dict, wnotes: list[str], mrows: dict,
               mnotes: list[str], t0: float) -> None:
        part = {**wrows, **mrows}
        cache.store(ref.step, key, part, chain_out[ref.step].to_flat(), wnotes + mnotes, ck_warnings[ref.step])
        add(part)
        notes.extend(wnotes + mnotes)
        _say(progress, f"checkpoint {i}/{len(refs)}: step {ref.step} done in {time.perf_counter() - t0:.1f}s")

    chain_out: dict[int, _Chain] = {}
    ck_warnings: dict[int, list[str]] = {}
    try:
        for i, ref in enumerate(refs, 1):
            key = cache.key(Path(ref.path), cfg_key, prev_key)
            hit = cache.load(ref.step, key)
            if hit is not None:
                add(hit.rows)
                notes.extend(hit.notes)
                warns.extend(hit.warnings)
                chain = _Chain.from_flat(hit.vectors)
                prev_ok, prev_key = ref, key
                _say(progress, f"checkpoint {i}/{len(refs)}: step {ref.step} (cached)")
                continue
            t0 = time.perf_counter()
            if ctx is None:
                ctx = _probe_context(run, cfg)
            ck_warn = DataWarnings()
            try:
                wrows, chain_new, wnotes, state = _weights_pass(ref, prev_ok, chain, cfg, exact,
                                                                keep_state=not ctx.reason, warnings=ck_warn)
            except TrainauditError as exc:
                warns.extend(ck_warn)
                warns.append(f"{exc} (checkpoint at step {ref.step} skipped; the others are analysed)")
                continue
            warns.extend(ck_warn)
            ck_warnings[ref.step] = list(ck_warn)
            chain_out[ref.step] = chain_new
            chain, prev_ok, prev_key = chain_new, ref, key
            if ctx.reason or state is None:
                finish(i, ref, key, wrows, wnotes, {}, [], t0)
            elif pool is None:
                mrows, mnotes = _run_probe(ctx, state, ref.step)
                finish(i, ref, key, wrows, wnotes, mrows, mnotes, t0)
            else:
                pending.append((i, ref, key, wrows, wnotes, pool.submit(_run_probe, ctx, state, ref.step), t0))
                while len(pending) > cfg.workers:
                    j, r, k, w, wn, fut, tt = pending.pop(0)
                    finish(j, r, k, w, wn, *fut.result(), tt)
        for j, r, k, w, wn, fut, tt in pending:
            finish(j, r, k, w, wn, *fut.result(), tt)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        torch.set_num_threads(threads)
    if ctx is None:  # every checkpoint came from the cache: say why model panels may be empty
        ctx = _ProbeCtx("" if rows.get("activations") or rows.get("dead_neurons") else _probe_context(run, cfg).reason)
    return rows, notes, warns, ctx.reason, exact


# --------------------------------------------------------------------------- entry point


def _load(run_or_path: Run | str | os.PathLike[str], fmt: str | None) -> Run:
    if isinstance(run_or_path, Run):
        return run_or_path
    from loaders.rundir import load_run

    return load_run(run_or_path, format=fmt)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def analyze_run(run_or_path: Run | str | os.PathLike[str], config: AnalysisConfig | None = None, *,
                progress: Progress | None = None, cache_dir: str | os.PathLike[str] | None = None,
                format: str | None = None) -> AnalysisResult:  # noqa: A002 - the CLI's option name
    """Analyse a run (a `Run` or a path any loader reads) and return tables, findings and notes.

    Args:
        run_or_path: a loaded Run, or a run directory / log file / checkpoint path.
        config: analysis settings (defaults: formulas.md values).
        progress: called with one-line progress messages (the CLI prints them on stderr).
        cache_dir: folder for per-checkpoint results; None disables the cache.
        format: loader override (`--format`), when a path is given.
    """
    cfg = config or AnalysisConfig()
    t_start = time.perf_counter()
    run = _load(run_or_path, format)
    _say(progress, f"loaded {run.source_format} run: {run.steps_logged} steps logged, "
                   f"{len(run.checkpoints)} checkpoint(s)")
    notes: list[str] = list(run.notes)
    panels = {k: "" for k in PANELS}
    headlines: dict[str, str] = {}

    # 1. logs
    train, spike_reports = _train_table(run, cfg)
    evals = run.evals.sort_values(["series", "step"], kind="stable").reset_index(drop=True)
    of, val_series, of_table, of_notes = _overfitting(run, cfg)
    notes += of_notes
    if of is not None:
        headlines["overfitting"] = of.headline
        notes += [f"overfitting ({val_series}): {n}" for n in of.notes]
    spike_rows = []
    for series, rep in spike_reports.items():
        for e in rep.events:
            spike_rows.append({"series": series, "kind": e.kind, "first_step": e.first_step,
                               "peak_step": e.peak_step, "height_mad": e.height_mad, "length": e.length})
        if rep.note:
            notes.append(f"spike detector on {series}: {rep.note}")
    has_loss = bool((train["series"] == "loss").any())
    if not has_loss and of is None:
        panels["loss"] = "the run logs neither training nor validation loss"
    if not has_loss and not (train["series"] == "grad_norm").any():
        panels["spikes"] = "the run logs neither a training loss nor a gradient norm"
    if not (train["series"] == "grad_norm").any() or train.loc[train["series"] == "grad_norm", "value"].isna().all():
        panels["grad_norm"] = "the run logs no global gradient norm"

    names = _class_index(run)
    windows = _train_class_windows(run.class_losses, names, cfg.class_window) if names else []
    pair, pair_note = _class_pair(names, cfg, [w[2] for w in windows])
    class_rows, gap_rows, tau_rows = [], [], []
    for start, last, st in windows:
        c, g, t = _class_rows("train", last, start, st, names, pair)
        class_rows += c
        gap_rows += g
        tau_rows += t
    ecl = run.eval_class_losses
    if len(ecl):
        for (series, step), g in ecl.groupby(["series", "step"], sort=True):
            c, gg, t = _class_rows(f"eval:{series}", int(step), int(step), _state_from_rows(g, names), names, pair)
            class_rows += c
            gap_rows += gg
            tau_rows += t

    # 2. checkpoints
    cache = CheckpointCache(None if cache_dir is None else Path(cache_dir))
    ck_rows, ck_notes, ck_warns, probe_reason, exact = _checkpoints(run, cfg, cache, progress)
    notes += ck_notes
    if not run.checkpoints:
        panels["spectral"] = "the run has no checkpoints, so there are no weights to measure"
    elif not ck_rows.get("spectral"):
        panels["spectral"] = "no checkpoint could be read, or none holds a 2-D weight"
    if probe_reason:
        for p in ("activations", "dead_neurons", "attention", "logits"):
            panels[p] = probe_reason
    else:
        for p, tname in (("activations", "activations"), ("dead_neurons", "dead_neurons"),
                         ("attention", "attention")):
            if not ck_rows.get(tname):
                panels[p] = "the model has no hook point for this panel, or every model pass failed (see notes)"
    if not ck_rows.get("grad_ratio") and not ck_rows.get("update_ratio"):
        panels["grad_ratio"] = probe_reason or "fewer than two checkpoints and no model pass"
    for r in ck_rows.pop("class_losses", []):
        class_rows.append(r)
    tau_states = ck_rows.pop("tau_state", [])
    if tau_states:
        ts = pd.DataFrame(tau_states)
        for step, g in ts.groupby("step", sort=True):
            st = _state_from_rows(g, names)
            _, gg, t = _class_rows("checkpoint", int(step), int(step), st, names, pair)
            gap_rows += gg
            tau_rows += t
    if not class_rows:
        panels["class_losses"] = "the run logs no per-class losses (RunLogger.log_class_losses writes them)"
    if class_rows:
        notes.append(pair_note)

    tables: dict[str, pd.DataFrame] = {
        "train": train,
        "evals": evals[list(TABLE_COLUMNS["evals"])] if len(evals) else _frame("evals", []),
        "overfitting": of_table[list(TABLE_COLUMNS["overfitting"])] if len(of_table) else _frame("overfitting", []),
        "spikes": _frame("spikes", spike_rows),
        "class_losses": _frame("class_losses", class_rows),
        "tau": _frame("tau", tau_rows),
        "class_gaps": _frame("class_gaps", gap_rows),
    }
    for name in ("spectral", "update_ratio", "activations", "dead_neurons", "attention", "attention_logits",
                 "eval_set", "grad_ratio"):
        tables[name] = _frame(name, ck_rows.get(name, []))
    if len(tables["spectral"]) and exact is False:
        notes.append("exact SVD was off: rel_err and sigma_ratio are empty (use --exact-svd to validate)")

    # 3. findings and summary
    data_warnings = [*run.warnings, *ck_warns]
    ctx = findings_mod.Context(cfg=cfg, run_name=run.name, is_builtin_corpus=pair is not None and
                               all(n in names for n in BUILTIN_CLASS_PAIR), overfitting=of,
                               val_series=val_series, n_data_warnings=len(data_warnings),
                               last_step=int(run.scalars["step"].max()) if len(run.scalars) else 0)
    found = findings_mod.derive(tables, ctx)
    tau_sum = None
    tau_t = tables["tau"]
    for source in ("train", *(f"eval:{s}" for s in sorted(set(evals["series"].astype(str)))), "checkpoint"):
        sel = tau_t[(tau_t["source"] == source)] if len(tau_t) else tau_t
        sel = sel[np.isfinite(sel["tau"].astype(float))] if len(sel) else sel
        if len(sel):
            imax = sel["tau"].astype(float).idxmax()
            tau_sum = {"class_a": sel["class_a"].iloc[-1], "class_b": sel["class_b"].iloc[-1],
                       "final": float(sel["tau"].iloc[-1]), "max": float(sel.loc[imax, "tau"]),
                       "max_step": int(sel.loc[imax, "step"]), "source": source}
            headlines["tau"] = (f"tau = L({tau_sum['class_a']}) - L({tau_sum['class_b']}) ended at "
                                f"{tau_sum['final']:.3f} nats (peak {tau_sum['max']:.3f} at step "
                                f"{tau_sum['max_step']}; "
                                f"from {'training windows' if source == 'train' else source})")
            break
    if cache.folder is not None and run.checkpoints:
        if cache.misses == 0 and cache.hits:
            notes.append(f"all {cache.hits} checkpoint(s) served from the cache ({cache.folder}); nothing recomputed")
        elif cache.hits:
            notes.append(f"{cache.hits} checkpoint(s) from the cache, {cache.misses} recomputed")
    notes = _dedupe(notes)
    summary = build_summary(
        run={"name": run.name, "source_format": run.source_format, "steps_logged": run.steps_logged,
             "checkpoints": [r.step for r in sorted(run.checkpoints, key=lambda r: r.step)]},
        overfitting={"verdict": of.verdict if of else None, "divergence_step": of.divergence_step if of else None,
                     "val_min_step": of.val_min_step if of else None, "gl5_step": of.gl_step if of else None,
                     "val_series": val_series},
        spikes=[r for r in spike_rows if r["series"] in ("loss", "grad_norm")],
        tau=tau_sum, findings=found, notes=[*notes, *data_warnings])
    kinds = pd.DataFrame(spike_rows, columns=["series", "kind"]).value_counts() if spike_rows else {}
    n_spikes = {s: int(kinds.get((s, "spike"), 0)) for s in ("loss", "grad_norm")}
    n_nonfin = {s: int(kinds.get((s, "non-finite"), 0)) for s in ("loss", "grad_norm")}
    headlines["spikes"] = (f"{n_spikes['loss']} loss spike event(s), {n_spikes['grad_norm']} grad-norm spike event(s)"
                           + (f"; non-finite values: {n_nonfin['loss']} loss, {n_nonfin['grad_norm']} "
                              "grad-norm event(s)"
                              if any(n_nonfin.values()) else "")
                           + f" (median + MAD detector, window {cfg.spike_window}, k = {cfg.spike_k:g})")
    run_info = {
        "name": run.name, "source_format": run.source_format, "path": str(run.path),
        "steps_logged": run.steps_logged, "checkpoints": summary["run"]["checkpoints"],
        "class_names": names, "model": None if run.model is None else {"name": run.model.name,
                                                                        "config": dict(run.model.config)},
        "created": run.meta.get("created"), "seed": run.meta.get("seed"),
        "exact_svd": exact, "analysis_seconds": time.perf_counter() - t_start,
        "window_averaged": dict(run.window_averaged), "val_series": val_series,
        "builtin_corpus": ctx.is_builtin_corpus,
    }
    return AnalysisResult(tables=tables, findings=found, notes=notes, summary=summary, run_info=run_info,
                          panels=panels, headlines=headlines, data_warnings=data_warnings,
                          cache_hits=cache.hits, cache_misses=cache.misses)
