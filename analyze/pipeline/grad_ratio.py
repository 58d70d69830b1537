"""The grad_ratio table: rho per tensor and checkpoint (§11), from training gradients when the
run logged them, else from the probe's backward pass on an evaluation batch.

Training rho joins the logger's per-tensor gradient norms (`Run.grad_norms`, grad_norms.csv) with
the Frobenius norm of the same tensor in the checkpoint saved at the same step (the spectral
table's `frobenius`, already computed: no tensor is read again). The evaluation-batch rows are
the fallback for runs without logged norms; `source` says which one a row is.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from analyze.config import AnalysisConfig
from analyze.metrics.rho import classify_rhos, grad_to_weight_ratios  # numpy only: no torch on the cached path
from analyze.pipeline.tables import TABLE_COLUMNS

__all__ = ["TRAINING", "EVAL_BATCH", "training_grad_ratio", "grad_ratio_table"]

TRAINING = "training"
EVAL_BATCH = "evaluation batch"


def training_grad_ratio(grad_norms: pd.DataFrame, spectral: pd.DataFrame, cfg: AnalysisConfig) -> pd.DataFrame:
    """rho = logged ||G||_F / ||W||_F of the checkpoint at the same step, per (step, tensor) found
    in both (§11); tensors whose weights are not finite have no weight norm and no row."""
    cols = list(TABLE_COLUMNS["grad_ratio"])
    if grad_norms.empty or spectral.empty or "frobenius" not in spectral:
        return pd.DataFrame(columns=cols)
    w = spectral[spectral["finite"].astype(bool)][["step", "tensor", "frobenius"]]
    w = w.assign(step=w["step"].astype("int64"), tensor=w["tensor"].astype(str))
    g = grad_norms[["step", "tensor", "grad_norm"]].assign(step=grad_norms["step"].astype("int64"),
                                                          tensor=grad_norms["tensor"].astype(str))
    both = g.merge(w, on=["step", "tensor"], how="inner").rename(columns={"frobenius": "weight_norm"})
    if both.empty:
        return pd.DataFrame(columns=cols)
    rho = grad_to_weight_ratios(both["grad_norm"].to_numpy(), both["weight_norm"].to_numpy(dtype=float))
    out = both.assign(rho=rho, status=classify_rhos(rho, cfg.rho_low, cfg.rho_high), source=TRAINING)
    return out.sort_values(["step", "tensor"], kind="stable").reset_index(drop=True)[cols]


def grad_ratio_table(grad_norms: pd.DataFrame, spectral: pd.DataFrame, probe_rows: list[dict[str, Any]],
                     cfg: AnalysisConfig) -> tuple[pd.DataFrame, list[str]]:
    """The grad_ratio table and notes: training rho when the run logged per-tensor gradient norms
    at a checkpoint step, else the probe's evaluation-batch rows (labelled so)."""
    cols = list(TABLE_COLUMNS["grad_ratio"])
    notes: list[str] = []
    train = training_grad_ratio(grad_norms, spectral, cfg)
    if len(train):
        steps = sorted(set(train["step"]))
        notes.append(f"grad-to-weight ratio (§11) from the gradient norms logged in training at "
                     f"{len(steps)} checkpoint step(s) ({steps[0]}..{steps[-1]}); the evaluation-batch "
                     "estimate is not used")
        return train, notes
    if len(grad_norms):
        notes.append("grad_norms.csv holds per-tensor gradient norms, but none at a checkpoint step with a "
                      "tensor of the same name, so rho is the fallback from one backward pass on an "
                      "evaluation batch")
    if not probe_rows:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in cols}), notes
    fallback = pd.DataFrame.from_records(probe_rows)
    fallback["source"] = EVAL_BATCH
    return fallback.reindex(columns=cols), notes
