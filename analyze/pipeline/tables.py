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
    "build_summary", "validate_summary", "finite_or_none", "json_safe",
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
    "spikes": ("series", "kind", "first_step", "peak_step", "height_mad", "length"),
    # per checkpoint x 2-D tensor: both estimators and the exact value (§4, §12)
    "spectral": SPECTRAL_COLUMNS,
    # per checkpoint x tensor: ||W_j - W_{j-1}||_F / ||W_{j-1}||_F, and per step elapsed (§11, §12)
    "update_ratio": ("step", "prev_step", "tensor", "update_ratio", "update_ratio_per_step"),
    # per checkpoint x block: mean |A| Welford over eval batches (§3)
    "activations": ("step", "layer", "mean_abs", "std", "n_batches"),
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

    `message` is one plain sentence a person can act on; `metric` names the quantity.
    """

    severity: str
    code: str
    message: str
    step: int | None = None
    tensor: str | None = None
    value: float | None = None
    threshold: float | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in {s.value for s in Severity}:
            raise ValueError(f"severity must be info, warning or error, not {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {"severity": str(self.severity), "code": self.code, "message": self.message,
                "step": None if self.step is None else int(self.step), "tensor": self.tensor,
                "value": json_safe(self.value), "threshold": json_safe(self.threshold),
                "metric": self.metric}


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
                  not_analysed: Sequence[str] = ()) -> dict[str, Any]:
    """The summary.json object (format_version 1; contract in docs/summary-json.md)."""
    return json_safe({
        "format_version": SUMMARY_FORMAT_VERSION,
        "run": {"name": str(run["name"]), "source_format": str(run["source_format"]),
                "steps_logged": int(run["steps_logged"]),
                "checkpoints": [int(s) for s in run["checkpoints"]]},
        "overfitting": {"verdict": overfitting.get("verdict"),
                        "divergence_step": _int_or_none(overfitting.get("divergence_step")),
                        "val_min_step": _int_or_none(overfitting.get("val_min_step")),
                        "gl5_step": _int_or_none(overfitting.get("gl5_step")),
                        "val_series": overfitting.get("val_series")},
        "spikes": [{"series": s["series"], "kind": s["kind"], "first_step": int(s["first_step"]),
                    "peak_step": int(s["peak_step"]), "height_mad": json_safe(s.get("height_mad")),
                    "length": int(s["length"])} for s in spikes],
        "tau": None if tau is None else {
            "class_a": str(tau["class_a"]), "class_b": str(tau["class_b"]),
            "final": json_safe(tau.get("final")), "max": json_safe(tau.get("max")),
            "max_step": _int_or_none(tau.get("max_step"))},
        "findings": [f.to_json() for f in findings],
        "notes": [str(n) for n in notes],
        "not_analysed": [str(n) for n in not_analysed],
    })


def _check(problems: list[str], where: str, value: Any, kinds: tuple[type, ...], *, nullable: bool = False,
           choices: Sequence[Any] | None = None) -> None:
    if value is None:
        if not nullable:
            problems.append(f"{where}: null not allowed")
        return
    if isinstance(value, bool) and bool not in kinds:
        problems.append(f"{where}: expected {'/'.join(k.__name__ for k in kinds)}, got bool")
        return
    if not isinstance(value, kinds):
        problems.append(f"{where}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: non-finite number")
    if choices is not None and value not in choices:
        problems.append(f"{where}: {value!r} not one of {list(choices)}")


def validate_summary(obj: Any) -> list[str]:
    """Problems of a summary.json object against the format_version 1 shape ([] when valid)."""
    p: list[str] = []
    if not isinstance(obj, dict):
        return ["summary: not an object"]
    need = ("format_version", "run", "overfitting", "spikes", "tau", "findings", "notes")
    p += [f"summary: missing key {k!r}" for k in need if k not in obj]
    if p:
        return p
    if obj["format_version"] != SUMMARY_FORMAT_VERSION:
        p.append(f"format_version: expected 1, got {obj['format_version']!r}")
    run = obj["run"]
    if not isinstance(run, dict):
        p.append("run: not an object")
    else:
        for k, kinds in (("name", (str,)), ("source_format", (str,)), ("steps_logged", (int,)),
                         ("checkpoints", (list,))):
            if k not in run:
                p.append(f"run: missing key {k!r}")
            else:
                _check(p, f"run.{k}", run[k], kinds)
        for i, s in enumerate(run.get("checkpoints") or []):
            _check(p, f"run.checkpoints[{i}]", s, (int,))
    of = obj["overfitting"]
    if not isinstance(of, dict):
        p.append("overfitting: not an object")
    else:
        for k in ("verdict", "divergence_step", "val_min_step", "gl5_step", "val_series"):
            if k not in of:
                p.append(f"overfitting: missing key {k!r}")
        _check(p, "overfitting.verdict", of.get("verdict"), (str,), nullable=True,
               choices=("overfitting", "unstable", "none"))
        for k in ("divergence_step", "val_min_step", "gl5_step"):
            _check(p, f"overfitting.{k}", of.get(k), (int,), nullable=True)
        _check(p, "overfitting.val_series", of.get("val_series"), (str,), nullable=True)
    if not isinstance(obj["spikes"], list):
        p.append("spikes: not a list")
    else:
        for i, s in enumerate(obj["spikes"]):
            w = f"spikes[{i}]"
            if not isinstance(s, dict):
                p.append(f"{w}: not an object")
                continue
            for k in ("series", "kind", "first_step", "peak_step", "height_mad", "length"):
                if k not in s:
                    p.append(f"{w}: missing key {k!r}")
            _check(p, f"{w}.series", s.get("series"), (str,), choices=("loss", "grad_norm"))
            _check(p, f"{w}.kind", s.get("kind"), (str,), choices=("spike", "non-finite"))
            _check(p, f"{w}.first_step", s.get("first_step"), (int,))
            _check(p, f"{w}.peak_step", s.get("peak_step"), (int,))
            _check(p, f"{w}.height_mad", s.get("height_mad"), (int, float), nullable=True)
            _check(p, f"{w}.length", s.get("length"), (int,))
    tau = obj["tau"]
    if tau is not None:
        if not isinstance(tau, dict):
            p.append("tau: not an object or null")
        else:
            for k in ("class_a", "class_b", "final", "max", "max_step"):
                if k not in tau:
                    p.append(f"tau: missing key {k!r}")
            _check(p, "tau.class_a", tau.get("class_a"), (str,))
            _check(p, "tau.class_b", tau.get("class_b"), (str,))
            _check(p, "tau.final", tau.get("final"), (int, float), nullable=True)
            _check(p, "tau.max", tau.get("max"), (int, float), nullable=True)
            _check(p, "tau.max_step", tau.get("max_step"), (int,), nullable=True)
    if not isinstance(obj["findings"], list):
        p.append("findings: not a list")
    else:
        for i, f in enumerate(obj["findings"]):
            w = f"findings[{i}]"
            if not isinstance(f, dict):
                p.append(f"{w}: not an object")
                continue
            for k in ("severity", "code", "message", "step", "tensor", "value"):
                if k not in f:
                    p.append(f"{w}: missing key {k!r}")
            _check(p, f"{w}.severity", f.get("severity"), (str,), choices=("info", "warning", "error"))
            _check(p, f"{w}.code", f.get("code"), (str,))
            _check(p, f"{w}.message", f.get("message"), (str,))
            _check(p, f"{w}.step", f.get("step"), (int,), nullable=True)
            _check(p, f"{w}.tensor", f.get("tensor"), (str,), nullable=True)
            _check(p, f"{w}.value", f.get("value"), (int, float), nullable=True)
    if not isinstance(obj["notes"], list):
        p.append("notes: not a list")
    else:
        for i, n in enumerate(obj["notes"]):
            _check(p, f"notes[{i}]", n, (str,))
    return p
