"""Welford / Chan running statistics (§1) against numpy on the concatenated data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analyze.metrics.welford import RunningStats, merge_all


def test_large_offset_matches_numpy_where_naive_formula_fails() -> None:
    rng = np.random.default_rng(0)
    x = 1e9 + rng.standard_normal(1_000_000)
    ref = np.var(x, ddof=1)  # numpy is two-pass: the independent reference

    # Streamed in 100 uneven batches through from_batch + merge.
    cuts = np.sort(rng.choice(np.arange(1, x.size), size=99, replace=False))
    stats = merge_all(RunningStats.from_batch(b) for b in np.split(x, cuts))
    assert stats.n == x.size
    assert abs(stats.var - ref) / ref <= 1e-9
    assert abs(stats.mean - x.mean()) <= 1e-6  # 1e-15 relative to 1e9

    # The naive sum / sum-of-squares formula loses all significant digits here.
    n, s, ss = x.size, x.sum(), (x * x).sum()
    naive = (ss - s * s / n) / (n - 1)
    assert abs(naive - ref) / ref > 1e-2


def test_single_sample_update_is_the_sheet_drill() -> None:
    # Hand computation: state n=3, mean=2, M2=2 (samples 1, 2, 3); add x=6:
    # d = 4, mean = 2 + 4/4 = 3, M2 = 2 + 4 * (6 - 3) = 14, var = 14/3.
    s = RunningStats.from_batch(np.array([1.0, 2.0, 3.0])).update(6.0)
    assert s.n == 4 and s.mean == pytest.approx(3.0, abs=1e-15)
    assert s.m2 == pytest.approx(14.0, abs=1e-12)
    assert s.var == pytest.approx(np.var([1, 2, 3, 6], ddof=1), rel=1e-15)


def test_streaming_one_sample_at_a_time_equals_one_shot() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, size=(257, 4))
    s = RunningStats.empty((4,))
    for row in x:
        s = s.update(row)
    one_shot = RunningStats.from_batch(x)
    np.testing.assert_allclose(s.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(s.var, np.var(x, axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(one_shot.var, s.var, rtol=1e-12)


def test_elementwise_batches_per_layer_and_torch_input() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(int(k), 3, 2)) * np.arange(1, 7).reshape(3, 2) for k in (5, 1, 17, 9)]
    s = merge_all(RunningStats.from_batch(torch.from_numpy(b).float()) for b in batches)
    allx = np.concatenate([b.astype(np.float32).astype(np.float64) for b in batches])
    assert s.shape == (3, 2) and np.all(s.n == 32)
    np.testing.assert_allclose(s.mean, allx.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.std, np.std(allx, axis=0, ddof=1), rtol=1e-12)


def test_axis_argument_and_small_counts() -> None:
    x = np.arange(12.0).reshape(3, 4)
    s = RunningStats.from_batch(x, axis=1)
    np.testing.assert_allclose(s.var, np.var(x, axis=1, ddof=1), rtol=1e-15)
    assert np.isnan(RunningStats.empty().var)
    one = RunningStats.from_batch(np.array([7.0]))
    assert one.mean == 7.0 and np.isnan(one.var) and np.isnan(one.std)
    assert RunningStats.from_batch(np.zeros((0, 2))).n.tolist() == [0.0, 0.0]
    assert merge_all([]).n == 0


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
batch = arrays(np.float64, st.integers(0, 12), elements=finite)


def _close(a: RunningStats, b: RunningStats) -> None:
    assert a.n == b.n
    scale = 1.0 + abs(float(a.mean)) + abs(float(b.mean))
    assert abs(a.mean - b.mean) <= 1e-12 * scale
    # M2 is a sum of squares; rounding is relative to the data's magnitude squared.
    assert abs(a.m2 - b.m2) <= 1e-9 * (1.0 + a.m2 + b.m2 + scale**2 * 1e-3)


@settings(max_examples=150, deadline=None)
@given(batch, batch, batch)
def test_merge_is_associative_and_matches_concatenation(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = (RunningStats.from_batch(v) for v in (x, y, z))
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    _close(left, right)
    _close(left, RunningStats.from_batch(np.concatenate([x, y, z])))


@settings(max_examples=100, deadline=None)
@given(batch)
def test_empty_state_is_the_identity(x: np.ndarray) -> None:
    a = RunningStats.from_batch(x)
    e = RunningStats.empty()
    for m in (a.merge(e), e.merge(a)):
        assert m.n == a.n
        assert m.mean == a.mean and m.m2 == a.m2  # exactly, not approximately
