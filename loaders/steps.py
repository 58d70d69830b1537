"""Step values and the resume policy, one implementation for every log reader.

* ``coerce_step`` / ``coerce_steps``: a step is an integer (or an integer-valued float or
  string) in ``0 .. 2**63 - 1`` (int64); anything else is dropped with one warning per kind
  (bad-inputs.md D5, D7, D8).
* ``resolve_rewinds`` / ``rewind_keep`` / ``rewind_groups``: when a step goes back or repeats
  (a resumed run) the later timeline wins, within each series; one warning per resume says
  ``"resume at step 5 (overlap 5-9)"`` (D16).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings

__all__ = [
    "STEP_REASONS",
    "check_steps",
    "coerce_step",
    "coerce_steps",
    "resolve_rewinds",
    "rewind_groups",
    "rewind_keep",
    "warn_bad_steps",
    "warn_rewinds",
]

INT64_MAX = 2**63 - 1
_MAX_REWIND_WARNINGS = 20   # further rewinds are summarised in one warning


def coerce_step(v: Any) -> tuple[int | None, str | None]:
    """One step value -> (int, None) or (None, reason)."""
    if isinstance(v, bool) or v is None:
        return None, "non-numeric"
    if isinstance(v, (int, np.integer)):
        v = int(v)
    elif isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return None, "non-numeric"
        if math.isinf(v) or abs(v) > INT64_MAX:
            return None, "out of range"
        if not float(v).is_integer():
            return None, "non-integer"
        v = int(v)
    elif isinstance(v, str):
        s = v.strip()
        try:
            v = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                return None, "non-numeric"
            return coerce_step(f)
    else:
        return None, "non-numeric"
    if v > INT64_MAX or v < -INT64_MAX - 1:
        return None, "out of range"
    if v < 0:
        return None, "negative"
    return v, None


STEP_REASONS = {
    "non-numeric": "with a missing or non-numeric step skipped",
    "non-integer": "with a non-integer step skipped",
    "out of range": "with step out of range (beyond int64) skipped",
    "negative": "with a negative step dropped",
}


def check_steps(values: Any) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Steps as int64, a keep mask, and how many rows each reason of ``STEP_REASONS`` dropped.

    Accepted: integers and integer-valued floats or strings ("2", 3.0) in 0..2^63-1. Dropped:
    missing/non-numeric, non-integer (2.5), negative, beyond int64 (D5, D7, D8). No warnings:
    a chunked reader adds the counts up and calls ``warn_bad_steps`` once.
    """
    arr = np.asarray(values)
    n = arr.shape[0]
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u":
            big = arr > INT64_MAX
            return np.where(big, 0, arr).astype(np.int64), ~big, {"out of range": int(big.sum())}
        steps = arr.astype(np.int64, copy=False)
        keep = steps >= 0
        return steps, keep, {"negative": int((~keep).sum())}
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(arr)
            inrange = finite & (np.abs(np.where(finite, arr, 0.0)) <= float(INT64_MAX) * (1 - 1e-15))
            whole = inrange & (np.floor(np.where(inrange, arr, 0.0)) == np.where(inrange, arr, 0.0))
            neg = whole & (arr < 0)
        steps = np.where(whole, arr, 0.0).astype(np.int64)
        return steps, whole & ~neg, {"non-numeric": int(np.isnan(arr).sum()),
                                     "out of range": int((~np.isnan(arr) & ~inrange).sum()),
                                     "non-integer": int((inrange & ~whole).sum()), "negative": int(neg.sum())}
    values_list = arr.tolist()
    kinds = set(map(type, values_list))
    if kinds and (kinds <= {int} or kinds <= {str}):
        try:  # fast path: all Python ints or all integer strings
            steps = np.array(values_list, dtype=np.int64)
            keep = steps >= 0
            return steps, keep, {"negative": int((~keep).sum())}
        except (ValueError, OverflowError, TypeError):
            pass
    steps = np.zeros(n, dtype=np.int64)
    keep = np.zeros(n, dtype=bool)
    reasons: dict[str, int] = {}
    for i, v in enumerate(values_list):
        s, why = coerce_step(v)
        if why is None:
            steps[i] = s
            keep[i] = True
        else:
            reasons[why] = reasons.get(why, 0) + 1
    return steps, keep, reasons


def warn_bad_steps(reasons: dict[str, int], path: str | os.PathLike[str], warnings: DataWarnings) -> None:
    """One warning per kind of dropped step: ``"3 rows with a negative step dropped"``."""
    for why, count in reasons.items():
        if count:
            warnings.add(path, f"{count} row{'s' if count > 1 else ''} {STEP_REASONS[why]}")


def coerce_steps(values: Any, path: str | os.PathLike[str], warnings: DataWarnings) -> tuple[np.ndarray, np.ndarray]:
    """``check_steps`` with its warnings added: (int64 steps, keep mask)."""
    steps, keep, reasons = check_steps(values)
    warn_bad_steps(reasons, path, warnings)
    return steps, keep


def _rewinds(steps: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Keep mask ("later wins") and (resume step, last overwritten step) per rewind."""
    n = steps.shape[0]
    if n == 0:
        return np.ones(0, dtype=bool), []
    if n == 1 or bool((steps[1:] > steps[:-1]).all()):  # the usual log: no copies, no events
        return np.ones(n, dtype=bool), []
    # A row survives iff every later row has a larger step: the later timeline overwrites it.
    later_min = np.empty(n, dtype=np.int64)
    later_min[-1] = np.iinfo(np.int64).max
    if n > 1:
        later_min[:-1] = np.minimum.accumulate(steps[::-1])[::-1][1:]
    keep = steps < later_min
    points = np.flatnonzero(steps[1:] <= steps[:-1]) + 1  # the step goes back or repeats
    # The timeline just before a resume is the segment since the previous resume (older rows at
    # or above that segment's first step were overwritten already), so its maximum ends the overlap.
    starts = np.concatenate(([0], points))[:-1]
    events = [(int(steps[p]), int(steps[a:p].max())) for a, p in zip(starts, points, strict=True)]
    return keep, events


def rewind_keep(steps_raw: Any, codes: np.ndarray | None, path: str | os.PathLike[str],
                warnings: DataWarnings) -> tuple[np.ndarray, np.ndarray]:
    """Numpy core of ``resolve_rewinds``: (indices of surviving rows in file order, their int64 steps).

    ``codes``: an int group code per row (e.g. the series), or None for one group.
    """
    steps, ok = coerce_steps(steps_raw, path, warnings)
    idx_ok = np.flatnonzero(ok)
    s = steps[idx_ok]
    events: list[tuple[int, int]] = []
    if codes is None:
        keep, events = _rewinds(s)
    else:
        c = np.asarray(codes)[idx_ok]
        keep = np.ones(s.shape[0], dtype=bool)
        merged: Counter[tuple[int, int]] = Counter()
        for g in np.unique(c):
            idx = np.flatnonzero(c == g)
            k, ev = _rewinds(s[idx])
            keep[idx] = k
            merged |= Counter(ev)  # the same resume seen by several series is reported once
        events = sorted(merged.elements())
    warn_rewinds(events, path, warnings)
    return idx_ok[keep], s[keep]


def rewind_groups(groups: list[np.ndarray], path: str | os.PathLike[str],
                  warnings: DataWarnings) -> list[np.ndarray | None]:
    """The resume policy applied to several series of valid int64 steps (file order each), one
    series at a time (no concatenated copy): per series the keep mask, or None when every row is
    kept. A resume seen by several series is reported once."""
    merged: Counter[tuple[int, int]] = Counter()
    out: list[np.ndarray | None] = []
    for steps in groups:
        keep, events = _rewinds(steps)
        merged |= Counter(events)
        out.append(None if not events else keep)
    warn_rewinds(sorted(merged.elements()), path, warnings)
    return out


def warn_rewinds(events: list[tuple[int, int]], path: str | os.PathLike[str], warnings: DataWarnings) -> None:
    """One warning per resume, ``"resume at step 5 (overlap 5-9)"`` (the first 20, then a count)."""
    for a, b in events[:_MAX_REWIND_WARNINGS]:
        warnings.add(path, f"resume at step {a} (overlap {a}-{b})" if a != b else
                     f"resume at step {a} (overlap {a})")
    if len(events) > _MAX_REWIND_WARNINGS:
        warnings.add(path, f"{len(events) - _MAX_REWIND_WARNINGS} more resumes (later values kept)")


def resolve_rewinds(df: pd.DataFrame, path: str | os.PathLike[str], warnings: DataWarnings, *,
                    by: str | None = None, step_col: str = "step") -> pd.DataFrame:
    """Apply the resume policy to a table in file order (bad-inputs.md D7, D8, D16).

    Steps are coerced to int64 (``coerce_steps``). When a step goes back (a resumed run) or
    repeats, the later timeline wins: earlier rows at steps >= the resume step are dropped and
    one warning per resume says ``"resume at step 5 (overlap 5-9)"``. With ``by`` (e.g.
    ``"series"``) the policy is applied within each group and identical warnings are merged.
    Returns a new frame in file order with an int64 step column.
    """
    codes = None if by is None else pd.factorize(df[by], use_na_sentinel=False)[0]
    rows, steps = rewind_keep(df[step_col].to_numpy(), codes, path, warnings)
    out = df.iloc[rows].reset_index(drop=True)
    out[step_col] = steps
    return out
