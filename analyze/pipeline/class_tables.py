"""Per-class tables of a run (§1, §8): L_c per class, the gap to the mean and tau with
its Welch SE, for the training windows, the evaluations and the checkpoints' evaluation passes.

The per-step Welford rows (count, loss_sum, loss_m2) are combined with the kernel the logger
uses (`analyze.kernels.scatter_welford`), with its one rule: a row whose loss is not finite is
left out and counted, and the analysis notes how many examples that left out. The tables are
computed with torch, so they are cached in the output folder under a hash of their inputs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from analyze.pipeline.cache import CheckpointCache
from loaders.run import Run

if TYPE_CHECKING:  # torch: only when the output folder's cache cannot serve the tables
    from analyze.metrics.losses import ClassLossState

__all__ = ["BUILTIN_CLASS_PAIR", "class_index", "class_tables"]

BUILTIN_CLASS_PAIR = ("irregular", "regular")  # tau = L_I - L_R (§8)
_DOC_KEYS = {"class_rows", "gap_rows", "tau_rows", "pair", "pair_note", "notes"}


def class_index(run: Run) -> list[str]:
    """Class names in class-id order, then any other class the logs name."""
    names = [str(c) for c in run.class_names]
    seen = set(names)
    for df in (run.class_losses, run.eval_class_losses):
        for c in df["cls"].astype(str).unique() if len(df) else ():
            if c not in seen:
                names.append(c)
                seen.add(c)
    return names


def _states(index: np.ndarray, df: pd.DataFrame, m2: np.ndarray, size: int) -> tuple[Any, ...]:
    """(count, total, m2, skipped) per bin of the rows `df` (kernel `scatter_welford`), as tensors."""
    import torch

    from analyze.kernels import scatter_welford

    def t(a: np.ndarray, dtype: type) -> torch.Tensor:  # copies only a read-only or non-contiguous column
        return torch.from_numpy(np.require(a, dtype, ["C", "W"]))

    return scatter_welford(t(index, np.int64), t(df["count"].to_numpy(), np.int64),
                           t(df["loss_sum"].to_numpy(), np.float64), t(m2, np.float64), size)


def _state_from_rows(df: pd.DataFrame, names: list[str]) -> ClassLossState:
    """A per-class ClassLossState from (cls, count, loss_sum, loss_m2) rows of one step.

    A row whose loss_sum is not finite is left out (its count goes to n_skipped); an unknown
    M2 (NaN: only a mean was logged) keeps the class's variance unknown.
    """
    from analyze.metrics.losses import ClassLossState

    ci = df["cls"].astype(str).map({n: i for i, n in enumerate(names)}).to_numpy()
    return ClassLossState(*_states(ci, df, df["loss_m2"].to_numpy(np.float64), len(names)))


def _train_class_windows(df: pd.DataFrame, names: list[str], window: int) -> list[tuple[int, int, ClassLossState]]:
    """The per-step class states merged into windows of `window` steps: (first step, last step,
    state) per window, in one scatter over all rows (exact: M2 re-centred on each window's mean).

    A row whose loss_sum is not finite is left out and counted in the window's n_skipped; an
    unknown M2 counts as 0 here, as before.
    """
    if df.empty:
        return []
    from analyze.metrics.losses import ClassLossState

    c = len(names)
    steps = df["step"].to_numpy(np.int64)
    win_u, win_i = np.unique(steps // window, return_inverse=True)
    ci = df["cls"].astype(str).map({n: i for i, n in enumerate(names)}).to_numpy()
    count, total, m2, skipped = (t.view(win_u.size, c) for t in
                                 _states(win_i * c + ci, df, np.nan_to_num(df["loss_m2"].to_numpy(np.float64)),
                                         win_u.size * c))
    start = np.full(win_u.size, np.iinfo(np.int64).max)
    last = np.full(win_u.size, np.iinfo(np.int64).min)
    np.minimum.at(start, win_i, steps)
    np.maximum.at(last, win_i, steps)
    return [(int(start[i]), int(last[i]), ClassLossState(count[i], total[i], m2[i], skipped[i]))
            for i in range(win_u.size)]


def _class_pair(names: list[str], cfg: AnalysisConfig,
                states: list[ClassLossState]) -> tuple[tuple[int, int] | None, str]:
    """(hard, easy) class indices for tau (§8) and a note saying how they were chosen."""
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
    """class_losses, class_gaps and tau rows of one state (one window, evaluation or checkpoint)."""
    from analyze.metrics.losses import gaps_to_mean, tau

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


def _class_key(run: Run, cfg: AnalysisConfig, names: list[str], tau_states: list[dict]) -> str:
    """Hash of every input of `class_tables` and of the code that computes it."""
    from analyze.pipeline.cache import json_text

    h = hashlib.sha256()
    here = Path(__file__)
    for src in (here, here.parent.parent / "metrics" / "losses.py", here.parent.parent / "kernels.py"):
        h.update(src.read_bytes())  # changed code recomputes
    h.update(json_text([names, cfg.class_window, cfg.class_pair, tau_states]).encode())
    for df in (run.class_losses, run.eval_class_losses):
        h.update(repr([(str(c), str(df[c].dtype)) for c in df.columns] + [len(df)]).encode())
        for c in df.columns:
            col = df[c]
            if isinstance(col.dtype, np.dtype) and col.dtype.kind in "biufcmM":
                h.update(np.ascontiguousarray(col.to_numpy()).tobytes())
            else:  # repr: 1 and "1" differ; NUL (escaped by repr) separates
                h.update("\0".join(map(repr, col.tolist())).encode("utf-8", "backslashreplace"))
    return h.hexdigest()[:20]


def _skipped_note(skipped: dict[str, int]) -> list[str]:
    """One note saying how many example losses were not finite and left out, per source."""
    parts = [f"{src}: {n}" for src, n in skipped.items() if n]
    if not parts:
        return []
    return ["per-class losses: examples with a non-finite loss left out of L_c and tau (§8): " + ", ".join(parts)]


def class_tables(run: Run, cfg: AnalysisConfig, names: list[str], tau_states: list[dict],
                 cache: CheckpointCache) -> dict[str, Any]:
    """The per-class rows (§8): class_rows of the training windows and evaluations, gap_rows and
    tau_rows of those and of the checkpoints' class states, the tau class pair and its note, and
    notes (how many non-finite example losses were left out).

    Kept in the output folder's cache under a hash of all their inputs: a report served wholly
    from the cache then imports no torch.
    """
    key = _class_key(run, cfg, names, tau_states)
    hit = cache.load_doc("class_tables", key)
    if isinstance(hit, dict) and set(hit) == _DOC_KEYS:
        return hit
    windows = _train_class_windows(run.class_losses, names, cfg.class_window) if names else []
    pair, pair_note = _class_pair(names, cfg, [w[2] for w in windows])
    class_rows, gap_rows, tau_rows = [], [], []
    skipped = {"train": sum(int(w[2].n_skipped.sum()) for w in windows)}
    for start, last, st in windows:
        c, g, t = _class_rows("train", last, start, st, names, pair)
        class_rows += c
        gap_rows += g
        tau_rows += t
    ecl = run.eval_class_losses
    if len(ecl):
        for (series, step), g in ecl.groupby(["series", "step"], sort=True):
            st = _state_from_rows(g, names)
            skipped[f"eval:{series}"] = skipped.get(f"eval:{series}", 0) + int(st.n_skipped.sum())
            c, gg, t = _class_rows(f"eval:{series}", int(step), int(step), st, names, pair)
            class_rows += c
            gap_rows += gg
            tau_rows += t
    if tau_states:
        ts = pd.DataFrame(tau_states)
        for step, g in ts.groupby("step", sort=True):
            st = _state_from_rows(g, names)
            skipped["checkpoint"] = skipped.get("checkpoint", 0) + int(st.n_skipped.sum())
            _, gg, t = _class_rows("checkpoint", int(step), int(step), st, names, pair)
            gap_rows += gg
            tau_rows += t
    out = {"class_rows": class_rows, "gap_rows": gap_rows, "tau_rows": tau_rows,
           "pair": None if pair is None else list(pair), "pair_note": pair_note, "notes": _skipped_note(skipped)}
    cache.store_doc("class_tables", key, out)
    return out
