"""Train/val divergence step, validation minimum, Prechelt's GL_alpha and the overfitting verdict
(§10).

Two questions, answered apart: when does the train/val gap start to widen for good (divergence),
and does validation loss get worse (overfitting or instability)?

Alignment (§10): at evaluation t_j, T_j is the mean of the logged training losses with step in
(t_{j-1}, t_j] (t_0 = -inf: the first evaluation takes every training loss at or before it);
with none there, the latest training loss at or before t_j; with none either, the evaluation is
left out of the gap (it still counts for the validation minimum and GL).

Non-finite values (our choice; §10 leaves it open): an evaluation whose validation loss is NaN
or +-inf is left out of everything (minimum, GL, gap, and the alignment intervals, which run
between the kept evaluations); non-finite training losses are left out of the T_j means. Both
are counted in the notes, and non-finite validation losses also in the headline, since they
usually mean the run diverged (see the spike detector, §9).

Sustained or recovered (ours; §10 does not say what to call a rise the run recovered from): a
rise above GL_alpha after the minimum is "overfitting" (or "unstable") only when it is still
there at the end and the trend does not take it back: GL at the last evaluation > alpha *and*
GL > alpha at the validation loss the trend projects one trend span ahead,
V_m + b * (t_m - t_{m-k+1}), b the least-squares slope of V over the last k = `trend_evals`
evaluations (none before the minimum; the minimum itself may be one). Otherwise the verdict is
"recovered": validation loss rose above GL_alpha and is back within it, or falling fast enough to
be back within it at that rate over the same span.

Memorisation (ours): training loss far below validation loss at the last evaluation with a
training loss, T <= ratio * V and V - T >= min_gap nats (`memorisation`). It is reported on its own,
whatever the verdict: a model can memorise its training set while validation loss still improves.

Where T cannot be compared (no training loss at or after the validation minimum), a rise of
validation loss above GL_alpha is called "overfitting", as §10 defines overfitting as
validation loss getting worse, and a note says instability could not be ruled out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AlignedEvals", "Overfitting", "align_train_to_evals", "smooth_gap", "analyze_overfitting",
           "memorisation", "VERDICTS"]

VERDICTS = ("overfitting", "unstable", "recovered", "none")


@dataclass(frozen=True, slots=True)
class AlignedEvals:
    """One row per kept evaluation (finite validation loss), in step order (§10).

    ``train_rule`` says how T_j was found: "mean" (interval mean), "latest" (latest earlier
    training loss) or "" (none: gap left out, NaN).
    """

    eval_step: np.ndarray
    val: np.ndarray
    train: np.ndarray
    gap: np.ndarray
    gap_smooth: np.ndarray  # NaN where the gap is left out
    gl: np.ndarray  # 100 * (V_j / min_{i<=j} V_i - 1)
    train_rule: np.ndarray


@dataclass(frozen=True, slots=True)
class Overfitting:
    """§10 result. Steps are logged step numbers; None where a step does not exist."""

    verdict: str | None  # "overfitting" | "unstable" | "recovered" | "none"; None without (finite) evaluations
    divergence_step: int | float | None
    val_min_step: int | float | None
    gl_step: int | float | None  # first t_j with GL > alpha
    val_min: float
    val_final: float
    final_rise_pct: float  # GL at the last evaluation
    max_rise_pct: float  # largest GL after the validation minimum (0 when it is the last evaluation)
    spearman: float  # Spearman(t, G~) over j >= j* (NaN when not computed)
    aligned: AlignedEvals
    headline: str
    notes: tuple[str, ...]
    max_rise_step: int | float | None = None  # the evaluation where max_rise_pct was reached
    final_step: int | float | None = None  # the last kept evaluation
    trend_slope: float = math.nan  # least-squares slope of V over the last trend_evals evaluations, per step
    trend_evals: int = 0  # evaluations that slope was fitted on


def _sorted(steps: np.ndarray, values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps)
    v = np.asarray(values, dtype=np.float64)
    if s.shape != v.shape or s.ndim != 1:
        raise ValueError(f"{what} steps {s.shape} and values {v.shape} must be equal-length 1-D arrays")
    if s.size > 1 and bool((s[1:] < s[:-1]).any()):  # a bool a point, not an 8-byte difference
        order = np.argsort(s, kind="stable")
        s, v = s[order], v[order]
    return s, v


_BLOCK = 1 << 20  # training points per pass of align_train_to_evals


def align_train_to_evals(train_steps: np.ndarray, train_loss: np.ndarray,
                         eval_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T_j for sorted evaluation steps by the §10 rule, from sorted finite training losses.

    Returns T (NaN where left out) and the rule used per evaluation ("mean", "latest", "").
    """
    m = eval_steps.size
    # Training point i lies in (t_{j-1}, t_j] for j = the first evaluation with t_j >= its step.
    # Per-segment counts and sums (no prefix-sum cancellation), over blocks of 1M training points
    # so that a 10M-point log needs no 80 MB segment index at once.
    n = np.zeros(m + 1, dtype=np.int64)
    total = np.zeros(m + 1)
    for a in range(0, max(train_steps.size, 1), _BLOCK):
        seg = np.searchsorted(eval_steps, train_steps[a:a + _BLOCK], side="left")  # m: after the last evaluation
        n += np.bincount(seg, minlength=m + 1)
        total += np.bincount(seg, weights=train_loss[a:a + _BLOCK], minlength=m + 1)
    n, total = n[:m], total[:m]
    hi = np.searchsorted(train_steps, eval_steps, side="right")  # one past the latest training loss <= t_j
    has_mean = n > 0
    has_latest = ~has_mean & (hi > 0)
    t = np.full(m, np.nan)
    t[has_mean] = total[has_mean] / n[has_mean]
    t[has_latest] = train_loss[hi[has_latest] - 1]
    rule = np.where(has_mean, "mean", np.where(has_latest, "latest", ""))
    return t, rule


def smooth_gap(gap: np.ndarray) -> np.ndarray:
    """G~_j = median(G_{j-1}, G_j, G_{j+1}) inside, G~_j = G_j at the two ends (§10)."""
    out = gap.astype(np.float64, copy=True)
    if gap.size >= 3:
        out[1:-1] = np.median(np.stack([gap[:-2], gap[1:-1], gap[2:]]), axis=0)
    return out


def _step(s: np.generic) -> int | float:
    v = s.item()
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    new_group = np.concatenate(([True], sorted_a[1:] != sorted_a[:-1]))
    starts = np.flatnonzero(new_group)
    ends = np.concatenate((starts[1:], [a.size]))
    ranks = np.empty(a.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new_group) - 1]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN for constant input.

    numpy only: scipy.stats costs 1-2.5 s to import, most of a cached report's run time.
    """
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom > 0 else math.nan


def _divergence(t: np.ndarray, gs: np.ndarray, *, delta: float, min_spearman: float,
                min_after: int) -> tuple[int | None, float, str]:
    """Index j* of the last record low of the smoothed gap if the gap keeps widening after it."""
    if gs.size == 0:
        return None, math.nan, "no evaluation has a training loss to form a gap"
    prior_min = np.concatenate(([np.inf], np.minimum.accumulate(gs)[:-1]))
    j_star = int(np.flatnonzero(gs <= prior_min)[-1])
    after = gs.size - 1 - j_star
    if after < min_after:
        return None, math.nan, (f"the gap does not widen consistently: its last record low is followed by "
                                f"{after} evaluation(s), fewer than {min_after}")
    rho = spearman(t[j_star:], gs[j_star:])
    rise = gs[-1] - gs[j_star]
    if not rho >= min_spearman:
        return None, rho, f"the gap does not widen consistently (Spearman {rho:.2f} < {min_spearman:g})"
    if not rise > delta:
        return None, rho, f"the gap does not widen consistently (it grew {rise:.3f} nats, not more than {delta:g})"
    return j_star, rho, ""


def analyze_overfitting(train_steps: np.ndarray, train_loss: np.ndarray, eval_steps: np.ndarray,
                        val_loss: np.ndarray, *, alpha: float = 5.0, delta: float = 0.05,
                        min_spearman: float = 0.8, min_after: int = 3, trend_evals: int = 3,
                        train_kind: str = "logged training loss") -> Overfitting:
    """Divergence step, validation minimum, GL_alpha step and verdict from a loss history (§10).

    Args:
        train_steps, train_loss: the training-loss series (any order; sorted here).
        eval_steps, val_loss: one validation loss per evaluation.
        alpha: GL threshold in percent (Prechelt's GL5). delta: minimum widening in nats.
        min_spearman, min_after: the divergence test's rank correlation and evaluation count.
        trend_evals: last evaluations whose slope tells a sustained rise from a recovered one.
        train_kind: which training loss T is (e.g. "eval-mode loss on a training subset"), for the notes.
    """
    ts, tl = _sorted(train_steps, train_loss, "train")
    es, vl = _sorted(eval_steps, val_loss, "eval")
    notes: list[str] = []
    tfin = np.isfinite(tl)
    if not tfin.all():
        notes.append(f"{int((~tfin).sum())} non-finite training loss(es) left out of the train/val alignment")
        ts, tl = ts[tfin], tl[tfin]
    vfin = np.isfinite(vl)
    bad_val = ""
    if not vfin.all():
        bad_val = (f"{int((~vfin).sum())} evaluation(s) with non-finite validation loss left out "
                   f"(first at step {_step(es[~vfin][0])})")
        notes.append(bad_val)
        es, vl = es[vfin], vl[vfin]

    train, rule = align_train_to_evals(ts, tl, es)
    gap = vl - train
    has_gap = np.isfinite(gap)
    gs_sub = smooth_gap(gap[has_gap])
    gap_smooth = np.full(gap.shape, np.nan)
    gap_smooth[has_gap] = gs_sub
    with np.errstate(divide="ignore", invalid="ignore"):
        run_min = np.minimum.accumulate(vl) if vl.size else vl
        gl = np.where(run_min > 0, 100.0 * (vl / run_min - 1.0), np.nan)
    if np.any(run_min <= 0):
        notes.append("GL is undefined where the best validation loss so far is <= 0")
    aligned = AlignedEvals(es, vl, train, gap, gap_smooth, gl, rule)

    if es.size == 0:
        headline = "no validation loss: overfitting cannot be assessed" + (f" ({bad_val})" if bad_val else "")
        return Overfitting(None, None, None, None, math.nan, math.nan, math.nan, math.nan, math.nan,
                           aligned, headline, tuple(notes))

    n_latest, n_none = int((rule == "latest").sum()), int((rule == "").sum())
    align = (f"training loss T ({train_kind}) at each evaluation: mean of the logged values with step in "
             "(t_{j-1}, t_j]")
    if n_latest:
        align += f"; {n_latest} evaluation(s) had none there and used the latest earlier value"
    if n_none:
        align += f"; {n_none} evaluation(s) with no training loss at or before them are left out of the gap"
    notes.insert(0, align)

    j_star, rho, why_not = _divergence(es[has_gap], gs_sub, delta=delta, min_spearman=min_spearman,
                                       min_after=min_after)
    divergence_step = None if j_star is None else _step(es[has_gap][j_star])
    if why_not:
        notes.append(why_not)

    j_min = int(np.argmin(vl))  # first on ties
    val_min, val_final = float(vl[j_min]), float(vl[-1])
    fired = np.flatnonzero(gl > alpha)
    gl_step = _step(es[fired[0]]) if fired.size else None
    if fired.size and fired[0] < j_min:
        notes.append(f"GL{alpha:g} first fired at step {gl_step}, before the validation minimum at step "
                     f"{_step(es[j_min])}: the curve is noisy, GL is a stopping rule")
    after = gl[j_min + 1:]
    max_rise = float(np.nanmax(after)) if after.size and np.isfinite(after).any() else 0.0
    max_rise_step = _step(es[j_min + 1 + int(np.nanargmax(after))]) if max_rise > 0 else None
    rose = bool(np.any(after > alpha))
    k = min(trend_evals, es.size - j_min)  # the last evaluations, none before the minimum
    slope = _slope(es[-k:].astype(np.float64), vl[-k:]) if k >= 2 else math.nan
    span = float(es[-1] - es[-k]) if k >= 2 else 0.0
    v_proj = vl[-1] + (slope * span if math.isfinite(slope) else 0.0)  # the trend, one span ahead
    gl_proj = 100.0 * (v_proj / val_min - 1.0) if val_min > 0 else math.nan
    sustained = bool(gl[-1] > alpha) and not gl_proj <= alpha  # NaN (GL undefined): the end GL decides

    verdict = "none"
    if rose and not sustained:
        verdict = "recovered"
    elif rose:
        defined = np.flatnonzero(np.isfinite(train[j_min:]))
        if defined.size == 0 or j_min + defined[0] == train.size - 1:
            verdict = "overfitting"
            notes.append("no training loss to compare between the validation minimum and the last evaluation: "
                         "validation loss got worse, but instability cannot be ruled out")
        else:
            verdict = "overfitting" if train[-1] < train[j_min + defined[0]] else "unstable"

    headline = _headline(verdict, _step(es[j_min]), float(gl[-1]), max_rise, alpha, divergence_step,
                         max_rise_step=max_rise_step, slope=slope, k=k, gl_proj=gl_proj, span=span)
    if bad_val:
        headline += f"; {bad_val}"
    return Overfitting(verdict, divergence_step, _step(es[j_min]), gl_step, val_min, val_final, float(gl[-1]),
                       max_rise, rho, aligned, headline, tuple(notes), max_rise_step=max_rise_step,
                       final_step=_step(es[-1]), trend_slope=slope, trend_evals=k)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x (NaN when x is constant)."""
    dx = x - x.mean()
    denom = float(dx @ dx)
    return float(dx @ (y - y.mean())) / denom if denom > 0 else math.nan


def memorisation(train_loss: float, val_loss: float, *, ratio: float, min_gap: float) -> bool:
    """Training loss far below validation loss: T <= ratio * V and V - T >= min_gap (ours, beside §10).
    False when either loss is not finite."""
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        return False
    return train_loss <= ratio * val_loss and val_loss - train_loss >= min_gap


def _headline(verdict: str, min_step: int | float, final_rise: float, max_rise: float, alpha: float,
              divergence_step: int | float | None, *, max_rise_step: int | float | None = None,
              slope: float = math.nan, k: int = 0, gl_proj: float = math.nan, span: float = 0.0) -> str:
    widen = "" if divergence_step is None else f"; the train/val gap has widened since step {divergence_step}"
    at_rate = f"{gl_proj:.0f}% above it {span:g} steps on at that rate"
    if verdict == "recovered":
        trend = (f"falling over the last {k} evaluations ({at_rate})" if slope < 0 else
                 f"back within {alpha:g}% of it")
        return (f"recovered: validation loss bottomed at step {min_step}, rose {max_rise:.0f}% above it by step "
                f"{max_rise_step}, then came back: it ended {final_rise:.1f}% above its best, {trend} "
                f"(a bump, not sustained overfitting){widen}")
    if verdict == "none":
        soft = "" if divergence_step is None else (
            f" (the train/val gap has widened since step {divergence_step}: the model fits its training data "
            "faster than it generalises)")
        return "no overfitting: validation loss is at or near its best at the end" + soft
    if final_rise > alpha:
        rise = f"ended {final_rise:.0f}% above it"
        if slope < 0:
            rise += f", falling over the last {k} evaluations but too slowly to recover ({at_rate})"
        elif slope >= 0:
            rise += f", not falling over the last {k} evaluations"
    else:
        rise = f"rose up to {max_rise:.0f}% above it (ended {final_rise:.0f}% above)"
    if verdict == "overfitting":
        return f"overfitting: validation loss bottomed at step {min_step} and {rise}{widen}"
    return (f"unstable: validation loss bottomed at step {min_step} and {rise} while training loss rose too "
            f"(the run is diverging, not memorising){widen}")
