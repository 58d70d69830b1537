"""Dead FFN neurons (§5) against hand-built activations and a numpy brute force."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analyze.metrics.neurons import DeadNeuronState, dead_neurons, dead_threshold_note


def _reference(h: np.ndarray, mask: np.ndarray | None, eps: float):
    """Brute force: keep the real tokens, then max |H| and frequency per unit."""
    flat = h.reshape(-1, h.shape[-1])
    if mask is not None:
        flat = flat[mask.reshape(-1)]
    a = np.abs(flat)
    max_abs = a.max(axis=0) if len(a) else np.zeros(h.shape[-1])
    freq = (a >= eps).mean(axis=0) if len(a) else np.full(h.shape[-1], np.nan)
    return max_abs, freq, len(a)


def test_hand_built_units():
    # 2 x 3 tokens, 4 units: unit 0 silent, unit 1 tiny (5e-4 < eps), unit 2 fires once, unit 3 always.
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    h[..., 1] = 5e-4
    h[1, 2, 2] = -1.0  # |H| counts, not H
    h[..., 3] = 2.0
    r = dead_neurons(h, eps=1e-3, activation="relu")
    assert r.dead_count == 2 and r.d_ff == 4 and r.n_tokens == 6
    assert r.dead_fraction == 0.5
    np.testing.assert_allclose(r.frequency, [0, 0, 1 / 6, 1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.max_abs, [0, 5e-4, 1.0, 2.0], rtol=0, atol=1e-15)
    assert r.near_dead_count == 2  # f_j < 1e-3: the two dead units (unit 2 fires on 1/6 of tokens)
    assert r.activation == "relu" and "ReLU" in r.note


def test_padding_excluded():
    # Unit 0 fires only on padding positions: dead once padding is masked, alive without the mask.
    h = torch.zeros(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    h[0, 2:, 0] = 5.0
    h[1, 3, 0] = 5.0
    h[..., 1] = 1.0
    masked = dead_neurons(h, mask)
    assert masked.n_tokens == 5
    assert masked.dead_count == 2  # units 0 and 2
    assert dead_neurons(h).dead_count == 1  # only unit 2
    assert dead_neurons(h).n_tokens == 8


def test_near_dead_is_not_dead():
    # Fires on 1 of 2000 tokens: f = 5e-4 < 1e-3 -> near-dead, but max |H| = 1 -> not dead.
    h = torch.zeros(2000, 2)
    h[7, 0] = 1.0
    h[:, 1] = 1.0
    r = dead_neurons(h)
    assert r.dead_count == 0 and r.near_dead_count == 1
    assert r.frequency[0] == pytest.approx(1 / 2000, abs=1e-15)


def test_sparsity_is_not_dead():
    # Every unit is zero on 90% of tokens (high element-level sparsity) yet no unit is dead.
    rng = np.random.default_rng(0)
    h = np.zeros((1000, 8))
    for j in range(8):
        h[rng.choice(1000, 100, replace=False), j] = 1.0
    r = dead_neurons(torch.from_numpy(h))
    assert r.dead_count == 0
    assert r.activation_sparsity == pytest.approx((np.abs(h) < 1e-3).mean(), abs=1e-15)
    assert r.activation_sparsity == pytest.approx(0.9, abs=1e-15)


@pytest.mark.parametrize("masked", [False, True])
def test_against_brute_force(masked):
    g = torch.Generator().manual_seed(3)
    # Mixture: many units have small magnitudes so the eps threshold matters.
    scale = torch.logspace(-5, 0, 32, dtype=torch.float64)
    h = torch.randn(4, 16, 32, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(4, 16, generator=g) > 0.3 if masked else None
    r = dead_neurons(h, mask, eps=1e-3)
    max_abs, freq, n = _reference(h.numpy(), None if mask is None else mask.numpy(), 1e-3)
    assert r.n_tokens == n
    np.testing.assert_array_equal(r.max_abs, max_abs)
    np.testing.assert_allclose(r.frequency, freq, rtol=0, atol=1e-15)
    assert r.dead_count == int((max_abs < 1e-3).sum())
    assert 0 < r.dead_count < 32  # the case exercises both sides of eps


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), cut=st.data(), eps=st.sampled_from([1e-4, 1e-3, 0.1]))
def test_merge_equals_one_shot(n, cut, eps):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 5, generator=g, dtype=torch.float64) * torch.tensor([1e-5, 1e-3, 0.01, 0.1, 1.0])
    mask = torch.rand(n, generator=g) > 0.2
    i = cut.draw(st.integers(0, n))
    j = cut.draw(st.integers(i, n))
    parts = [DeadNeuronState.from_batch(h[a:b], mask[a:b], eps) for a, b in ((0, i), (i, j), (j, n))]
    left = parts[0].merge(parts[1]).merge(parts[2])
    right = parts[0].merge(parts[1].merge(parts[2]))
    whole = DeadNeuronState.from_batch(h, mask, eps)
    for s in (left, right, DeadNeuronState.empty(5, eps).merge(whole)):
        assert torch.equal(s.max_abs, whole.max_abs)
        assert torch.equal(s.active_count, whole.active_count)
        assert int(s.n_tokens) == int(whole.n_tokens)


@pytest.mark.parametrize("name, fn, x0", [("gelu", torch.nn.functional.gelu, "-3.44"),
                                          ("silu", torch.nn.functional.silu, "-9.12")])
def test_threshold_note_matches_torch(name, fn, x0):
    note = dead_threshold_note(name, 1e-3)
    assert x0 in note
    x = torch.tensor([float(x0) - 0.01, float(x0) + 0.01], dtype=torch.float64)
    y = fn(x).abs()
    assert y[0] < 1e-3 < y[1]  # the boundary really lies within 0.01 of the stated value


def test_dead_gelu_unit_from_preactivations():
    # Unit 0 stays below -3.44 on every token: dead. Unit 1 reaches -3.3 once: alive (|GELU(-3.3)| > 1e-3).
    x = torch.full((50, 2), -6.0, dtype=torch.float64)
    x[10, 1] = -3.3
    r = dead_neurons(torch.nn.functional.gelu(x), activation="gelu")
    assert r.dead_count == 1 and r.max_abs[1] > 1e-3
    assert "GELU" in r.note and "-3.44" in r.note


def test_no_tokens_and_nonfinite():
    h = torch.ones(2, 3, 4)
    r = dead_neurons(h, torch.zeros(2, 3, dtype=torch.bool))
    assert r.n_tokens == 0 and math.isnan(r.dead_fraction) and r.dead_count == 0
    h = torch.zeros(5, 3)
    h[2, 0] = float("nan")
    r = dead_neurons(h)
    assert r.nonfinite_units == 1 and r.dead_count == 2  # the NaN unit is never called dead


def test_bf16_and_3d_shape_checks():
    h = torch.tensor([[[0.0, 1.0]], [[0.0, 0.5]]], dtype=torch.bfloat16)
    r = dead_neurons(h)
    assert r.dead_count == 1 and r.max_abs.dtype == np.float64
    with pytest.raises(ValueError):
        DeadNeuronState.from_batch(torch.zeros(3))
    with pytest.raises(ValueError):
        DeadNeuronState.from_batch(torch.zeros(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        DeadNeuronState.from_batch(torch.zeros(2, 4), eps=1e-3).merge(
            DeadNeuronState.from_batch(torch.zeros(2, 4), eps=1e-2))
