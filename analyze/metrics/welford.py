"""Welford running mean / variance with Chan et al. merging (§1).

A ``RunningStats`` holds one state per element of an array (one per layer, per class, ...),
so a whole batch is folded in with one vectorised reduction (`from_batch`) followed by one
`merge`; no Python loop ever runs over samples.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RunningStats", "merge_all"]


def _as_float64(x: Any) -> np.ndarray:
    """numpy float64 copy of a numpy array, torch tensor (any device/dtype) or number."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class RunningStats:
    """Elementwise Welford state (n, mean, M2); ``n`` may differ per element.

    ``var`` is the sample variance M2 / (n - 1) (ddof = 1) and is NaN where n < 2.
    """

    n: np.ndarray     # float64 counts (float so merged weights stay exact up to 2**53)
    mean: np.ndarray  # float64
    m2: np.ndarray    # float64, sum of squared deviations from the mean

    @classmethod
    def empty(cls, shape: tuple[int, ...] = ()) -> RunningStats:
        """The identity of `merge`: n = 0 everywhere."""
        z = np.zeros(shape, dtype=np.float64)
        return cls(z, z.copy(), z.copy())

    @classmethod
    def from_batch(cls, x: Any, axis: int = 0) -> RunningStats:
        """State of a whole batch in one vectorised reduction over ``axis`` (numpy or torch).

        The batch mean is computed first and M2 as the sum of squared deviations from it
        (two-pass), which is exact to rounding even for data like 1e9 + N(0, 1).
        """
        a = _as_float64(x)
        a = np.moveaxis(a, axis, 0)
        count = a.shape[0]
        shape = a.shape[1:]
        if count == 0:
            return cls.empty(shape)
        mean = a.mean(axis=0)
        m2 = ((a - mean) ** 2).sum(axis=0)
        return cls(np.full(shape, float(count)), mean, m2)

    def update(self, x: Any) -> RunningStats:
        """Fold in one sample (elementwise), exactly the §1 single-sample update."""
        x = _as_float64(x)
        n = self.n + 1.0
        d = x - self.mean
        mean = self.mean + d / n
        m2 = self.m2 + d * (x - mean)  # uses the updated mean
        return RunningStats(n, mean, m2)

    def merge(self, other: RunningStats) -> RunningStats:
        """Chan, Golub & LeVeque (1979) parallel combination; n = 0 is the identity."""
        n = self.n + other.n
        safe_n = np.where(n > 0, n, 1.0)
        d = other.mean - self.mean
        mean = np.where(n > 0, self.mean + d * (other.n / safe_n), 0.0)
        m2 = self.m2 + other.m2 + d * d * (self.n * other.n / safe_n)
        # An empty side contributes d**2 * 0 = 0 unless d is non-finite; keep identity exact.
        m2 = np.where(self.n == 0, other.m2, np.where(other.n == 0, self.m2, m2))
        mean = np.where(self.n == 0, other.mean, np.where(other.n == 0, self.mean, mean))
        return RunningStats(n, mean, m2)

    @property
    def var(self) -> np.ndarray:
        """Sample variance (ddof = 1); NaN where n < 2."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n >= 2, self.m2 / np.maximum(self.n - 1.0, 1.0), np.nan)

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation sqrt(var); NaN where n < 2."""
        return np.sqrt(self.var)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the element grid the state covers."""
        return self.mean.shape


def merge_all(states: Iterable[RunningStats]) -> RunningStats:
    """Merge many states left to right; an empty iterable gives a scalar empty state."""
    out: RunningStats | None = None
    for s in states:
        out = s if out is None else out.merge(s)
    return RunningStats.empty() if out is None else out
