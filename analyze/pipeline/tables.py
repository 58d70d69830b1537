"""Column vocabulary of the analysis tables, the Finding type, and summary.json (format 1).

Every table the pipeline returns (and writes as `tables/<name>.csv`) has exactly the columns
listed in TABLE_COLUMNS, in that order. `reports` reads these names; it imports nothing else
from `analyze`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "TABLE_COLUMNS", "SPECTRAL_COLUMNS", "Severity", "Finding", "SUMMARY_FORMAT_VERSION",
    "build_summary", "validate_summary", "summary_schema", "SUMMARY_SCHEMA", "finite_or_none", "json_safe",
    "finding_counts",
]

SPECTRAL_COLUMNS = (
    "step", "tensor", "shape", "method", "sigma_est", "err_bound", "sigma_power", "sigma_exact",
    "sigma2_exact", "rel_err", "power_rel_err", "iterations", "power_iterations", "warm_start",
    "power_warm_start", "power_converged", "sigma_ratio", "stable_rank", "frobenius", "finite", "bound_held",
)

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    # training series from the logs (loss, grad_norm, lr) with the spike detector's flags (§2, §9)
    "train": ("step", "series", "value", "spike", "spike_kind"),
    # every validation series (§7)
    "evals": ("step", "series", "loss"),
    # the §10 alignment: per evaluation of the chosen validation series
    "overfitting": ("step", "val_series", "val_loss", "train_loss", "gap", "gap_smoothed", "gl"),
    # spike events of the loss and grad-norm series (§9)
    # height_mad in MAD units, (L - m) / max(MAD, floor); height_sigma the same in robust sigmas (/ 1.4826)
    "spikes": ("series", "kind", "first_step", "peak_step", "height_mad", "height_sigma", "length"),
    # per checkpoint x 2-D tensor: both estimators and the exact value (§4, §12)
    "spectral": SPECTRAL_COLUMNS,
    # per checkpoint x tensor: ||W_j - W_{j-1}||_F / ||W_{j-1}||_F, and per step elapsed (§11, §12)
    "update_ratio": ("step", "prev_step", "tensor", "update_ratio", "update_ratio_per_step"),
    # per checkpoint x block: mean |A| Welford over eval batches (§3)
    "activations": ("step", "layer", "mean_abs", "std", "n_batches"),
    # per checkpoint x FFN layer x unit: activation frequency f_j, share of tokens with |H| >= eps (§5)
    "activation_frequency": ("step", "layer", "unit", "f_j"),
    # per checkpoint x FFN layer (§5)
    "dead_neurons": ("step", "layer", "d_ff", "dead_count", "dead_fraction", "near_dead_count",
                     "n_tokens", "eps", "activation", "activation_sparsity"),
    # per checkpoint x layer x head (§6)
    "attention": ("step", "layer", "head", "mean_entropy", "mean_norm_entropy", "dead", "dead_ge4",
                  "share_2_3_keys", "sink_mass", "offset_mode", "offset_share", "label"),
    # per checkpoint x layer: max attention logit (§12)
    "attention_logits": ("step", "layer", "max_logit"),
    # per checkpoint: token-weighted loss on the stored eval set (§7) and mean log Z (§12)
    "eval_set": ("step", "loss", "n_tokens", "n_examples", "mean_log_z"),
    # per checkpoint x tensor: rho (§11); source "training" (logged per-tensor gradient norms) or
    # "evaluation batch" (one backward pass, the fallback for runs without them)
    "grad_ratio": ("step", "tensor", "rho", "grad_norm", "weight_norm", "status", "source"),
    # per-class losses: training windows, logged evaluations and checkpoint re-runs (§8)
    "class_losses": ("source", "step", "step_start", "cls", "count", "mean", "std"),
    # tau = L_a - L_b with its Welch SE (§8)
    "tau": ("source", "step", "class_a", "class_b", "tau", "se", "n_a", "n_b"),
    # each class's gap to the all-class mean (§8, generalised)
    "class_gaps": ("source", "step", "cls", "gap_to_mean"),
}

SUMMARY_FORMAT_VERSION = 1


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclass(frozen=True, slots=True)
class Finding:
    """One health finding: what, where (tensor/layer), when (step), the value and its threshold.

    `message` is one plain sentence a person can act on; `metric` names the quantity. `n` is how
    many findings the row stands for: 1, or the count of a capped kind's "N more" row.
    """

    severity: str
    code: str
    message: str
    step: int | None = None
    tensor: str | None = None
    value: float | None = None
    threshold: float | None = None
    metric: str | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if self.severity not in {s.value for s in Severity}:
            raise ValueError(f"severity must be info, warning or error, not {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {"severity": str(self.severity), "code": self.code, "message": self.message,
                "step": None if self.step is None else int(self.step), "tensor": self.tensor,
                "value": json_safe(self.value), "threshold": json_safe(self.threshold),
                "metric": self.metric, "n": int(self.n)}


def finding_counts(findings: Iterable[Finding]) -> dict[str, int]:
    """Findings per severity, a capped kind's "N more" row counting as the N it stands for."""
    out = {s.value: 0 for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)}
    for f in findings:
        out[str(f.severity)] += int(f.n)
    return out


def finite_or_none(x: Any) -> float | None:
    """x as a float, or None when it is not a number or not finite (a cell shown as "-")."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def json_safe(x: Any) -> Any:
    """Plain JSON values: NaN/inf become null, numpy scalars become Python numbers."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (int, float)):
        x = x.item()
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x)


def _int_or_none(x: Any) -> int | None:
    if x is None:
        return None
    try:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return int(x)
    except (TypeError, ValueError):
        return None


def build_summary(*, run: Mapping[str, Any], overfitting: Mapping[str, Any], spikes: Iterable[Mapping[str, Any]],
                  tau: Mapping[str, Any] | None, findings: Sequence[Finding], notes: Sequence[str],
                  spike_score: Mapping[str, float | None] | None = None,
                  checkpoint_to_keep: Mapping[str, int | None] | None = None,
                  not_analysed: Sequence[str] = ()) -> dict[str, Any]:
    """The summary.json object (format_version 1; contract in docs/summary-json.md, schema in
    analyze/pipeline/summary.schema.json)."""
    spike_score = spike_score or {}
    keep = checkpoint_to_keep or {}
    return json_safe({
        "format_version": SUMMARY_FORMAT_VERSION,
        "run": {"name": str(run["name"]), "source_format": str(run["source_format"]),
                "steps_logged": int(run["steps_logged"]),
                "checkpoints": [int(s) for s in run["checkpoints"]]},
        "overfitting": {"verdict": overfitting.get("verdict"),
                        "divergence_step": _int_or_none(overfitting.get("divergence_step")),
                        "val_min_step": _int_or_none(overfitting.get("val_min_step")),
                        "gl5_step": _int_or_none(overfitting.get("gl5_step")),
                        "val_series": overfitting.get("val_series"),
                        "final_gl": json_safe(overfitting.get("final_gl")),
                        "memorisation": overfitting.get("memorisation")},
        "spikes": [{"series": s["series"], "kind": s["kind"], "first_step": int(s["first_step"]),
                    "peak_step": int(s["peak_step"]), "height_mad": json_safe(s.get("height_mad")),
                    "height_sigma": json_safe(s.get("height_sigma")),
                    "length": int(s["length"])} for s in spikes],
        "spike_score": {k: json_safe(spike_score.get(k)) for k in ("loss", "grad_norm")},
        "tau": None if tau is None else {
            "class_a": str(tau["class_a"]), "class_b": str(tau["class_b"]),
            "final": json_safe(tau.get("final")), "max": json_safe(tau.get("max")),
            "max_step": _int_or_none(tau.get("max_step"))},
        "checkpoint_to_keep": {k: _int_or_none(keep.get(k)) for k in ("best_val_step", "last_stable_step")},
        "finding_counts": finding_counts(findings),
        "findings": [f.to_json() for f in findings],
        "notes": [str(n) for n in notes],
        "not_analysed": [str(n) for n in not_analysed],
    })


SUMMARY_SCHEMA = "summary.schema.json"  # package data of analyze.pipeline (docs/summary-json.md)


def summary_schema() -> dict[str, Any]:
    """The JSON Schema of summary.json, as shipped in the package."""
    import json
    from importlib.resources import files

    return json.loads(files("analyze.pipeline").joinpath(SUMMARY_SCHEMA).read_text(encoding="utf-8"))


def validate_summary(obj: Any) -> list[str]:
    """Problems of a summary.json object against the shipped schema ([] when valid), one line each
    ("<json path>: <message>"). Needs the `jsonschema` package (the `test` extra); the analysis
    itself does not call it."""
    import jsonschema

    schema = summary_schema()
    validator = jsonschema.Draft202012Validator(schema, format_checker=None)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{e.json_path}: {e.message}" for e in errors]
