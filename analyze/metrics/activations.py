"""Per-layer activation magnitude mean|A| (§3).

a_l = (1 / (B * L * d)) * sum_{b,l,i} |A_l[b, l, i]|, over real (unmasked) tokens only when a
padding mask is given. The values are then aggregated with Welford (`analyze.kernels`, §1) over the
batches of an evaluation; `batch_mean_abs` gives the per-example values that feed it.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_mean_abs", "mean_abs_activation"]


def _check(a: Tensor, mask: Tensor | None) -> Tensor | None:
    if a.ndim < 2:
        raise ValueError(f"activation must be (B, ..., d), got shape {tuple(a.shape)}")
    if mask is None:
        return None
    if mask.shape != a.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match activation {tuple(a.shape[:-1])}")
    return mask.to(device=a.device, dtype=torch.bool)


def mean_abs_activation(a: Tensor, mask: Tensor | None = None) -> Tensor:
    """mean |A| over all of (B, L, d) as a 0-d float32+ tensor (§3); no host sync.

    ``mask`` (B, L) is True for real tokens; padded positions are left out of both the sum and
    the count. NaN when no token is real.
    """
    m = _check(a, mask)
    x = a.detach().abs()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if m is None:
        return x.mean()
    d = a.shape[-1]
    total = torch.where(m.unsqueeze(-1), x, 0).sum()  # (B, L, d); padding may hold garbage/NaN
    return total / (m.sum() * d)


def batch_mean_abs(a: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-example mean |A| (shape (B,)) for Welford aggregation over an evaluation (§1, §3).

    Each example's value is averaged over its own real tokens and d; examples with no real
    token are NaN (drop them before Welford). Note: the Welford mean of these equals
    `mean_abs_activation` only when all examples have the same number of real tokens; for the
    token-weighted value use `mean_abs_activation` per batch.
    """
    m = _check(a, mask)
    x = a.detach().abs()
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    per_tok = x.mean(dim=-1)  # (B, L)
    if m is None:
        return per_tok.reshape(per_tok.shape[0], -1).mean(dim=1)
    B = per_tok.shape[0]
    kept = torch.where(m, per_tok, 0).reshape(B, -1)  # (B, L)
    return kept.sum(dim=1) / m.reshape(B, -1).sum(dim=1)
