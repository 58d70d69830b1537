"""The one §1 Welford implementation (`analyze.kernels`: class_welford / scatter_welford /
merge_welford) against numpy on the concatenated data: large offsets, the sheet's drill,
elementwise states, associativity and the empty identity."""
from __future__ import annotations

from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analyze.kernels import class_welford, merge_welford

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _state(x: np.ndarray) -> State:
    """(count, total, M2) of a 1-D batch, one state, through the kernel."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))
    count, total, m2, _skipped = class_welford(t, torch.zeros(t.numel(), dtype=torch.long), 1)
    return count[0, 0], total[0, 0], m2[0, 0]


def _mean_var(s: State) -> tuple[float, float]:
    n = float(s[0])
    return float(s[1]) / n, float(s[2]) / (n - 1)


def test_large_offset_matches_numpy_where_naive_formula_fails() -> None:
    rng = np.random.default_rng(0)
    x = 1e9 + rng.standard_normal(1_000_000)
    ref = np.var(x, ddof=1)  # numpy is two-pass: the independent reference
    cuts = np.sort(rng.choice(np.arange(1, x.size), size=99, replace=False))
    s = reduce(merge_welford, (_state(b) for b in np.split(x, cuts)))  # 100 uneven batches
    mean, var = _mean_var(s)
    assert int(s[0]) == x.size
    # the state keeps sums (total), not means, so 100 merges at offset 1e9 cost ~1e-8 relative
    assert abs(var - ref) / ref <= 1e-7
    assert abs(mean - x.mean()) <= 1e-6
    n, tot, ss = x.size, x.sum(), (x * x).sum()
    naive = (ss - tot * tot / n) / (n - 1)  # the naive formula loses every significant digit here
    assert abs(naive - ref) / ref > 1e-2


def test_one_more_sample_is_the_sheet_drill() -> None:
    # Hand computation: state n=3, mean=2, M2=2 (samples 1, 2, 3); add x=6:
    # d = 4, mean = 2 + 4/4 = 3, M2 = 2 + 4 * (6 - 3) = 14, var = 14/3.
    s = merge_welford(_state(np.array([1.0, 2.0, 3.0])), _state(np.array([6.0])))
    assert int(s[0]) == 4 and float(s[1]) / 4 == pytest.approx(3.0, abs=1e-15)
    assert float(s[2]) == pytest.approx(14.0, abs=1e-12)


def test_elementwise_states_one_per_layer() -> None:
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(int(k), 6)) * np.arange(1, 7) for k in (5, 1, 17, 9)]

    def per_element(b: np.ndarray) -> State:
        ids = torch.arange(6).repeat(len(b))
        c, t, m, _ = class_welford(torch.from_numpy(b.reshape(-1)), ids, 6)
        return c[0], t[0], m[0]

    s = reduce(merge_welford, (per_element(b) for b in batches))
    allx = np.concatenate(batches)
    assert s[0].tolist() == [32] * 6
    np.testing.assert_allclose(s[1].numpy() / 32, allx.mean(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s[2].numpy() / 31, np.var(allx, axis=0, ddof=1), rtol=1e-12)


def test_non_finite_values_are_skipped_and_counted() -> None:
    x = np.array([1.0, np.nan, 3.0, np.inf])
    count, total, m2, skipped = class_welford(torch.from_numpy(x), torch.zeros(4, dtype=torch.long), 1)
    assert int(count) == 2 and float(total) == 4.0 and float(m2) == 2.0 and int(skipped) == 2


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
batch = arrays(np.float64, st.integers(0, 12), elements=finite)


def _close(a: State, b: State) -> None:
    assert int(a[0]) == int(b[0])
    n = max(int(a[0]), 1)
    ma, mb = float(a[1]) / n, float(b[1]) / n
    scale = 1.0 + abs(ma) + abs(mb)
    assert abs(ma - mb) <= 1e-12 * scale
    assert abs(float(a[2]) - float(b[2])) <= 1e-9 * (1.0 + float(a[2]) + float(b[2]) + scale**2 * 1e-3)


@settings(max_examples=150, deadline=None)
@given(batch, batch, batch)
def test_merge_is_associative_and_matches_concatenation(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = (_state(v) for v in (x, y, z))
    left, right = merge_welford(merge_welford(a, b), c), merge_welford(a, merge_welford(b, c))
    _close(left, right)
    _close(left, _state(np.concatenate([x, y, z])))


@settings(max_examples=100, deadline=None)
@given(batch)
def test_empty_state_is_the_identity(x: np.ndarray) -> None:
    a = _state(x)
    e = _state(np.zeros(0))
    for m in (merge_welford(a, e), merge_welford(e, a)):
        assert int(m[0]) == int(a[0]) and float(m[1]) == float(a[1]) and float(m[2]) == float(a[2])
