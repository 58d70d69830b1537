"""Loss-spike detector (§9) against a slow, obviously correct loop."""
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import analyze.metrics.spikes as spikes_mod
from analyze.metrics.spikes import detect_spikes, rolling_median_mad


def _slow(x, window, k):
    """The §9 definition, one point at a time: window = the W most recent finite values before t."""
    seen, med, mad, kind, height = [], [], [], [], []
    for v in x:
        m = d = h = math.nan
        kd = ""
        if len(seen) >= window:
            win = seen[-window:]
            m = statistics.median(win)
            d = statistics.median([abs(a - m) for a in win])
        if not math.isfinite(v):
            kd = "non-finite"
        elif not math.isnan(m):
            mad_unit = max(d, 1e-6 * abs(m) + 1e-12)
            h = (v - m) / mad_unit  # §9: the height in MAD units
            kd = "spike" if (v - m) > k * 1.4826 * mad_unit else ""
        if math.isfinite(v):
            seen.append(v)
        med.append(m), mad.append(d), kind.append(kd), height.append(h)
    return np.array(med), np.array(mad), np.array(kind), np.array(height)


def _slow_events(steps, kind, height):
    """Consecutive points of the same non-empty kind -> (first, peak, height, length, kind)."""
    out, i = [], 0
    while i < len(kind):
        if not kind[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(kind) and kind[j + 1] == kind[i]:
            j += 1
        if kind[i] == "spike":
            p = max(range(i, j + 1), key=lambda q: (height[q], -q))  # highest, first on ties
            out.append((steps[i], steps[p], height[p], j - i + 1, "spike"))
        else:
            out.append((steps[i], steps[i], None, j - i + 1, "non-finite"))
        i = j + 1
    return out


def _noisy_series_with_trouble(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    x = 2.0 + 0.05 * rng.standard_normal(n) - np.linspace(0, 0.5, n)
    x[rng.choice(n, 12, replace=False)] += rng.uniform(0.2, 2.0, 12)  # spikes of varied height
    x[[300, 301, 302]] += 1.0  # a 3-point spike
    x[[303, 700, 701, 1100]] = [np.nan, np.inf, -np.inf, np.nan]  # spike followed by non-finite
    x[900:960] = 1.5  # a flat stretch: the floor, not MAD = 0, sets the scale
    x[960] = 1.5 + 1e-7
    return x


@pytest.mark.parametrize("window", [5, 50, 51])
def test_rolling_median_mad_matches_loop(window):
    x = _noisy_series_with_trouble()
    med, mad = rolling_median_mad(x, window)
    rmed, rmad, _, _ = _slow(x, window, 6.0)
    np.testing.assert_array_equal(np.isnan(med), np.isnan(rmed))
    np.testing.assert_allclose(med, rmed, rtol=0, atol=0, equal_nan=True)  # same arithmetic: exact
    np.testing.assert_allclose(mad, rmad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k, slice_points", [(3.0, None), (6.0, None), (6.0, 37)])
def test_detector_matches_loop(k, slice_points, monkeypatch):
    if slice_points:  # the series in slices of 37 points: the carried windows must join up
        monkeypatch.setattr(spikes_mod, "_CHUNK_ELEMENTS", slice_points * 50)
    x = _noisy_series_with_trouble()
    steps = np.arange(x.size) * 20  # logged every 20 steps: the window counts points, not steps
    r = detect_spikes(steps, x, window=50, k=k)
    _, _, kind, height = _slow(x, 50, k)
    np.testing.assert_array_equal(r.kind, kind)
    np.testing.assert_array_equal(r.flags, kind != "")
    np.testing.assert_allclose(r.height_mad, height, rtol=1e-12, atol=0, equal_nan=True)
    ref = _slow_events(steps, kind, height)
    assert [(e.first_step, e.peak_step, e.length, e.kind) for e in r.events] == [(a, b, d, e) for a, b, _, d, e in ref]
    for e, (_, _, h, _, _) in zip(r.events, ref):
        assert (e.height_mad is None) == (h is None)
        if h is not None:
            assert e.height_mad == pytest.approx(h, rel=1e-12)
            assert e.height_sigma == pytest.approx(h / 1.4826, rel=1e-12)  # robust sigmas, the unit of k
            assert e.height_sigma > k  # flagged means above k robust sigmas
    n_checked = int(np.sum(~np.isnan(height)) + np.sum(~np.isfinite(x)))
    assert r.n_checked == n_checked
    # §9 spike score: flagged logged points over all logged points of the series (warm-up included)
    assert r.score == pytest.approx((kind != "").sum() / x.size, abs=1e-15)
    assert r.score < (kind != "").sum() / n_checked  # warm-up points count in the denominator


def test_planted_spikes_found_exactly():
    rng = np.random.default_rng(4)
    x = 3.0 + 0.1 * rng.standard_normal(3000)
    planted = [400, 1234, 2500, 2999]
    x[planted] += 3.0  # 30 sigma
    x[1800:1804] += 4.0  # one 4-point event
    r = detect_spikes(np.arange(3000), x)
    assert [(e.first_step, e.length, e.kind) for e in r.events] == [
        (400, 1, "spike"), (1234, 1, "spike"), (1800, 4, "spike"), (2500, 1, "spike"), (2999, 1, "spike")]
    assert all(e.height_sigma > 20 for e in r.events)
    # 30 sigma of N(0, 0.1) noise: ~30 / 0.6745 MAD units (MAD of a Gaussian = 0.6745 sigma)
    assert all(e.height_mad == pytest.approx(e.height_sigma * 1.4826) for e in r.events)
    assert np.flatnonzero(r.flags).tolist() == [400, 1234, 1800, 1801, 1802, 1803, 2500, 2999]


def test_gaussian_noise_gives_no_flag_at_k6():
    x = np.random.default_rng(12345).standard_normal(10_000)
    r = detect_spikes(np.arange(10_000), x, window=50, k=6.0)
    assert not r.flags.any() and r.events == () and r.score == 0.0
    assert r.n_checked == 10_000 - 50
    # The same series at k = 3 does flag points (the §9 table gives ~41 per 10,000): the test can fail.
    assert detect_spikes(np.arange(10_000), x, window=50, k=3.0).flags.sum() > 10


def test_non_finite_flagged_and_kept_out_of_windows():
    x = np.ones(120) + 1e-3 * np.sin(np.arange(120))
    x[10] = np.nan  # in warm-up: still flagged
    x[70:72] = np.inf
    r = detect_spikes(np.arange(120), x, window=50)
    assert r.kind[10] == "non-finite" and r.kind[70] == "non-finite" and r.flags[[10, 70, 71]].all()
    assert [(e.first_step, e.length, e.kind, e.height_mad) for e in r.events] == [
        (10, 1, "non-finite", None), (70, 2, "non-finite", None)]
    med, _ = rolling_median_mad(x, 50)
    finite = np.flatnonzero(np.isfinite(x))
    assert np.isnan(med[50])  # only 49 finite values before index 50: still warm-up
    for t in (51, 72, 100, 119):
        prev = finite[finite < t][-50:]
        assert med[t] == np.median(x[prev])  # inf never entered the window


def test_flat_window_floor_and_one_sided():
    x = np.full(200, 2.0)
    x[100] = 2.0 * (1 + 4e-16)  # rounding noise on a flat series: below the floor
    x[150] = 2.1  # a real jump on a flat series
    x[170] = 1.0  # downward: never a spike
    r = detect_spikes(np.arange(200), x)
    assert np.flatnonzero(r.flags).tolist() == [150]


def test_notes_sorting_and_shapes():
    r = detect_spikes(np.arange(10), np.ones(10), window_averaged=8)
    assert "8" in r.note and "sensitivity" in r.note and "warm-up" in r.note
    assert r.score == 0.0 and r.n_checked == 0  # nothing flagged among 10 logged points
    assert math.isnan(detect_spikes(np.arange(0), np.ones(0)).score)
    x = np.random.default_rng(0).standard_normal(100)
    x[80] = 50.0
    order = np.random.default_rng(1).permutation(100)
    r = detect_spikes(np.arange(100)[order], x[order])
    assert np.array_equal(r.steps, np.arange(100)) and "sorted" in r.note
    assert [e.first_step for e in r.events] == [80]
    with pytest.raises(ValueError):
        detect_spikes(np.arange(3), np.ones(4))
    with pytest.raises(ValueError):
        rolling_median_mad(np.ones(4), 0)


def _brute_median_mad(x, window):
    """np.median per index t over the W most recent finite values before t, and of |w - m|."""
    med, mad = np.full(x.size, np.nan), np.full(x.size, np.nan)
    finite = np.flatnonzero(np.isfinite(x))
    for t in range(x.size):
        prev = finite[finite < t]
        if prev.size >= window:
            w = x[prev[-window:]]
            med[t] = np.median(w)
            mad[t] = np.median(np.abs(w - med[t]))
    return med, mad


_values = st.one_of(  # few distinct values (ties), rounded reals, and the non-finite ones
    st.sampled_from([0.0, 1.0, 1.0, 2.0, -3.0, 2.5]),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: round(v, 1)),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([np.nan, np.inf, -np.inf]),
)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_values, max_size=120), window=st.integers(1, 12), chunk=st.sampled_from([1, 7, 40, 1 << 19]))
def test_rolling_median_mad_equals_brute_force(values, window, chunk):
    """Random series with NaN/inf and ties, even and odd W (1 and 2 included), series shorter than
    W, and slices from one point to the whole series: bit-equal to np.median per window."""
    x = np.array(values, dtype=np.float64)
    old = spikes_mod._CHUNK_ELEMENTS
    spikes_mod._CHUNK_ELEMENTS = chunk * window  # slices of `chunk` points
    try:
        med, mad = rolling_median_mad(x, window)
    finally:
        spikes_mod._CHUNK_ELEMENTS = old
    rmed, rmad = _brute_median_mad(x, window)
    np.testing.assert_array_equal(med, rmed)  # NaN at the same places, equal bits elsewhere
    np.testing.assert_array_equal(mad, rmad)


@pytest.mark.parametrize("window", [1, 2, 49, 50, 64])
def test_rolling_median_mad_long_series_with_ties_matches_brute_force(window):
    rng = np.random.default_rng(window)
    x = np.round(rng.standard_normal(3000), 1)  # many exact ties in every window
    x[rng.random(x.size) < 0.02] = np.nan
    x[rng.choice(x.size, 5)] = np.inf
    x[:200] = np.round(x[:200], 0)  # coarser still: long runs of equal deviations
    med, mad = rolling_median_mad(x, window)
    rmed, rmad = _brute_median_mad(x, window)
    np.testing.assert_array_equal(med, rmed)
    np.testing.assert_array_equal(mad, rmad)


def test_kind_values_and_an_unflagged_series():
    x = 1.0 + 1e-3 * np.sin(np.arange(300))
    r = detect_spikes(np.arange(300), x)
    assert r.kind.shape == (300,) and set(r.kind.tolist()) == {""} and not r.flags.any()
    x[[100, 200]] = [5.0, np.nan]
    r = detect_spikes(np.arange(300), x)
    assert r.kind[100] == "spike" and r.kind[200] == "non-finite"
    assert set(r.kind[r.flags].tolist()) == {"spike", "non-finite"} and set(r.kind[~r.flags].tolist()) == {""}
