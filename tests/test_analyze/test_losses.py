"""Per-token, per-example, per-class loss and tau with Welch SE (§7-§8)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from analyze.metrics.losses import (
    ClassLossState, gaps_to_mean, per_example_loss, per_token_loss, tau, token_losses,
)


def _state(values, classes, n_classes):
    return ClassLossState.from_batch(torch.tensor(values, dtype=torch.float64), torch.tensor(classes), n_classes)


def test_token_losses_match_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    ref = -np.take_along_axis(torch.log_softmax(logits, -1).numpy(), targets.numpy()[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_losses(logits, targets).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_per_token_and_per_example_exclude_non_targets():
    loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 99.0, 99.0], [99.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert per_token_loss(loss, mask).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5, abs=1e-15)  # token weighted
    ex = per_example_loss(loss, mask)
    assert ex[:2].tolist() == [2.0, 4.5]
    assert math.isnan(ex[2].item())  # no target tokens
    assert math.isnan(per_token_loss(loss, torch.zeros_like(mask)).item())
    # A non-finite value at a masked position must not leak in.
    loss[0, 3] = float("inf")
    assert per_example_loss(loss, mask)[0].item() == 2.0


def test_class_state_against_numpy_with_empty_and_skipped():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 0.5, 200)
    c = rng.integers(0, 3, 200)  # class 3 of 4 stays empty
    x[[3, 10, 50]] = [np.nan, np.inf, np.nan]
    s = _state(x, c, 4)
    ok = np.isfinite(x)
    for k in range(3):
        sel = x[ok & (c == k)]
        assert s.count[k].item() == sel.size
        assert s.mean()[k].item() == pytest.approx(sel.mean(), rel=1e-13)
        assert s.var()[k].item() == pytest.approx(sel.var(ddof=1), rel=1e-12)
    assert s.n_skipped.tolist()[:3] == [int(((~ok) & (c == k)).sum()) for k in range(3)]
    assert s.count[3].item() == 0 and math.isnan(s.mean()[3].item()) and math.isnan(s.var()[3].item())


floats = st.floats(-50, 50, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(floats, st.integers(0, 2)), max_size=40), cuts=st.data())
def test_merge_equals_one_shot(data, cuts):
    x = [v for v, _ in data]
    c = [k for _, k in data]
    n = len(x)
    i = cuts.draw(st.integers(0, n))
    j = cuts.draw(st.integers(i, n))
    parts = [_state(x[a:b], c[a:b], 3) for a, b in ((0, i), (i, j), (j, n))]
    whole = _state(x, c, 3)
    for merged in (parts[0].merge(parts[1]).merge(parts[2]), parts[0].merge(parts[1].merge(parts[2])),
                   ClassLossState.empty(3).merge(whole), whole.merge(ClassLossState.empty(3))):
        assert torch.equal(merged.count, whole.count)
        torch.testing.assert_close(merged.loss_sum, whole.loss_sum, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.loss_m2, whole.loss_m2, rtol=1e-9, atol=1e-8)


def test_streaming_is_stable_for_large_offsets():
    # x = 1e8 + N(0, 1): the naive E[x^2] - E[x]^2 loses every digit; the merged state must not.
    rng = np.random.default_rng(2)
    x = 1e8 + rng.normal(size=3000)
    c = rng.integers(0, 2, 3000)
    s = ClassLossState.empty(2)
    for a in range(0, 3000, 250):
        s = s.merge(_state(x[a:a + 250], c[a:a + 250], 2))
    for k in range(2):
        sel = x[c == k]
        naive = (np.mean(sel ** 2) - np.mean(sel) ** 2) * sel.size / (sel.size - 1)
        assert abs(naive - sel.var(ddof=1)) > 0.1  # the naive formula really fails here
        assert s.var()[k].item() == pytest.approx(sel.var(ddof=1), rel=1e-6)


def test_tau_drill_regular_vs_irregular():
    # §8 drill: L_R = 1.8, L_I = 3.4 -> tau = L_I - L_R = 1.6 nats.
    R, I = 0, 1
    s = _state([1.7, 1.9, 3.3, 3.5], [R, R, I, I], 2)
    t = tau(s, hard=I, easy=R)
    assert t.tau == pytest.approx(1.6, abs=1e-12)
    assert (t.mean_a, t.mean_b, t.n_a, t.n_b, t.a, t.b) == (pytest.approx(3.4), pytest.approx(1.8), 2, 2, I, R)
    # By hand: s^2 = 0.02 in both classes, SE = sqrt(0.02/2 + 0.02/2) = sqrt(0.02).
    assert t.se == pytest.approx(math.sqrt(0.02), rel=1e-12)


def test_tau_se_matches_welch_t_test():
    rng = np.random.default_rng(3)
    hard, easy = rng.normal(3.0, 0.7, 37), rng.normal(2.2, 0.3, 81)
    s = _state(np.concatenate([hard, easy]), [2] * 37 + [0] * 81, 3)
    t = tau(s, hard=2, easy=0)
    welch = stats.ttest_ind(hard, easy, equal_var=False)
    assert t.tau == pytest.approx(hard.mean() - easy.mean(), rel=1e-12)
    assert t.se == pytest.approx(t.tau / welch.statistic, rel=1e-10)  # Welch t = diff / SE


def test_tau_nan_cases_and_range():
    s = _state([1.0, 2.0, 3.0], [0, 0, 1], 3)
    t = tau(s, 1, 0)
    assert t.tau == 3.0 - 1.5 and math.isnan(t.se)  # class 1 has one example: no variance
    assert math.isnan(tau(s, 2, 0).tau)  # class 2 is empty
    with pytest.raises(ValueError):
        tau(s, 3, 0)


def test_gaps_to_mean_example_weighted():
    x = np.array([1.0, 1.0, 1.0, 4.0])
    c = np.array([0, 0, 0, 1])
    g = gaps_to_mean(_state(x, c, 3))
    # all-class mean = 7/4 (example weighted, not the mean of class means 2.5)
    np.testing.assert_allclose(g[:2], [1.0 - 1.75, 4.0 - 1.75], rtol=0, atol=1e-15)
    assert math.isnan(g[2])


def test_bad_shapes():
    with pytest.raises(ValueError):
        ClassLossState.from_batch(torch.zeros(3), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        _state([1.0], [0], 2).merge(_state([1.0], [0], 3))
    with pytest.raises((IndexError, RuntimeError)):
        _state([1.0, 2.0], [0, 5], 2)
