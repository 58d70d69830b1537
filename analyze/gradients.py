"""Global gradient norm (formulas.md §2), grad-to-weight ratio and checkpoint update ratio (§11).

`global_grad_norm` is the in-loop one: it stays on the device and never syncs with the host,
so the logger can call it every step. The ratios are offline and return Python floats.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "RHO_HEALTHY",
    "classify_rho",
    "global_grad_norm",
    "grad_to_weight_ratio",
    "update_ratio",
]

RHO_HEALTHY = (1e-4, 1e-1)  # §11: healthy band for rho = ||G||_F / ||W||_F (inclusive)


def global_grad_norm(tensors: Sequence[Tensor]) -> Tensor:
    """g = sqrt(sum_p sum_i grad_{p,i}^2) over all tensors, as a 0-d tensor (§2).

    One fused ``_foreach_norm`` per dtype group, then the norm of the stacked per-tensor
    norms; computed in float32 or wider, so bf16 gradients do not overflow the sum.
    Non-finite gradients give a non-finite result (stored and flagged, never dropped).
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(0.0)
    device = tensors[0].device
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    norms: list[Tensor] = []
    for dtype, group in groups.items():
        acc = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        if dtype == acc:
            norms.extend(torch._foreach_norm(group))
        else:
            norms.extend(torch._foreach_norm([g.to(acc) for g in group]))
    out_dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    stacked = torch.stack([n.to(device=device, dtype=out_dtype) for n in norms])
    return torch.linalg.vector_norm(stacked)


def _fro(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().to(torch.float64)))


def grad_to_weight_ratio(grad: Tensor, weight: Tensor) -> float:
    """rho = ||G||_F / ||W||_F (§11); NaN when ||W||_F = 0 (the ratio is undefined)."""
    w = _fro(weight)
    return _fro(grad) / w if w > 0 else math.nan


def update_ratio(w_new: Tensor, w_old: Tensor) -> float:
    """||W_new - W_old||_F / ||W_old||_F between consecutive checkpoints (§11, §12 "update ratio").

    Shapes must match; NaN when ||W_old||_F = 0.
    """
    if w_new.shape != w_old.shape:
        raise ValueError(f"update_ratio: shapes differ {tuple(w_new.shape)} vs {tuple(w_old.shape)}")
    old = w_old.detach().to(torch.float64)
    denom = _fro(old)
    return _fro(w_new.detach().to(torch.float64) - old) / denom if denom > 0 else math.nan


def classify_rho(rho: float) -> str:
    """§11 verdict: "barely training" below 1e-4, "unstable" above 1e-1, else "healthy".

    Non-finite rho is "unstable" (a NaN/inf gradient is an instability, not health).
    """
    lo, hi = RHO_HEALTHY
    if not math.isfinite(rho) or rho > hi:
        return "unstable"
    if rho < lo:
        return "barely training"
    return "healthy"
