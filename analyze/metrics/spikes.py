"""Loss-spike detector: rolling median + MAD over the W most recent finite values (§9).

    m_t = median(window), MAD_t = median(|L_i - m_t|), floor = 1e-6 |m_t| + 1e-12
    spike_t = (L_t - m_t) > k * 1.4826 * max(MAD_t, floor)          (one-sided, upward)
    height (MAD units)     = (L_t - m_t) / max(MAD_t, floor)
    height (robust sigmas) = height (MAD units) / 1.4826             (the unit of k)
    spike score            = flagged logged points / all logged points of the series

The window of t is the W most recent *finite* values logged before t (indices count logged
points, not optimizer steps); t is in warm-up while fewer than W finite values precede it. A
non-finite value is always flagged, as its own kind, and never enters a window. The series is
processed in slices carrying the last W finite values: each slice's windows are sorted row-wise
(``sliding_window_view`` + ``np.sort``), the median is read off the middle and the MAD found by a
vectorised binary search over the two sorted runs of deviations (no second sort), so temporaries
stay at one slice (a few MB) whatever the length of the series.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["KIND_NAMES", "SpikeEvent", "SpikeReport", "rolling_median_mad", "detect_spikes", "MAD_SCALE"]

MAD_SCALE = 1.4826  # MAD -> standard deviation for Gaussian noise
KIND_NAMES = ("", "spike", "non-finite")  # a point's kind by code 0 / 1 / 2 (`SpikeReport.kind_codes`)
_KINDS = np.array(KIND_NAMES, dtype=object)  # a kind is 8 bytes a point, not 40
_CHUNK_ELEMENTS = 1 << 19  # window values sorted per chunk (4 MB of float64: stays in L2/L3)


def _sorted_median_mad(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD of every row of w, rows already sorted ascending (R, W), C-contiguous.

    m = (w[lo] + w[hi]) / 2 (lo == hi for odd W). The deviations |w - m| of a sorted row are two
    ascending runs, A_i = m - w[lo - i] (i = 0..lo) and B_j = w[lo + 1 + j] - m, so the MAD is the
    mean of the lo-th and hi-th smallest values of their merge: found by one binary search per row
    on how many of the c = lo + 1 smallest come from A, run for all rows at once (log2 W steps of
    gathers) instead of sorting the deviations.
    """
    n_rows, window = w.shape
    lo, hi = (window - 1) // 2, window // 2
    m = 0.5 * (w[:, lo] + w[:, hi])
    flat = w.reshape(-1)
    c = lo + 1  # |A| = c, |B| = window - c
    first = max(0, 2 * c - window)  # fewest of the c smallest that can come from A
    row_lo = np.arange(lo, n_rows * window, window)  # flat index of w[r, lo] = A_0
    p = row_lo - first  # flat index of A_i for the current candidate i (p decreases as i grows)
    # i* = the first i in [first, c) with A_i >= B_{c-1-i} (B_{c-1-i} sits at p + c), else c.
    # Branchless lower bound with the same step sizes for every row.
    n = c - first
    flat_b = flat[c:]  # flat_b[p] = flat[p + c]: B_{c-1-i} for the A_i at p
    while n > 1:
        half = n // 2
        probe = p - half
        below = np.less(m - flat.take(probe), flat_b.take(probe) - m)  # A_i < B_{c-1-i}: i* is further
        p -= half * below  # (measured faster than subtract(..., where=below))
        n -= half
    if n == 1:
        p -= np.less(m - flat.take(p), flat_b.take(p) - m)
    # The lo-th smallest deviation: max(A_{i*-1}, B_{c-i*-1}); an index outside its run lands on
    # the other run's first value, never above the true answer, so max() needs no mask.
    d_lo = np.maximum(np.abs(flat.take(p + 1) - m), np.abs(flat.take(p + c) - m))
    if hi == lo:
        d_hi = d_lo
    else:  # the next one: min(A_{i*}, B_{c-i*}), a missing value counting as +inf
        i_star = row_lo - p
        a = np.abs(flat.take(np.maximum(p, row_lo - lo)) - m)
        b = np.abs(flat.take(np.minimum(p + c + 1, row_lo + (window - 1 - lo))) - m)
        a[i_star == c] = np.inf
        b[i_star == 0] = np.inf
        d_hi = np.minimum(a, b)
    return m, 0.5 * (d_lo + d_hi)


def _rolling_chunks(x: np.ndarray, window: int):
    """Yield (a, b, m, mad) for consecutive slices x[a:b]: m_t and MAD_t of each t there (§9),
    NaN in warm-up. The W most recent finite values are carried from slice to slice, so memory
    stays at one slice's sorted windows whatever the length of x."""
    step = max(1, _CHUNK_ELEMENTS // window)
    carry = np.empty(0)
    for a in range(0, x.size, step):
        b = min(a + step, x.size)
        xc = x[a:b]
        finite = np.isfinite(xc)
        all_finite = bool(finite.all())
        buf = np.concatenate((carry, xc if all_finite else xc[finite]))
        n_win = buf.size - int(finite[-1]) - window + 1  # the window ending at the last value serves no t here
        if n_win > 0:
            m, mad = _sorted_median_mad(np.sort(sliding_window_view(buf, window)[:n_win], axis=1))
        if carry.size == window:  # every t here has W finite values before it
            if all_finite:
                yield a, b, m, mad
            else:
                j = np.cumsum(finite) - finite  # window buf[j : j + W] ends just before t
                yield a, b, m[j], mad[j]
        else:  # warm-up
            n_before = carry.size + np.cumsum(finite) - finite  # finite values before t
            ready = n_before >= window
            j = n_before[ready] - window
            mc = np.full(b - a, np.nan)
            madc = np.full(b - a, np.nan)
            if j.size:
                mc[ready] = m[j]
                madc[ready] = mad[j]
            yield a, b, mc, madc
        carry = buf[-window:]


def rolling_median_mad(x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """m_t and MAD_t over the W most recent finite values before each index t (§9).

    Returns two float64 arrays shaped like x; NaN where fewer than W finite values precede t.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    x = np.asarray(x, dtype=np.float64)
    med = np.empty(x.shape)
    mad = np.empty(x.shape)
    for a, b, m, d in _rolling_chunks(x.reshape(-1), window):
        med.reshape(-1)[a:b] = m
        mad.reshape(-1)[a:b] = d
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

    ``kind`` is "" / "spike" / "non-finite" per point, derived on request from ``flags`` and
    ``height_mad`` (a flagged point is a spike where its height is a number: non-finite values have
    none), so a 10M-point report holds no per-point strings. ``height_mad`` is (L - m) in MAD units
    (divided by max(MAD, floor)) for every finite point past warm-up (NaN elsewhere). ``score`` is
    the §9 spike score, flagged points / all logged points (NaN for an empty series);
    ``n_checked`` counts the points that could be judged (past warm-up, plus every non-finite one).
    """

    steps: np.ndarray
    flags: np.ndarray  # bool
    height_mad: np.ndarray  # float64, MAD units
    events: tuple[SpikeEvent, ...]
    score: float
    n_checked: int
    window: int
    k: float
    note: str

    @property
    def kind(self) -> np.ndarray:
        """"" / "spike" / "non-finite" per point (an object array; a read-only view of one "" when
        nothing is flagged)."""
        if not self.flags.any():
            return np.broadcast_to(_KINDS[:1], self.flags.shape)
        return _KINDS[self.kind_codes()]

    def kind_codes(self) -> np.ndarray:
        """int8 code of ``KIND_NAMES`` per point: 0 unflagged, 1 spike, 2 non-finite."""
        member = np.flatnonzero(self.flags)
        codes = np.zeros(self.flags.shape, np.int8)
        codes[member] = _flagged_codes(np.isnan(self.height_mad[member]))
        return codes


def _flagged_codes(no_height: np.ndarray) -> np.ndarray:
    """Codes of flagged points: a non-finite value has no height (2), any other flag is a spike (1)."""
    return np.where(no_height, 2, 1).astype(np.int8)


def _step_value(s: np.generic) -> int | float:
    v = s.item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _events(steps: np.ndarray, member: np.ndarray, code: np.ndarray, height: np.ndarray) -> tuple[SpikeEvent, ...]:
    """Group the flagged indices `member` (ascending; code 1 spike, 2 non-finite) into events: runs
    of consecutive indices with the same code. Works on the flagged points only."""
    if not member.size:
        return ()
    new_run = np.ones(member.size, bool)
    new_run[1:] = (np.diff(member) != 1) | (np.diff(code) != 0)
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.append(starts, member.size))
    # Peak of each run: the flagged index with the largest height (first on ties).
    run_id = np.cumsum(new_run) - 1
    h = np.where(np.isfinite(height[member]), height[member], -np.inf)
    order = np.lexsort((member, -h, run_id))  # by run, then height descending, then index
    first_in_run = np.unique(run_id[order], return_index=True)[1]
    peak = member[order[first_in_run]]
    out = []
    for s, n, c, p in zip(member[starts].tolist(), lengths.tolist(), code[starts].tolist(), peak.tolist()):
        spike = c == 1  # one object per event
        out.append(SpikeEvent(
            first_step=_step_value(steps[s]), peak_step=_step_value(steps[p if spike else s]),
            height_mad=float(height[p]) if spike else None, length=n, kind="spike" if spike else "non-finite"))
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
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    flags = np.empty(x.size, bool)
    height = np.empty(x.size)
    threshold = k * MAD_SCALE
    n_finite = n_ready = 0
    with np.errstate(invalid="ignore"):
        for a, b, med, mad in _rolling_chunks(x, window):  # slice by slice: no full-length temporaries
            xc = x[a:b]
            finite = np.isfinite(xc)
            scale = np.maximum(mad, 1e-6 * np.abs(med) + 1e-12)  # MAD units; NaN in warm-up
            excess = xc - med
            spike = np.greater(excess, threshold * scale)  # False in warm-up (NaN)
            spike &= finite
            np.divide(excess, scale, out=height[a:b])
            judged = finite & ~np.isnan(med)
            height[a:b][~judged] = np.nan
            np.logical_or(spike, ~finite, out=flags[a:b])
            n_finite += int(np.count_nonzero(finite))
            n_ready += int(np.count_nonzero(judged))
    n_nonfinite = x.size - n_finite
    member = np.flatnonzero(flags)
    code = _flagged_codes(~np.isfinite(x[member]))
    n_checked = n_ready + n_nonfinite
    score = float(np.count_nonzero(flags) / x.size) if x.size else float("nan")
    if n_finite <= window:
        notes.append(f"only {n_finite} finite points for a window of {window}: "
                     "no point is past warm-up, only non-finite values can be flagged")
    if window_averaged > 1:
        notes.append(f"each value is a mean over {window_averaged} steps: a one-step spike is diluted "
                     f"{window_averaged}x, so the detector's sensitivity is reduced by that factor")
    return SpikeReport(steps=steps, flags=flags, height_mad=height,
                       events=_events(steps, member, code, height), score=score, n_checked=n_checked,
                       window=window, k=float(k), note="; ".join(notes))
