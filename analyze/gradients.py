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
    "frobenius_norm",
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


_BLOCK_ELEMENTS = 1 << 20  # ~4 MB of float32 per block: bounded temporaries on any tensor


def _blocks(x: Tensor) -> Tensor:
    """x as (rows, cols) for blockwise reductions: a view of the tensor's own rows (no copy
    for contiguous tensors; padding a 154 MB embedding to a round width would copy it)."""
    x = x.detach()
    return x.reshape(-1, x.shape[-1]) if x.dim() >= 2 and x.shape[-1] > 0 else x.reshape(1, -1)


def frobenius_norm(x: Tensor) -> float:
    """||x||_F in float64 without a float64 copy of the whole tensor: blocks of ~1M elements
    are upcast one at a time (an 8 MB temporary instead of 2x the tensor)."""
    if x.numel() == 0:
        return 0.0
    rows = _blocks(x)
    step = max(1, _BLOCK_ELEMENTS // rows.shape[1])
    total = 0.0
    for i in range(0, rows.shape[0], step):
        block = rows[i: i + step].to(torch.float64)
        total += float(torch.sum(block * block))
    return math.sqrt(total)


_fro = frobenius_norm


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
    denom = frobenius_norm(w_old)
    if not denom > 0:
        return math.nan
    new, old = _blocks(w_new), _blocks(w_old)
    step = max(1, _BLOCK_ELEMENTS // new.shape[1])
    total = 0.0
    for i in range(0, new.shape[0], step):  # blocks of rows: one ~4 MB difference at a time
        diff = new[i: i + step].to(torch.float64) - old[i: i + step].to(torch.float64)
        total += float(torch.sum(diff * diff))
    return math.sqrt(total) / denom


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
