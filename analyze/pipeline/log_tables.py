"""Tables from a run's logs: the training series with spike flags (§9) and the train/val
alignment with the overfitting verdict (§10)."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from analyze.metrics.overfitting import Overfitting, analyze_overfitting
from analyze.metrics.spikes import KIND_NAMES, SpikeReport, detect_spikes
from analyze.pipeline.tables import TABLE_COLUMNS
from loaders.longtables import TRAIN_EVAL_SERIES, preferred_val_series
from loaders.run import Run

__all__ = ["frame", "train_table", "val_series", "overfitting_table"]


def frame(name: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Table `name` (TABLE_COLUMNS) from row dicts; typed-empty when there are none."""
    cols = list(TABLE_COLUMNS[name])
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
    return pd.DataFrame.from_records(rows, columns=cols)


def train_table(run: Run, cfg: AnalysisConfig) -> tuple[pd.DataFrame, dict[str, SpikeReport]]:
    """The long training table with spike flags on loss and grad_norm (§9), and their reports.

    One block of rows per series, in name order, each sorted by step. `series` and `spike_kind`
    are categorical columns (1 byte a row instead of a pointer to a string): a 10M-row log's table
    stays a few bytes a row beyond its numbers, and comparing a column with "loss" is a compare
    of small integers."""
    names = set(run.series_names()) - {"wall_time"}
    if run.train is not None and "loss" in run.train.columns:
        names.add("loss")  # an all-NaN loss is still a series: every point is flagged non-finite
    names = sorted(names)
    shared = _sorted_long_columns(run, names)
    steps_parts, value_parts, spike_parts, kind_parts, reports = [], [], [], [], {}
    for code, series in enumerate(names):
        if shared is not None:
            a, b = shared[2][code], shared[2][code + 1]
            steps, values = shared[0][a:b], shared[1][a:b]
        else:
            g = run.series(series)
            steps = g["step"].to_numpy()
            values = g["value"].to_numpy(dtype=np.float64)
        spike = np.zeros(len(values), bool)
        kind = np.zeros(len(values), np.int8)
        if series in ("loss", "grad_norm") and len(values):
            rep = detect_spikes(steps, values, window=cfg.spike_window, k=cfg.spike_k,
                                window_averaged=int(run.window_averaged.get(series, 1)))
            reports[series] = rep  # steps are already sorted, so rep's arrays line up with the rows
            spike, kind = rep.flags, rep.kind_codes()
        steps_parts.append(steps)
        value_parts.append(values)
        spike_parts.append(spike)
        kind_parts.append(kind)
    if not names:
        return frame("train", []), reports
    if shared is not None:  # the run's own columns, not copies
        step_col, value_col, series_col = shared[0], shared[1], run.scalars["series"]
    else:
        lengths = [len(v) for v in value_parts]
        series_codes = np.repeat(np.arange(len(names), dtype=np.int16 if len(names) > 127 else np.int8), lengths)
        step_col, value_col = np.concatenate(steps_parts), np.concatenate(value_parts)
        series_col = pd.Categorical.from_codes(series_codes, categories=names)
    df = pd.DataFrame({
        "step": step_col,
        "series": series_col,
        "value": value_col,
        "spike": np.concatenate(spike_parts),
        "spike_kind": pd.Categorical.from_codes(np.concatenate(kind_parts), categories=list(KIND_NAMES)),
    }, copy=False)
    return df[list(TABLE_COLUMNS["train"])], reports


def _sorted_long_columns(run: Run, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """(steps, values, block bounds) of the run's long table when it already is the training
    table's layout - one block per series of `names`, in that order (`Run.series_blocks`), each
    sorted by step - so the table can share the run's arrays: a 10M-row log is not held twice.
    None otherwise."""
    blocks = run.series_blocks()
    if blocks is None or list(blocks) != names:
        return None
    steps = run.scalars["step"].to_numpy()
    for a, b in blocks.values():
        if b - a > 1 and np.any(steps[a + 1:b] < steps[a:b - 1]):
            return None
    bounds = [a for a, _ in blocks.values()] + [len(steps)]
    return steps, run.scalars["value"].to_numpy(dtype=np.float64), bounds


def val_series(run: Run) -> str | None:
    """The validation series of the overfitting verdict: the loader's recorded choice, else the
    same chooser (`loaders.longtables.preferred_val_series`) over the run's evaluation series."""
    names = set(run.evals["series"].astype(str))
    chosen = run.meta.get("val_series_preferred")
    if isinstance(chosen, str) and chosen in names and chosen not in TRAIN_EVAL_SERIES:
        return chosen
    return preferred_val_series(names)


def overfitting_table(run: Run, cfg: AnalysisConfig) -> tuple[Overfitting | None, str | None, pd.DataFrame, list[str]]:
    """The §10 verdict on the chosen validation series, its aligned table and notes."""
    notes: list[str] = []
    chosen = val_series(run)
    if chosen is None:
        return None, None, frame("overfitting", []), notes
    series = run.evals["series"].astype(str)
    ev = run.evals[series == chosen].sort_values("step", kind="stable")
    train_eval = [s for s in TRAIN_EVAL_SERIES if s in set(series)]
    if train_eval:
        t = run.evals[run.evals["series"] == train_eval[0]].sort_values("step", kind="stable")
        t_steps, t_loss = t["step"].to_numpy(), t["loss"].to_numpy(dtype=np.float64)
        kind = f"eval-mode loss on a training subset ('{train_eval[0]}')"
    else:
        t = run.series("loss")
        t_steps, t_loss = t["step"].to_numpy(), t["value"].to_numpy(dtype=np.float64)
        kind = "logged training loss (train mode)"
    of = analyze_overfitting(t_steps, t_loss, ev["step"].to_numpy(), ev["loss"].to_numpy(dtype=np.float64),
                             alpha=cfg.gl_alpha, delta=cfg.divergence_delta, min_spearman=cfg.divergence_spearman,
                             min_after=cfg.divergence_min_evals, trend_evals=cfg.overfit_trend_evals, train_kind=kind)
    a = of.aligned
    table = pd.DataFrame({"step": a.eval_step, "val_series": chosen, "val_loss": a.val, "train_loss": a.train,
                          "gap": a.gap, "gap_smoothed": a.gap_smooth, "gl": a.gl})
    others = sorted(set(series) - {chosen} - set(TRAIN_EVAL_SERIES))
    if others:
        notes.append(f"validation series {chosen!r} is used for the overfitting verdict; also shown: "
                     + ", ".join(repr(o) for o in others))
    return of, chosen, table, notes
