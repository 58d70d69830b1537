"""Train/val divergence, validation minimum, GL_alpha and verdict (§10).

Curves are built so every expected number can be worked out by hand; the comments show the work.
"""
import math

import numpy as np
import pytest

from analyze.metrics.overfitting import memorisation, align_train_to_evals, analyze_overfitting, smooth_gap

EVALS = np.arange(100, 1300, 100)  # t_1..t_12 = 100..1200


def _train_for(t_per_eval):
    """Training loss logged every 10 steps, constant T_j on (t_{j-1}, t_j]: the interval mean is T_j."""
    steps = np.arange(10, EVALS[-1] + 1, 10)
    j = np.searchsorted(EVALS, steps, side="left")
    return steps, np.asarray(t_per_eval, dtype=float)[j]


T_FALLING = 3.0 - 0.1 * np.arange(1, 13)  # 2.9, 2.8, ..., 1.8


def test_alignment_rules_by_hand():
    train_steps = np.array([1, 2, 3, 5, 6, 10, 20])
    train_loss = np.array([10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 100.0])
    evals = np.array([0, 3, 4, 8, 12])
    t, rule = align_train_to_evals(train_steps, train_loss, evals)
    # t=0: nothing at or before it -> left out. t=3: (0, 3] -> steps 1, 2, 3 -> 8.
    # t=4: (3, 4] empty -> latest at or before 4 is step 3 -> 6. t=8: (4, 8] -> steps 5, 6 -> 4.5.
    # t=12: (8, 12] -> step 10 -> 3. Step 20 lies after the last evaluation and is never used.
    np.testing.assert_allclose(t, [np.nan, 8.0, 6.0, 4.5, 3.0], rtol=0, atol=1e-15, equal_nan=True)
    assert rule.tolist() == ["", "mean", "latest", "mean", "mean"]
    # The first evaluation takes every training loss at or before it.
    t1, _ = align_train_to_evals(train_steps, train_loss, np.array([5]))
    assert t1[0] == pytest.approx((10 + 8 + 6 + 5) / 4, abs=1e-15)


def test_alignment_left_out_evaluation_still_counts_for_val_min():
    r = analyze_overfitting(np.array([5, 6]), np.array([2.0, 2.0]), np.array([1, 10, 20]), np.array([1.0, 2.0, 3.0]))
    assert np.isnan(r.aligned.gap[0]) and r.aligned.train_rule[0] == ""
    assert r.val_min_step == 1
    assert any("left out of the gap" in n for n in r.notes)


def test_smooth_gap_by_hand():
    np.testing.assert_array_equal(smooth_gap(np.array([1.0, 5.0, 2.0, 3.0, 0.0])), [1.0, 2.0, 3.0, 2.0, 0.0])
    np.testing.assert_array_equal(smooth_gap(np.array([1.0, 5.0])), [1.0, 5.0])


# Gap with a planted turn. Smoothed (median of 3) by hand:
#   G  = .50 .40 .30 .20 .12 .15 .22 .30 .38 .45 .55 .60
#   G~ = .50 .40 .30 .20 .15 .15 .22 .30 .38 .45 .55 .60
# Record lows (G~_j <= min of earlier G~): j = 0..5 (j = 5 ties j = 4: both are G_5), so j* = 5, t = 600.
# After j*: 6 evaluations, G~ strictly rising (Spearman 1), widening .60 - .15 = .45 > .05.
GAP_TURN = np.array([0.50, 0.40, 0.30, 0.20, 0.12, 0.15, 0.22, 0.30, 0.38, 0.45, 0.55, 0.60])


def test_gap_widens_while_val_improves_is_not_overfitting():
    # V = T + G = 3.4 3.2 3.0 2.8 2.62 2.55 2.52 2.5 2.48 2.45 2.45 2.4: still improving at the end.
    ts, tl = _train_for(T_FALLING)
    r = analyze_overfitting(ts, tl, EVALS, T_FALLING + GAP_TURN)
    assert r.divergence_step == 600
    assert r.spearman == pytest.approx(1.0, abs=1e-12)
    assert r.val_min_step == 1200 and r.verdict == "none" and r.gl_step is None
    np.testing.assert_allclose(r.aligned.gap_smooth, [.5, .4, .3, .2, .15, .15, .22, .3, .38, .45, .55, .6], atol=1e-12)
    assert r.headline.startswith("no overfitting: validation loss is at or near its best at the end")
    assert "widened since step 600" in r.headline


def test_planted_overfitting():
    # G rises 0.3 per evaluation after j = 5: V = 3.4 3.2 3.0 2.8 2.62 2.55 2.75 2.95 3.15 3.35 3.55 3.75.
    gap = GAP_TURN.copy()
    gap[6:] = 0.15 + 0.3 * np.arange(1, 7)
    ts, tl = _train_for(T_FALLING)
    r = analyze_overfitting(ts, tl, EVALS, T_FALLING + gap)
    assert r.val_min_step == 600 and r.val_min == pytest.approx(2.55, abs=1e-12)
    # GL at 700 = 100 (2.75 / 2.55 - 1) = 7.84 > 5: the first firing.
    assert r.gl_step == 700
    assert r.final_rise_pct == pytest.approx(100 * (3.75 / 2.55 - 1), rel=1e-12)
    assert r.divergence_step == 600  # same smoothed turn as GAP_TURN (G~_4 = G~_5 = .15)
    assert r.verdict == "overfitting"  # T at the end 1.8 < T at the minimum 2.4
    assert r.headline == ("overfitting: validation loss bottomed at step 600 and ended 47% above it, not falling "
                          "over the last 3 evaluations; the train/val gap has widened since step 600")


def test_unstable_when_train_rises_too():
    # T falls to 2.4 at t = 600, then climbs to 3.0; gap 0.3 - 0.02 j keeps shrinking (no divergence).
    t = np.array([2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])
    v = t + 0.3 - 0.02 * np.arange(12)  # 3.2 3.08 2.96 2.84 2.72 2.6 2.68 ... 3.08
    ts, tl = _train_for(t)
    r = analyze_overfitting(ts, tl, EVALS, v)
    assert r.val_min_step == 600 and r.divergence_step is None
    assert r.verdict == "unstable"  # T at the end 3.0 >= T at the minimum 2.4
    assert r.final_rise_pct == pytest.approx(100 * (3.08 / 2.6 - 1), rel=1e-12)
    assert r.headline.startswith("unstable: validation loss bottomed at step 600 and ended 18% above it")


def test_healthy_run_never_diverges():
    ts, tl = _train_for(T_FALLING)
    v = T_FALLING + 0.3 - 0.01 * np.arange(12)  # val and gap both shrink
    r = analyze_overfitting(ts, tl, EVALS, v)
    assert r.verdict == "none" and r.divergence_step is None and r.gl_step is None
    assert r.val_min_step == 1200 and r.final_rise_pct == 0.0
    assert r.headline == "no overfitting: validation loss is at or near its best at the end"
    assert any("does not widen consistently" in n for n in r.notes)


def test_gl5_by_hand_and_noisy_early_firing():
    evals = np.array([10, 20, 30, 40, 50, 60, 70])
    val = np.array([3.0, 2.5, 2.6, 2.7, 2.63, 2.2, 2.35])
    # min so far: 3.0 2.5 2.5 2.5 2.5 2.2 2.2 -> GL = 0, 0, 4, 8, 5.2, 0, 6.8181...
    r = analyze_overfitting(np.arange(1, 71), np.linspace(3, 1, 70), evals, val)
    np.testing.assert_allclose(r.aligned.gl, [0, 0, 4.0, 8.0, 5.2, 0, 6.818181818181818], rtol=0, atol=1e-9)
    assert r.gl_step == 40  # fires at 8 % before the global minimum at step 60
    assert r.val_min_step == 60
    assert any("before the validation minimum" in n for n in r.notes)
    assert r.verdict == "overfitting"  # 6.8 % > 5 after the minimum, training loss still falling
    assert "ended 7% above it" in r.headline


def test_rise_then_recovery_headline_and_alpha_boundary():
    evals = np.array([1, 2, 3, 4])
    r = analyze_overfitting(evals, np.array([4.0, 3.0, 2.0, 1.0]), evals, np.array([3.0, 2.5, 2.8, 2.55]))
    # GL 12 % at step 3, then back to 2 % at the end: a bump the run recovered from, not overfitting
    assert r.verdict == "recovered" and r.max_rise_pct == pytest.approx(12.0, abs=1e-9)
    assert r.max_rise_step == 3 and r.final_rise_pct == pytest.approx(2.0, abs=1e-9)
    assert r.headline.startswith("recovered: ") and "rose 12% above it by step 3" in r.headline
    assert "ended 2.0% above its best" in r.headline
    # A rise of exactly 4.9 % stays below alpha = 5: no verdict of overfitting.
    r = analyze_overfitting(evals, np.ones(4), evals, np.array([3.0, 2.0, 2.098, 2.05]))
    assert r.verdict == "none"


@pytest.mark.parametrize("tail, why", [
    # G~ = .5 .4 .3 .16 .16 .17 .18 .19: j* = 4, steady but only .19 - .16 = .03 <= .05 nats of widening
    (np.array([0.16, 0.17, 0.18, 0.19]), "nats, not more than 0.05"),
    # G~ = .5 .4 .3 .3 .2 .8 .25 .7 .3 .6 .6: j* = 4, widens by .4 but zigzags (Spearman < 0.8)
    (np.array([0.9, 0.2, 0.8, 0.25, 0.7, 0.3, 0.6]), "Spearman"),
])
def test_divergence_needs_size_and_consistency(tail, why):
    gap = np.concatenate([[0.5, 0.4, 0.3, 0.15], tail])
    evals = np.arange(1, gap.size + 1) * 10
    t = np.linspace(3, 2, gap.size)
    r = analyze_overfitting(evals, t, evals, t + gap)
    assert r.divergence_step is None
    assert any(why in n for n in r.notes)


def test_too_few_evaluations_after_the_turn():
    gap = np.array([0.5, 0.4, 0.3, 0.15, 0.4, 0.6])  # G~ = .5 .4 .3 .3 .4 .6: j* = 3, only 2 evaluations after
    evals = np.arange(1, 7) * 10
    t = np.linspace(3, 2, 6)
    assert analyze_overfitting(evals, t, evals, t + gap).divergence_step is None
    gap = np.array([0.5, 0.4, 0.3, 0.15, 0.4, 0.6, 0.7])  # G~ = .5 .4 .3 .3 .4 .6 .7: j* = 3 -> t = 40
    evals = np.arange(1, 8) * 10
    t = np.linspace(3, 2, 7)
    assert analyze_overfitting(evals, t, evals, t + gap).divergence_step == 40


def test_non_finite_and_missing_inputs():
    evals = np.array([10, 20, 30, 40, 50])
    val = np.array([3.0, np.nan, 2.5, np.inf, 2.4])
    train = np.array([3.0, np.nan, 2.0, 1.5, 1.0])
    r = analyze_overfitting(evals, train, evals, val)
    assert r.aligned.eval_step.tolist() == [10, 30, 50]  # non-finite evaluations left out
    assert r.val_min_step == 50 and r.verdict == "none"
    assert "2 evaluation(s) with non-finite validation loss left out (first at step 20)" in r.headline
    assert any("1 non-finite training loss" in n for n in r.notes)
    # T at 30 = mean over (10, 30] of the finite training losses {2.0}: the NaN at 20 is left out.
    assert r.aligned.train.tolist() == [3.0, 2.0, pytest.approx(1.25)]

    none = analyze_overfitting(evals, train, np.array([], dtype=int), np.array([]))
    assert none.verdict is None and none.val_min_step is None and "cannot be assessed" in none.headline

    no_train = analyze_overfitting(np.array([]), np.array([]), evals, np.array([3.0, 2.0, 2.5, 2.6, 2.7]))
    assert no_train.verdict == "overfitting" and math.isnan(no_train.spearman)
    assert any("instability cannot be ruled out" in n for n in no_train.notes)


def test_unsorted_input_is_sorted():
    ts, tl = _train_for(T_FALLING)
    gap = GAP_TURN
    perm = np.random.default_rng(0).permutation(12)
    r = analyze_overfitting(ts[::-1], tl[::-1], EVALS[perm], (T_FALLING + gap)[perm])
    assert r.divergence_step == 600 and r.val_min_step == 1200


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy import stats

    from analyze.metrics.overfitting import spearman

    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        x = rng.integers(0, 6, n).astype(float)   # many ties
        y = x * rng.normal(1, 0.5) + rng.integers(0, 4, n)
        ref = stats.spearmanr(x, y).statistic
        got = spearman(x, y)
        assert (np.isnan(ref) and np.isnan(got)) or abs(got - ref) < 1e-12
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_sustained_rise_versus_recovered_bump_at_the_trend_rule():
    """overfitting needs GL > alpha at the end and at the trend's projection one span ahead (the
    last evaluations since the minimum); otherwise a rise above alpha is 'recovered' (each side)."""
    evals = np.arange(1, 8) * 10
    train = np.linspace(3, 1, 7)
    # min 2.0 at step 30, then 2.3 2.4 2.5 2.6: 30 % above at the end and rising -> sustained
    rising = np.array([3.0, 2.5, 2.0, 2.3, 2.4, 2.5, 2.6])
    r = analyze_overfitting(evals, train, evals, rising, trend_evals=3)
    assert r.verdict == "overfitting" and r.trend_slope > 0 and r.final_rise_pct == pytest.approx(30.0)
    # GL 10 % at the end but falling fast: slope of (50, 2.7), (60, 2.45), (70, 2.2) = -0.025 per step,
    # projected 20 steps on: 2.2 - 0.5 = 1.7, below the best (2.0) -> recovered (still coming back)
    falling = np.array([3.0, 2.5, 2.0, 2.9, 2.7, 2.45, 2.2])
    r = analyze_overfitting(evals, train, evals, falling, trend_evals=3)
    assert r.verdict == "recovered" and "falling over the last 3" in r.headline
    assert r.trend_slope == pytest.approx(-0.025, rel=1e-12) and r.final_rise_pct == pytest.approx(10.0)
    # falling, but too slowly: (50, 2.8), (60, 2.7), (70, 2.6): -0.01 per step, 2.4 projected = GL 20 % > 5
    slow = np.array([3.0, 2.5, 2.0, 2.9, 2.8, 2.7, 2.6])
    r = analyze_overfitting(evals, train, evals, slow, trend_evals=3)
    assert r.verdict == "overfitting" and "too slowly to recover (20% above it 20 steps on" in r.headline
    # the same slow fall held against alpha = 21 %: the projection (20 %) is back within it -> recovered
    assert analyze_overfitting(evals, train, evals, slow, alpha=21.0, trend_evals=3).verdict == "recovered"
    # flat at the end (slope exactly 0 is "not falling") and above alpha -> sustained
    flat = np.array([3.0, 2.5, 2.0, 2.9, 2.6, 2.6, 2.6])
    assert analyze_overfitting(evals, train, evals, flat, trend_evals=3).verdict == "overfitting"
    # rising at the end but back within alpha (GL 4 %) -> recovered
    back = np.array([3.0, 2.5, 2.0, 2.5, 2.0, 2.04, 2.08])
    r = analyze_overfitting(evals, train, evals, back, trend_evals=3)
    assert r.verdict == "recovered" and r.final_rise_pct == pytest.approx(4.0) and r.max_rise_step == 40
    # trend window of 2: the last two points (2.7 -> 2.6) fall -> recovered; of 5 it includes the jump
    assert analyze_overfitting(evals, train, evals, falling, trend_evals=2).verdict == "recovered"
    assert analyze_overfitting(evals, train, evals, np.array([3.0, 2.5, 2.0, 2.1, 2.2, 2.9, 2.85]),
                               trend_evals=5).verdict == "overfitting"


@pytest.mark.parametrize("t, v, expected", [
    (0.0027, 0.177, True),   # the demo's end: train 65x below validation
    (0.04, 0.16, True),      # exactly ratio 0.25, gap 0.12 >= 0.1
    (0.041, 0.16, False),    # just above ratio 0.25
    (0.01, 0.1, False),      # ratio 0.1 but the gap 0.09 < 0.1 nats
    (0.01, 0.11, True),      # gap 0.1 (within rounding)
    (2.5, 3.0, False),       # an ordinary generalisation gap
    (float("nan"), 1.0, False),
])
def test_memorisation_rule_both_sides(t, v, expected):
    assert memorisation(t, v, ratio=0.25, min_gap=0.1 - 1e-12) is expected


def test_alignment_over_blocks_of_training_points_equals_one_pass(monkeypatch):
    """The §10 per-segment means computed over blocks of training points (bounded memory) equal
    a plain per-evaluation mean of the training losses in (t_{j-1}, t_j]."""
    import analyze.metrics.overfitting as ov

    rng = np.random.default_rng(4)
    ts = np.sort(rng.integers(0, 100_000, 20_000))
    tl = rng.normal(3.0, 1.0, ts.size)
    es = np.sort(rng.choice(120_000, 70, replace=False))
    monkeypatch.setattr(ov, "_BLOCK", 997)
    got, rule = ov.align_train_to_evals(ts, tl, es)
    prev = -np.inf
    for j, t in enumerate(es):
        inside = (ts > prev) & (ts <= t)
        if inside.any():
            assert rule[j] == "mean" and got[j] == pytest.approx(tl[inside].mean(), rel=1e-12)
        elif (ts <= t).any():
            assert rule[j] == "latest" and got[j] == tl[ts <= t][-1]
        else:
            assert rule[j] == "" and np.isnan(got[j])
        prev = t
