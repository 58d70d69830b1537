"""Activation magnitude mean|A| (§3) against a numpy loop over real tokens."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyze.metrics.activations import batch_mean_abs, mean_abs_activation
from analyze.kernels import class_welford


def _ref(a: np.ndarray, mask: np.ndarray) -> tuple[float, list[float]]:
    """Slow reference: explicit loops over examples and tokens."""
    total, count, per_example = 0.0, 0, []
    for b in range(a.shape[0]):
        s, c = 0.0, 0
        for t in range(a.shape[1]):
            if mask[b, t]:
                s += float(np.abs(a[b, t]).sum())
                c += a.shape[2]
        total, count = total + s, count + c
        per_example.append(s / c if c else math.nan)
    return total / count, per_example


def test_mean_abs_without_mask_is_the_plain_mean() -> None:
    a = torch.tensor([[[1.0, -2.0], [3.0, -4.0]]])  # hand: (1+2+3+4)/4 = 2.5
    assert float(mean_abs_activation(a)) == 2.5
    assert batch_mean_abs(a).tolist() == [2.5]


def test_padding_mask_excludes_tokens_from_sum_and_count() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 5, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    mask[3, :] = False  # an all-padding example
    a[~mask] = float("nan")  # garbage in padding must not leak
    ref_all, ref_each = _ref(a.numpy(), mask.numpy())
    assert float(mean_abs_activation(a, mask)) == pytest.approx(ref_all, rel=1e-6)
    got = batch_mean_abs(a, mask).numpy()
    np.testing.assert_allclose(got[:3], ref_each[:3], rtol=1e-6)
    assert math.isnan(got[3])


def test_bf16_input_and_welford_aggregation_over_batches() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 7, 8, generator=g).to(torch.bfloat16) for _ in range(5)]
    vals = [mean_abs_activation(b) for b in batches]
    assert all(v.dtype == torch.float32 for v in vals)
    count, total, m2, _ = class_welford(torch.stack(vals).double(), torch.zeros(len(vals), dtype=torch.long), 1)
    ref = np.array([np.abs(b.float().numpy()).mean() for b in batches])
    assert float(total) / int(count) == pytest.approx(ref.mean(), rel=1e-6)
    assert (float(m2) / (int(count) - 1)) ** 0.5 == pytest.approx(ref.std(ddof=1), rel=1e-5)
    # Equal token counts: the Welford mean of per-example values equals the pooled mean.
    per_ex = torch.cat([batch_mean_abs(b) for b in batches])
    assert float(per_ex.mean()) == pytest.approx(float(torch.stack(vals).mean()), rel=1e-6)


def test_bad_mask_shape_is_rejected() -> None:
    with pytest.raises(ValueError):
        mean_abs_activation(torch.ones(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
