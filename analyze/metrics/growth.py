"""Spectral-norm growth over a run (§4, §12): the one definition, read by the
findings and by the comparison page, held against one threshold (`AnalysisConfig.spectral_growth`).

Definition: per weight matrix, sigma_1 at the last analysed checkpoint divided by sigma_1 at the
reference checkpoint, the one nearest the middle of the run (half the last step); with three or
more checkpoints the first and the last are never the reference, with two it is the first.
Growth is measured over the second half because from initialisation every norm grows, which
says nothing; late growth of sigma_1 is what precedes instability (§12, attention-logit growth).
sigma_1 is the exact value where exact SVD ran, else the default estimate; checkpoints where a
matrix is non-finite, and matrices with sigma_1 <= 0 at the reference, are left out.

Apart from `analyze.metrics.spectral` because that module imports torch, which a report served
from the cache never needs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["SpectralGrowth", "growth_reference_step", "spectral_growth"]


@dataclass(frozen=True, slots=True)
class SpectralGrowth:
    """sigma_1(last_step) / sigma_1(ref_step) per matrix (Series indexed by tensor name)."""

    ref_step: int
    last_step: int
    sigma_ref: pd.Series
    sigma_last: pd.Series
    ratio: pd.Series          # matrices finite at both steps with sigma_ref > 0, in table order

    def flagged(self, threshold: float) -> pd.Series:
        """The ratios above `threshold`, largest first (the rule of `AnalysisConfig.spectral_growth`)."""
        return self.ratio[self.ratio > threshold].sort_values(ascending=False)


def growth_reference_step(steps: Sequence[int]) -> int:
    """The checkpoint growth is measured from: nearest half the last step, excluding the first and
    the last when there are three or more (the earlier one on a tie). `steps` sorted, >= 2."""
    return min(list(steps[1:-1]) or list(steps[:1]), key=lambda s: abs(s - steps[-1] / 2))


def spectral_growth(spectral: pd.DataFrame) -> SpectralGrowth | None:
    """Growth of sigma_1 per matrix from the spectral table (columns step, tensor, finite,
    sigma_exact, sigma_est); None with fewer than two checkpoints holding a finite matrix."""
    if spectral.empty:
        return None
    ok = spectral[spectral["finite"].astype(bool)]
    if ok.empty:
        return None
    exact = pd.to_numeric(ok["sigma_exact"], errors="coerce").astype(float)
    est = pd.to_numeric(ok["sigma_est"], errors="coerce").astype(float)
    sigma = pd.Series(np.where(np.isfinite(exact), exact, est), index=ok.index)
    steps = sorted(int(s) for s in ok["step"].unique())
    if len(steps) < 2:
        return None
    ref, last = growth_reference_step(steps), steps[-1]
    a = sigma[ok["step"] == ref].set_axis(ok.loc[ok["step"] == ref, "tensor"])
    b = sigma[ok["step"] == last].set_axis(ok.loc[ok["step"] == last, "tensor"])
    both = pd.concat({"a": a, "b": b}, axis=1).dropna()
    ratio = (both["b"] / both["a"]).where(both["a"] > 0).astype(float).dropna()
    ratio.index.name = None
    return SpectralGrowth(ref, last, a, b, ratio)
