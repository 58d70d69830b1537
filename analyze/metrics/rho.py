"""Grad-to-weight ratio rho on norms already computed, and its §11 verdict.

numpy only (no torch): the report path that is served from the cache computes rho from the
logged gradient norms and the spectral table's Frobenius norms without importing torch.
`analyze.metrics.gradients` re-exports both for the tensor-level functions beside them.
"""
from __future__ import annotations

import numpy as np

__all__ = ["classify_rho", "classify_rhos", "grad_to_weight_ratios"]


def grad_to_weight_ratios(grad_norm: np.ndarray, weight_norm: np.ndarray) -> np.ndarray:
    """rho_l = ||G_l||_F / ||W_l||_F (§11) for arrays of norms already computed (the logger's
    per-tensor gradient norms, the checkpoint's Frobenius norms); NaN where ||W_l||_F <= 0."""
    g = np.asarray(grad_norm, dtype=np.float64)
    w = np.asarray(weight_norm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w > 0, g / np.where(w > 0, w, 1.0), np.nan)


def classify_rhos(rho: np.ndarray, low: float, high: float) -> np.ndarray:
    """§11 verdict per element against the healthy band [low, high] (`AnalysisConfig.rho_low`,
    `rho_high`): "barely training" below it, "unstable" above it, else "healthy".

    Non-finite rho is "unstable" (a NaN/inf gradient is an instability, not health).
    """
    r = np.asarray(rho, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(~np.isfinite(r) | (r > high), "unstable",
                        np.where(r < low, "barely training", "healthy")).astype(object)


def classify_rho(rho: float, low: float, high: float) -> str:
    """`classify_rhos` of one value."""
    return str(classify_rhos(np.array([rho]), low, high)[0])
