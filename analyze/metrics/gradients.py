"""Global gradient norm (§2), grad-to-weight ratio and checkpoint update ratio (§11).

`global_grad_norm` is the in-loop one (it lives in `analyze.kernels`, shared with the logger):
it stays on the device and never syncs with the host. The ratios are offline and return floats.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from analyze.kernels import global_grad_norm
from analyze.metrics.rho import classify_rho, classify_rhos, grad_to_weight_ratios  # numpy-only, re-exported

__all__ = [
    "classify_rho",
    "classify_rhos",
    "frobenius_norm",
    "global_grad_norm",
    "grad_to_weight_ratio",
    "grad_to_weight_ratios",
    "ratio_from_sums",
    "sum_of_squares",
    "update_ratio",
    "update_ratio_of_blocks",
    "update_ratio_per_step",
    "update_sums",
]


_CHUNK = 1024               # elements per float32 partial norm: rounding ~1e-7 relative (longer sums drift: ~8e-6 at 1e5)
_BLOCK_ELEMENTS = 1 << 18  # ~1 MB of float32 per difference block: stays in cache, multiple of _CHUNK


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the partial norms: float32 for half types, the tensor's own float type otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _chunk_norms(flat: Tensor, out: Tensor) -> None:
    """Norms of consecutive _CHUNK-element pieces of the 1-D `flat` (the last may be shorter) into `out`."""
    k = flat.numel() // _CHUNK
    acc = _acc_dtype(flat) if flat.dtype != out.dtype else None
    if k:
        torch.linalg.vector_norm(flat[: k * _CHUNK].view(k, _CHUNK), dim=1, dtype=acc, out=out[:k])
    if flat.numel() > k * _CHUNK:
        torch.linalg.vector_norm(flat[k * _CHUNK:], dtype=acc, out=out[k])


def _n_chunks(n: int) -> int:
    return -(-n // _CHUNK)


def _sum_sq_f64(x: Tensor) -> float:
    """sum(x^2) upcast to float64 one ~1M-element block at a time (the slow, exact fallback)."""
    flat = x.detach().reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), 1 << 20):
        block = flat[i: i + (1 << 20)].to(torch.float64)
        total += float(torch.sum(block * block))
    return total


def sum_of_squares(x: Tensor) -> float:
    """||x||_F^2 as a Python float, in one streaming pass and no copy of a contiguous x.

    The flat tensor is cut into 1024-element pieces whose norms are accumulated in the tensor's
    precision (float32 for half types); their squares are summed in float64. Relative error is
    that of a 1024-term float32 sum, ~1e-7 (test bound 1e-6); float64 input stays float64. A
    piece whose norm overflows float32 (entries above ~1e19) sends the tensor through a float64
    pass, so the result is non-finite only when x has a NaN or inf entry.
    """
    if x.numel() == 0:
        return 0.0
    flat = x.detach().reshape(-1)
    parts = torch.empty(_n_chunks(flat.numel()), dtype=_acc_dtype(flat))
    _chunk_norms(flat, parts)
    total = float(parts.double().square().sum())
    return total if math.isfinite(total) else _sum_sq_f64(x)


def frobenius_norm(x: Tensor) -> float:
    """||x||_F (§11, §12): sqrt of `sum_of_squares`; NaN or inf when x has such an entry."""
    return math.sqrt(sum_of_squares(x))


_fro = frobenius_norm


def grad_to_weight_ratio(grad: Tensor, weight: Tensor) -> float:
    """rho = ||G||_F / ||W||_F (§11); NaN when ||W||_F = 0 (the ratio is undefined)."""
    w = _fro(weight)
    return _fro(grad) / w if w > 0 else math.nan


def update_sums(w_new: Tensor, w_old: Tensor) -> tuple[float, float]:
    """(||W_new - W_old||_F^2, ||W_old||_F^2) in one pass over both tensors.

    The difference is formed ~1 MB at a time into one reused buffer (no tensor-sized
    temporary) and its piece norms written into one vector, so there is a single host sync.
    The float32 difference is exact wherever an entry changed by less than half its size
    (Sterbenz) and within one rounding otherwise; norms as in `sum_of_squares`. Both sums are
    additive, so a caller that reads W_old in row blocks adds up the pairs of its blocks.
    """
    if w_new.shape != w_old.shape:
        raise ValueError(f"update_sums: shapes differ {tuple(w_new.shape)} vs {tuple(w_old.shape)}")
    if w_new.numel() == 0:
        return 0.0, 0.0
    new, old = w_new.detach().reshape(-1), w_old.detach().reshape(-1)
    if new.dtype != old.dtype:
        new, old = new.to(torch.float64), old.to(torch.float64)
    n = new.numel()
    acc = _acc_dtype(new)
    buf = torch.empty(min(_BLOCK_ELEMENTS, n), dtype=acc)  # half types subtract in float32 (exact there)
    diff_parts = torch.empty(_n_chunks(n), dtype=acc)
    old_parts = torch.empty(_n_chunks(n), dtype=acc)
    for i in range(0, n, _BLOCK_ELEMENTS):
        stop = min(i + _BLOCK_ELEMENTS, n)
        rows = slice(i // _CHUNK, _n_chunks(stop))
        d = buf[: stop - i]
        if acc == new.dtype:
            torch.sub(new[i:stop], old[i:stop], out=d)
        else:
            torch.sub(d.copy_(new[i:stop]), old[i:stop], out=d)
        _chunk_norms(d, diff_parts[rows])
        _chunk_norms(old[i:stop], old_parts[rows])
    sums = torch.stack([diff_parts.double().square().sum(), old_parts.double().square().sum()]).tolist()
    if not all(map(math.isfinite, sums)):  # a float32 piece norm overflowed (or a NaN/inf entry)
        return _sum_sq_f64(new.to(torch.float64) - old.to(torch.float64)), _sum_sq_f64(old)
    return sums[0], sums[1]


def ratio_from_sums(diff_sq: float, old_sq: float) -> float:
    """||W_new - W_old||_F / ||W_old||_F from `update_sums`; NaN when ||W_old||_F = 0."""
    return math.sqrt(diff_sq / old_sq) if old_sq > 0 else math.nan


def update_ratio_of_blocks(blocks: Iterable[tuple[Tensor, Tensor]]) -> float:
    """||W_new - W_old||_F / ||W_old||_F (§11, §12) from (W_new rows, W_old rows) block pairs that
    together cover both tensors (each pair of equal shape): `update_sums` added up, then
    `ratio_from_sums`. A caller reading W_old in row blocks never holds a second full copy."""
    diff_sq = old_sq = 0.0
    for new, old in blocks:
        d, o = update_sums(new, old)
        diff_sq, old_sq = diff_sq + d, old_sq + o
    return ratio_from_sums(diff_sq, old_sq)


def update_ratio(w_new: Tensor, w_old: Tensor) -> float:
    """||W_new - W_old||_F / ||W_old||_F between consecutive checkpoints (§11, §12 "update ratio").

    Shapes must match; NaN when ||W_old||_F = 0.
    """
    if w_new.shape != w_old.shape:
        raise ValueError(f"update_ratio: shapes differ {tuple(w_new.shape)} vs {tuple(w_old.shape)}")
    return update_ratio_of_blocks([(w_new, w_old)])


def update_ratio_per_step(ratio: float, steps_elapsed: int) -> float:
    """The update ratio per training step elapsed between the two checkpoints (§11); NaN when
    no step elapsed."""
    return ratio / steps_elapsed if steps_elapsed > 0 else math.nan
