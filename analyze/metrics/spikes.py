"""Loss-spike detector: rolling median + MAD over the W most recent finite values (§9).

    m_t = median(window), MAD_t = median(|L_i - m_t|), floor = 1e-6 |m_t| + 1e-12
    spike_t = (L_t - m_t) > k * 1.4826 * max(MAD_t, floor)          (one-sided, upward)
    height (MAD units)     = (L_t - m_t) / max(MAD_t, floor)
    height (robust sigmas) = height (MAD units) / 1.4826             (the unit of k)
    spike score            = flagged logged points / all logged points of the series

The window of t is the W most recent *finite* values logged before t (indices count logged
points, not optimizer steps); t is in warm-up while fewer than W finite values precede it. A
non-finite value is always flagged, as its own kind, and never enters a window. The rolling
median runs over the whole series at once: the finite values are compressed, every window's
median and MAD come from sorted rows of ``sliding_window_view`` in bounded chunks, and
``searchsorted`` maps them back to the logged indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["SpikeEvent", "SpikeReport", "rolling_median_mad", "detect_spikes", "MAD_SCALE"]

MAD_SCALE = 1.4826  # MAD -> standard deviation for Gaussian noise
_CHUNK_ELEMENTS = 1 << 20  # window values per chunk (8 MB of float64)


def _window_median_mad(f: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD of every length-W window of f (windows f[j:j+W], j = 0..len(f)-W).

    Sorting each window (numpy's vectorised sort of short rows) measured ~3x faster than
    ``np.median`` (partition) on 1e6 windows of 50; the even-W median is the mean of the two middles.
    """
    n_win = f.size - window + 1
    med = np.empty(n_win)
    mad = np.empty(n_win)
    view = sliding_window_view(f, window)  # (n_win, W), no copy
    lo, hi = (window - 1) // 2, window // 2
    rows = max(1, _CHUNK_ELEMENTS // window)
    for s in range(0, n_win, rows):  # chunks bound memory; each chunk is one vectorised call
        w = np.sort(view[s:s + rows], axis=1)  # (rows, W) copy
        m = 0.5 * (w[:, lo] + w[:, hi])
        np.subtract(w, m[:, None], out=w)
        np.abs(w, out=w)
        w.sort(axis=1)
        med[s:s + rows] = m
        mad[s:s + rows] = 0.5 * (w[:, lo] + w[:, hi])
    return med, mad


def rolling_median_mad(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """m_t and MAD_t over the W most recent finite values before each index t (§9).

    Returns two float64 arrays shaped like x; NaN where fewer than W finite values precede t.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    x = np.asarray(x, dtype=np.float64)
    med = np.full(x.shape, np.nan)
    mad = np.full(x.shape, np.nan)
    fin_idx = np.flatnonzero(np.isfinite(x))
    if fin_idx.size < window:
        return med, mad
    win_med, win_mad = _window_median_mad(x[fin_idx], window)
    n_before = np.searchsorted(fin_idx, np.arange(x.size), side="left")  # finite values strictly before t
    ready = n_before >= window
    j = n_before[ready] - window  # window f[j : j + W] ends just before t
    med[ready] = win_med[j]
    mad[ready] = win_mad[j]
    return med, mad


@dataclass(frozen=True, slots=True)
class SpikeEvent:
    """A run of consecutive flagged points of one kind (§9). Steps are the logged step numbers."""

    first_step: int | float
    peak_step: int | float
    height_mad: float | None  # peak (L - m) / max(MAD, floor), MAD units (§9); None for non-finite
    length: int  # logged points in the run
    kind: str  # "spike" or "non-finite"

    @property
    def height_sigma(self) -> float | None:
        """The peak height in robust sigmas (MAD units / 1.4826), the unit of k."""
        return None if self.height_mad is None else self.height_mad / MAD_SCALE


@dataclass(frozen=True, slots=True)
class SpikeReport:
    """Per-point flags and the events they form (§9).

    ``kind`` is "" / "spike" / "non-finite" per point; ``height_mad`` is (L - m) in MAD units
    (divided by max(MAD, floor)) for every finite point past warm-up (NaN elsewhere). ``score`` is
    the §9 spike score, flagged points / all logged points (NaN for an empty series);
    ``n_checked`` counts the points that could be judged (past warm-up, plus every non-finite one).
    """

    steps: np.ndarray
    flags: np.ndarray  # bool
    kind: np.ndarray  # str
    height_mad: np.ndarray  # float64, MAD units
    events: tuple[SpikeEvent, ...]
    score: float
    n_checked: int
    window: int
    k: float
    note: str


def _step_value(s: np.generic) -> int | float:
    v = s.item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _events(steps: np.ndarray, code: np.ndarray, height: np.ndarray) -> tuple[SpikeEvent, ...]:
    """Group consecutive equal non-zero codes (1 spike, 2 non-finite) into events."""
    if not code.any():
        return ()
    change = np.flatnonzero(np.diff(code)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [code.size]))
    keep = code[starts] != 0
    starts, ends = starts[keep], ends[keep]
    # Peak of each run: the flagged index with the largest height (first on ties).
    run_id = np.repeat(np.arange(starts.size), ends - starts)
    member = np.flatnonzero(code)  # flagged indices, in run order (runs are maximal equal-code segments)
    h = np.where(np.isfinite(height[member]), height[member], -np.inf)
    order = np.lexsort((member, -h, run_id))  # by run, then height descending, then index
    first_in_run = np.unique(run_id[order], return_index=True)[1]
    peak = member[order[first_in_run]]
    out = []
    for s, e, p in zip(starts.tolist(), ends.tolist(), peak.tolist()):  # one object per event
        spike = code[s] == 1
        out.append(SpikeEvent(
            first_step=_step_value(steps[s]), peak_step=_step_value(steps[p if spike else s]),
            height_mad=float(height[p]) if spike else None, length=e - s, kind="spike" if spike else "non-finite"))
    return tuple(out)


def detect_spikes(steps: np.ndarray, values: np.ndarray, *, window: int = 50, k: float = 6.0,
                  window_averaged: int = 1) -> SpikeReport:
    """Flag upward spikes and non-finite values of a logged series (§9).

    Args:
        steps: logged step numbers (sorted here, stably, if they are not).
        values: the series (training loss, gradient norm, ...), one value per step.
        window: W, in logged points. k: threshold in robust-sigma units (default 6), i.e. a
            point is flagged when its height in MAD units exceeds 1.4826 k.
        window_averaged: how many raw steps each logged value averages (Hugging Face Trainer
            ``loss`` averages ``logging_steps``); > 1 adds a reduced-sensitivity note.
    """
    steps = np.asarray(steps)
    x = np.asarray(values, dtype=np.float64)
    if steps.shape != x.shape or x.ndim != 1:
        raise ValueError(f"steps {steps.shape} and values {x.shape} must be equal-length 1-D arrays")
    notes = []
    if steps.size > 1 and np.any(np.diff(steps) < 0):
        order = np.argsort(steps, kind="stable")
        steps, x = steps[order], x[order]
        notes.append("points were not in step order and were sorted by step")
    med, mad = rolling_median_mad(x, window)
    finite = np.isfinite(x)
    ready = ~np.isnan(med)
    scale = np.maximum(mad, 1e-6 * np.abs(med) + 1e-12)  # MAD units
    excess = x - med
    with np.errstate(invalid="ignore"):
        spike = finite & ready & (excess > k * MAD_SCALE * scale)
        height = np.where(finite & ready, excess / scale, np.nan)
    nonfinite = ~finite
    flags = spike | nonfinite
    code = spike.astype(np.int8) + 2 * nonfinite.astype(np.int8)
    kind = np.array(["", "spike", "non-finite"])[code]
    n_checked = int((ready & finite).sum() + nonfinite.sum())
    score = float(flags.sum() / x.size) if x.size else float("nan")
    if int(finite.sum()) <= window:
        notes.append(f"only {int(finite.sum())} finite points for a window of {window}: "
                     "no point is past warm-up, only non-finite values can be flagged")
    if window_averaged > 1:
        notes.append(f"each value is a mean over {window_averaged} steps: a one-step spike is diluted "
                     f"{window_averaged}x, so the detector's sensitivity is reduced by that factor")
    return SpikeReport(steps=steps, flags=flags, kind=kind, height_mad=height, events=_events(steps, code, height),
                       score=score, n_checked=n_checked, window=window, k=float(k), note="; ".join(notes))
