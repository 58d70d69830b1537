"""Global grad norm (formulas.md §2) and rho / update ratio (§11) against direct formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyze.gradients import (
    RHO_HEALTHY,
    classify_rho,
    global_grad_norm,
    grad_to_weight_ratio,
    update_ratio,
)


def test_global_grad_norm_equals_norm_of_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in [(3, 4), (7,), (2, 3, 5), (1,), (0, 4)]]
    out = global_grad_norm(grads)
    ref = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads]).double())
    assert out.ndim == 0 and out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-6)
    # Hand-computed: sqrt(3^2 + 4^2 + 12^2) = 13.
    assert float(global_grad_norm([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])])) == pytest.approx(13.0, rel=1e-7)


def test_global_grad_norm_mixed_dtypes_and_empty() -> None:
    a = torch.full((1000,), 300.0, dtype=torch.bfloat16)  # sum of squares 9e7 overflows fp16, fine in fp32
    b = torch.full((10,), 2.0, dtype=torch.float16)
    c = torch.ones(4, dtype=torch.float64)
    ref = math.sqrt(1000 * 300.0**2 + 10 * 4.0 + 4)
    out = global_grad_norm([a, b, c])
    assert out.dtype == torch.float64
    assert float(out) == pytest.approx(ref, rel=1e-6)
    assert float(global_grad_norm([])) == 0.0 and global_grad_norm([]).ndim == 0
    assert float(global_grad_norm([None, torch.tensor([0.6, 0.8])])) == pytest.approx(1.0, rel=1e-7)


def test_global_grad_norm_never_syncs_with_the_host() -> None:
    # Meta tensors have no data: any .item() / float() / data-dependent branch would raise.
    out = global_grad_norm([torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.bfloat16)])
    assert out.device.type == "meta" and out.ndim == 0
    with pytest.raises(RuntimeError):
        float(out)  # proves the probe can detect a sync


def test_global_grad_norm_keeps_non_finite() -> None:
    assert math.isnan(float(global_grad_norm([torch.tensor([1.0, float("nan")]), torch.ones(3)])))
    assert math.isinf(float(global_grad_norm([torch.tensor([float("inf")]), torch.ones(3)])))


def test_grad_to_weight_ratio_and_update_ratio_against_numpy() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 5))
    gr = 1e-3 * rng.normal(size=(8, 5))
    rho = grad_to_weight_ratio(torch.from_numpy(gr), torch.from_numpy(w))
    assert rho == pytest.approx(np.linalg.norm(gr) / np.linalg.norm(w), rel=1e-12)
    w2 = w + gr
    ur = update_ratio(torch.from_numpy(w2).float(), torch.from_numpy(w).float())
    ref = np.linalg.norm(w2.astype(np.float32).astype(np.float64) - w.astype(np.float32)) / np.linalg.norm(
        w.astype(np.float32).astype(np.float64))
    assert ur == pytest.approx(ref, rel=1e-9)
    assert math.isnan(grad_to_weight_ratio(torch.ones(3), torch.zeros(3)))
    assert math.isnan(update_ratio(torch.ones(3), torch.zeros(3)))
    with pytest.raises(ValueError):
        update_ratio(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize(
    ("rho", "verdict"),
    [(1e-6, "barely training"), (9.9e-5, "barely training"), (1e-4, "healthy"), (3e-3, "healthy"),
     (0.1, "healthy"), (0.11, "unstable"), (math.inf, "unstable"), (math.nan, "unstable")],
)
def test_classify_rho_band_edges(rho: float, verdict: str) -> None:
    assert RHO_HEALTHY == (1e-4, 1e-1)
    assert classify_rho(rho) == verdict
