"""Torch kernels shared by the in-loop logger and the offline analysis (§1, §2, §8).

Imports only torch and the standard library (`loaders.logger` uses it in the training loop).
Every kernel stays on the input's device and never syncs with the host.

Per-class Welford states are triples (count, total, M2) of same-shaped tensors: count int64,
total (the sum of losses) and M2 (the sum of squared deviations from the mean) float64. The one
rule for non-finite values: an example loss (or a state row whose total) is NaN or inf enters
neither count nor sums and is counted in ``skipped`` instead.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_grad_norm", "per_tensor_grad_norms", "class_welford", "scatter_welford", "merge_welford", "recentred_m2"]

Welford = tuple[Tensor, Tensor, Tensor]  # (count int64, total float64, m2 float64)


def per_tensor_grad_norms(tensors: Sequence[Tensor]) -> Tensor:
    """||G_p||_2 of every tensor, in input order, as one 1-D tensor (§2, §11).

    One fused ``_foreach_norm`` per dtype group (the reduction the global norm is made of);
    half types accumulate in float32 without a float32 copy. Non-finite gradients give
    non-finite norms. The result is float64 when any input is, else float32; on the first
    tensor's device; never synced to the host.
    """
    if not tensors:
        return torch.zeros(0)
    first = tensors[0]
    if first.dtype in (torch.float32, torch.float64) and all(t.dtype == first.dtype for t in tensors):
        return torch.stack(torch._foreach_norm(list(tensors), 2.0))  # the common case, per step
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    norms: list[Tensor | None] = [None] * len(tensors)
    for dtype, idx in groups.items():
        acc = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2.0, dtype=acc)):
            norms[i] = n
    out_dtype = torch.float64 if torch.float64 in groups else torch.float32
    return torch.stack([n.to(device=first.device, dtype=out_dtype) for n in norms])  # type: ignore[union-attr]


def global_grad_norm(tensors: Sequence[Tensor]) -> Tensor:
    """g = sqrt(sum_p sum_i grad_{p,i}^2) over all tensors, as a 0-d tensor (§2).

    The norm of the per-tensor norms (`per_tensor_grad_norms`); computed in float32 or wider,
    so bf16 gradients do not overflow the sum. Non-finite gradients give a non-finite result
    (stored and flagged, never dropped).
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(per_tensor_grad_norms(tensors))


def recentred_m2(count: Tensor, total: Tensor, m2: Tensor, count_all: Tensor, total_all: Tensor) -> Tensor:
    """M2 + n (mean - mean_all)^2: one part's squared deviation about the combined mean (§1).

    Summed over the parts of a group it is the group's M2 exactly (Chan's merge for many parts),
    with no cancellation: every term is non-negative.
    """
    n = count.to(torch.float64)
    mean = total / n.clamp(min=1.0)
    mean_all = total_all / count_all.to(torch.float64).clamp(min=1.0)
    return m2 + n * (mean - mean_all) ** 2


def scatter_welford(index: Tensor, count: Tensor, total: Tensor, m2: Tensor,
                    size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Combine rows of Welford states into ``size`` bins, (count, total, m2, skipped) each (size,).

    ``index`` (N,) says each row's bin. Two scatters: counts and totals first, then every row's
    M2 re-centred on its bin's mean (`recentred_m2`), so the result is exact to rounding. A row
    whose total is not finite is skipped: its count goes to ``skipped`` (§8).
    """
    dev = total.device
    idx = index.reshape(-1).to(device=dev, dtype=torch.long)
    n = count.reshape(-1).to(device=dev, dtype=torch.float64)
    s = total.reshape(-1).to(torch.float64)
    ok = torch.isfinite(s)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    n_ok, s_ok = torch.where(ok, n, zero), torch.where(ok, s, zero)
    sums = torch.zeros(size, 3, dtype=torch.float64, device=dev).index_add_(
        0, idx, torch.stack([n_ok, s_ok, n - n_ok], dim=1))  # count, total, skipped in one scatter
    bin_n, bin_s, skipped = sums.unbind(1)
    dev2 = recentred_m2(n_ok, s_ok, m2.reshape(-1).to(device=dev, dtype=torch.float64), bin_n[idx], bin_s[idx])
    bin_m2 = torch.zeros(size, dtype=torch.float64, device=dev).index_add_(0, idx, torch.where(ok, dev2, zero))
    return bin_n.to(torch.int64), bin_s, bin_m2, skipped.to(torch.int64)


def class_welford(example_loss: Tensor, class_ids: Tensor, n_classes: int, group: Tensor | None = None,
                  n_groups: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-(group, class) Welford state of example losses, (count, total, m2, skipped) each (G, C).

    ``group`` (same shape as the losses) says which step each example came from, so a whole
    window of steps is reduced at once (§1, §8); without it G = 1. A non-finite example loss
    (no target tokens, inf or NaN) is skipped and counted in ``skipped``.
    """
    loss = example_loss.detach().reshape(-1).to(torch.float64)
    ids = class_ids.detach().reshape(-1).to(device=loss.device, dtype=torch.long)
    if ids.shape != loss.shape:
        raise ValueError(f"class_ids {tuple(class_ids.shape)} and example losses {tuple(example_loss.shape)} "
                         "must have the same number of elements")
    if group is not None:
        ids = group.reshape(-1).to(device=loss.device, dtype=torch.long) * n_classes + ids
    ones = torch.ones_like(loss)
    out = scatter_welford(ids, ones, loss, torch.zeros_like(loss), n_groups * n_classes)
    return tuple(t.view(n_groups, n_classes) for t in out)  # type: ignore[return-value]


def merge_welford(a: Welford, b: Welford) -> Welford:
    """Chan et al.'s pairwise combination of two states of any (equal) shape (§1).

    Associative; a zero count on either side is the identity.
    """
    (ca, sa, ma), (cb, sb, mb) = a, b
    na, nb = ca.to(torch.float64), cb.to(torch.float64)
    n = na + nb
    delta = sb / nb.clamp(min=1) - sa / na.clamp(min=1)
    cross = torch.where((na > 0) & (nb > 0), delta * delta * na * nb / n.clamp(min=1), torch.zeros_like(n))
    return ca + cb, sa + sb, ma + mb + cross
