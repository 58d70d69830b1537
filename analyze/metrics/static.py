"""Static checks of a checkpoint's weights that need no data (§12, beyond the sheet).

* Constant lines: rows and columns of a matrix whose entries are all equal (all zero is the
  common case). A unit whose incoming weights are all zero receives no input (a dead unit); an
  input no unit reads is unused. Which axis holds the units depends on the storage layout
  (nn.Linear ``[out, in]``, GPT-2's Conv1D ``[in, out]``); the caller names it.
* Families: the same tensor name with every layer index replaced (``h.3.attn.c_proj.weight``
  -> ``h.*.attn.c_proj.weight``) and the same shape. A value is compared with its family's
  median: the ratio value / median, flagged outside ``[1/k, k]``. The median ignores one odd
  member in a family of three or more, so one broken layer cannot hide itself.
* Relative change against a base: ``||W - W0||_F / ||W0||_F``, and the same ratio-to-median
  rule across families of how far each family moved.

Pure functions over tensors and arrays, vectorised over the batch of tensors or families.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["LineCounts", "change_norms", "count_constant_lines", "family_key", "family_medians",
           "group_change", "layer_key", "outlier_side", "ratio_of_norms", "relative_change"]

# A path component that is a number: a layer (or expert) index.
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def family_key(name: str) -> str:
    """``name`` with every numeric path component replaced by ``*`` (the layer index)."""
    return _INDEX.sub("*", name)


@dataclass(frozen=True, slots=True)
class LineCounts:
    """Per matrix of a batch: rows and columns whose entries are all zero, or all equal to one
    non-zero value. -1 where the axis is not checked (its lines have fewer than 2 entries)."""

    zero_rows: Tensor
    const_rows: Tensor
    zero_cols: Tensor
    const_cols: Tensor
    first_rows: list[tuple[int, ...]]   # per matrix (batch flattened): the first constant rows' indices
    first_cols: list[tuple[int, ...]]


def _first(const: Tensor, limit: int) -> list[tuple[int, ...]]:
    """Per row of the (batch, lines) mask ``const``: the indices of its first ``limit`` True entries."""
    keep = const & (const.cumsum(dim=1) <= limit)
    out: list[list[int]] = [[] for _ in range(const.shape[0])]
    for b, i in torch.nonzero(keep).tolist():     # at most limit pairs per matrix
        out[b].append(i)
    return [tuple(x) for x in out]


def count_constant_lines(m: Tensor, limit: int = 5) -> LineCounts:
    """Constant rows and columns of ``m`` (shape ``(..., rows, cols)``), one pass per axis, with
    the indices of the first ``limit`` of each axis.

    A line with a NaN is never constant (its min and max are NaN). A line of one entry is not
    a line: rows are checked only when there are at least 2 columns, and vice versa.
    """
    if m.ndim < 2:
        raise ValueError(f"expected (..., rows, cols), got shape {tuple(m.shape)}")
    batch = m.shape[:-2]
    r, c = m.shape[-2], m.shape[-1]
    unchecked = torch.full(batch, -1, dtype=torch.int64)
    n_mats = math.prod(batch)

    def counts(dim: int, length: int) -> tuple[Tensor, Tensor, list[tuple[int, ...]]]:
        if length < 2 or m.shape[dim] == 0:
            return unchecked, unchecked, [()] * n_mats
        # amin + amax, not aminmax(dim=): torch 2.13's CPU aminmax along a dim is ~50x slower
        # (163 ms against 2 x 2.5 ms on a 5632 x 2048 float32 matrix, one thread)
        lo, hi = m.amin(dim=dim), m.amax(dim=dim)
        const = lo == hi
        zero = const & (hi == 0)
        return zero.sum(dim=-1), (const & ~zero).sum(dim=-1), _first(const.reshape(n_mats, -1), limit)

    zr, cr, fr = counts(-1, c)
    zc, cc, fc = counts(-2, r)
    return LineCounts(zr, cr, zc, cc, fr, fc)


def family_medians(values: Sequence[float] | np.ndarray, families: Sequence[str],
                   min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per value: its family's median, the value's ratio to it, and the family's size.

    Only finite values count (in the median and the size). The ratio is NaN where the value is
    not finite, the family has fewer than ``min_size`` finite values, or its median is not > 0.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=np.int64)
    _, inv = np.unique(np.asarray(families, dtype=object).astype(str), return_inverse=True)
    finite = np.isfinite(vals)
    n_fam = int(inv.max()) + 1
    size = np.bincount(inv[finite], minlength=n_fam)
    key = np.where(finite, vals, np.inf)           # non-finite values sort last in their family
    order = np.lexsort((key, inv))
    sorted_vals = key[order]
    start = np.searchsorted(inv[order], np.arange(n_fam))
    lo = np.minimum(start + np.maximum(size - 1, 0) // 2, len(vals) - 1)
    hi = np.minimum(start + size // 2, len(vals) - 1)
    with np.errstate(invalid="ignore"):
        med_f = np.where(size > 0, 0.5 * (sorted_vals[lo] + sorted_vals[hi]), np.nan)
    med = med_f[inv]
    ok = finite & (size[inv] >= min_size) & (med > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ok, vals / np.where(med > 0, med, 1.0), np.nan)
    return med, ratio, size[inv]


def outlier_side(ratio: float, k: float) -> int:
    """+1 when ``ratio > k``, -1 when ``ratio < 1/k``, 0 otherwise (and for NaN)."""
    if not math.isfinite(ratio):
        return 0
    return 1 if ratio > k else -1 if ratio < 1.0 / k else 0


CHANGE_BLOCK = 1 << 20   # elements per block of `change_norms` (its temporaries: a few MB, not a tensor's size)


def change_norms(w: Tensor, w0: Tensor) -> tuple[float, float, float]:
    """``(||w - w0||_F, ||w0||_F, ||w||_F)`` over blocks of ``CHANGE_BLOCK`` elements: a block's
    sum of squares in the tensors' precision (float32 for half types), the blocks' sums added in
    float64. The difference exists one block at a time (whole, it and a float64 copy were 3x a
    154 MB embedding). A non-finite norm means a non-finite entry (or an overflow)."""
    a, b = w.detach().reshape(-1), w0.detach().reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"shapes differ: {tuple(w.shape)} and {tuple(w0.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    sq_diff = sq_base = sq_new = 0.0
    for i in range(0, a.numel(), CHANGE_BLOCK):
        x, y = a[i:i + CHANGE_BLOCK].to(dtype), b[i:i + CHANGE_BLOCK].to(dtype)
        sq_base += float(torch.dot(y, y))
        sq_new += float(torch.dot(x, x))
        d = x - y
        sq_diff += float(torch.dot(d, d))
    return math.sqrt(sq_diff), math.sqrt(sq_base), math.sqrt(sq_new)


def ratio_of_norms(diff: float, base: float) -> float:
    """``diff / base``: 0 when both are 0, inf when only ``base`` is, NaN when either is not finite."""
    if not (math.isfinite(diff) and math.isfinite(base)):
        return math.nan
    if base == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / base


def relative_change(w: Tensor, w0: Tensor) -> float:
    """``||w - w0||_F / ||w0||_F``; 0 when both are equal, inf when only ``w0`` is all zero, NaN
    when either has a non-finite value."""
    return ratio_of_norms(*change_norms(w, w0)[:2])


def group_change(diff: np.ndarray, base: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """Relative change of each group of tensors taken together (a layer):
    ``sqrt(sum ||W - W0||^2) / sqrt(sum ||W0||^2)`` over the group's finite members."""
    d, b = np.asarray(diff, dtype=np.float64), np.asarray(base, dtype=np.float64)
    ok = np.isfinite(d) & np.isfinite(b)
    keys, inv = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    num = np.sqrt(np.bincount(inv[ok], weights=d[ok] ** 2, minlength=len(keys)))
    den = np.sqrt(np.bincount(inv[ok], weights=b[ok] ** 2, minlength=len(keys)))
    return {str(k): ratio_of_norms(float(n), float(m)) for k, n, m in zip(keys, num, den, strict=True)}


def layer_key(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric component
    (``bert.encoder.layer.5.attention.self.query.weight`` -> ``bert.encoder.layer.5``), else its
    module (the name without the last component)."""
    m = _INDEX.search(name)
    return name[:m.end()] if m else name.rsplit(".", 1)[0]
