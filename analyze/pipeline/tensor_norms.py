"""Norms fused into the read: the reducer that `loaders.tensor_reader.TensorStream` feeds with each
float32 block of a tensor while the block is in cache, so the analysis makes no extra pass over
a large tensor for its extremes, its finiteness or its Frobenius norm (§12).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analyze.metrics.gradients import sum_of_squares

__all__ = ["BlockNorms", "FiniteCheck", "FusedNorms"]


@dataclass(frozen=True, slots=True)
class BlockNorms:
    """min, max and sum of squares of one tensor (NaN / inf when it has such an entry)."""

    lo: float
    hi: float
    sum_sq: float

    @property
    def finite(self) -> bool:
        """True iff every entry is finite (finite extremes and a finite sum of squares)."""
        return math.isfinite(self.lo) and math.isfinite(self.hi) and math.isfinite(self.sum_sq)


class FusedNorms:
    """`loaders.tensor_reader.BlockReducer`: extremes by ``torch.aminmax`` and ||W||_F^2 by
    `analyze.metrics.gradients.sum_of_squares` per block, added up (float64 on the host)."""

    def __init__(self) -> None:
        self._ext: list[torch.Tensor] = []
        self._ss = 0.0

    def add(self, block: torch.Tensor) -> None:
        if block.numel() == 0:
            return
        lo, hi = torch.aminmax(block)
        self._ext.append(torch.stack([lo, hi]))
        self._ss += sum_of_squares(block)

    def result(self) -> BlockNorms:
        if not self._ext:
            return BlockNorms(math.nan, math.nan, 0.0)
        ext = torch.stack(self._ext)
        if not bool(torch.isfinite(ext).all()):
            return BlockNorms(math.nan, math.nan, self._ss)  # a NaN block: the caller counts them
        return BlockNorms(float(ext[:, 0].min()), float(ext[:, 1].max()), self._ss)


class FiniteCheck:
    """`loaders.tensor_reader.BlockReducer` of finiteness alone, for readers that need no norms
    (the spectral table): one sum per block (NaN and inf propagate); only a block whose sum is not
    finite (a NaN, an inf or a float32 overflow) pays for the elementwise check. ``result()`` is
    the reducer itself, with ``finite``."""

    def __init__(self) -> None:
        self.finite = True

    def add(self, block: torch.Tensor) -> None:
        if self.finite and not bool(torch.isfinite(block.sum())):
            self.finite = bool(torch.isfinite(block).all())

    def result(self) -> FiniteCheck:
        return self
