"""The audit's static rules over per-tensor figures (`analyze.pipeline.audit.TensorHealth`):
which axis of a weight holds the units (its storage layout), constant rows and columns named
by it (``zero_rows_cols``), and norms far from their family's median (``spectral_outlier``,
``norm_outlier``). The math is `analyze.metrics.static`; thresholds are `AnalysisConfig` fields
(docs/metrics/static-checks.md).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyze.config import AnalysisConfig
from analyze.metrics.static import family_key, family_medians, outlier_side
from analyze.pipeline.tables import Finding, Severity
from loaders.errors import TrainauditError
from loaders.lines import read_json

if TYPE_CHECKING:
    from analyze.pipeline.audit import TensorHealth

__all__ = ["family_findings", "layouts", "line_findings", "model_config"]

# Storage layouts: which axis of a 2-D weight holds the units (docs/metrics/static-checks.md).
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")   # Hugging Face models storing Conv1D [in, out]
_CONV1D_NAME = re.compile(r"(^|\.)(c_attn|q_attn|c_proj|c_fc)\.weight$")
_EMBED_NAME = re.compile(r"(^|\.)(wte|wpe|shared|[a-z_]*embed[a-z_]*)(\.weight)?$")
# (axis word, what the lines are, what an all-zero line means) per layout and axis
_AXES: dict[str | None, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "linear": (("rows", "output units, nn.Linear storage [out, in]", "dead units (no incoming weights)"),
               ("columns", "inputs, nn.Linear storage [out, in]", "unused inputs (no unit reads them)")),
    "conv1d": (("rows", "inputs, Conv1D storage [in, out]", "unused inputs (no unit reads them)"),
               ("columns", "output units, Conv1D storage [in, out]", "dead units (no incoming weights)")),
    "embedding": (("rows", "embedding vectors, one per token or position",
                   "all-zero embeddings (a padding row is zero by design)"),
                  ("columns", "embedding dimensions", "unused dimensions")),
    "conv": (("rows", "output channels", "dead filters (no incoming weights)"),
             ("columns", "input channel x kernel position", "unused input positions")),
    None: (("rows", "dim 0", "all zero"), ("columns", "the other dims flattened", "all zero")),
}
MAX_CONFIG_JSON = 1 << 20


def model_config(p: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder (or beside a weights file), {} when absent or unreadable."""
    folder = p if p.is_dir() else p.parent
    q = folder / "config.json"
    if not q.is_file():
        return {}
    try:
        data = read_json(q, folder, max_bytes=MAX_CONFIG_JSON)
    except TrainauditError:
        return {}
    return data if isinstance(data, dict) else {}


def layouts(p: Path, health: Sequence[TensorHealth]) -> tuple[dict[str, str | None], str]:
    """Per tensor: "linear", "conv1d", "embedding", "conv" or None (unknown), and where the Conv1D
    decision came from. GPT-2's fused ``c_attn`` tells the storage by its shape ([d, 3d] is Conv1D,
    [3d, d] nn.Linear as in nanoGPT); without it, ``config.json``'s ``model_type`` decides."""
    conv1d: bool | None = None
    source = "shape of c_attn"
    for h in health:
        if h.name.endswith("c_attn.weight") and len(h.shape) == 2:
            if h.shape[1] == 3 * h.shape[0]:
                conv1d = True
            elif h.shape[0] == 3 * h.shape[1]:
                conv1d = False
            if conv1d is not None:
                break
    if conv1d is None:
        conv1d = str(model_config(p).get("model_type", "")) in _CONV1D_MODEL_TYPES
        source = "config.json model_type"
    roles: dict[str, str | None] = {}
    for h in health:
        role: str | None = None
        if len(h.shape) == 2 and _EMBED_NAME.search(h.name):
            role = "embedding"
        elif len(h.shape) == 2 and conv1d and _CONV1D_NAME.search(h.name):
            role = "conv1d"
        elif len(h.shape) == 2 and h.name.endswith(".weight"):
            role = "linear"
        elif len(h.shape) >= 3 and h.name.endswith(".weight"):
            role = "conv"
        roles[h.name] = role
    return roles, source


def line_findings(h: TensorHealth, role: str | None, step: int | None, cfg: AnalysisConfig) -> list[Finding]:
    """``zero_rows_cols``: all-zero or constant rows / columns of one matrix, named by its layout."""
    out: list[Finding] = []
    for axis, (zero, const, first) in enumerate(((h.zero_rows, h.const_rows, h.first_rows),
                                                 (h.zero_cols, h.const_cols, h.first_cols))):
        if zero < 0 or zero + const == 0:
            continue
        word, what, meaning = _AXES[role][axis]
        n_lines = h.shape[0] if axis == 0 else h.numel // h.shape[0]
        allowed = cfg.embedding_zero_rows_ok if role == "embedding" and axis == 0 else 0
        severity = Severity.INFO if const == 0 and zero <= allowed else Severity.WARNING
        parts = []
        if zero:
            parts.append(f"{zero:,} of {n_lines:,} {word} ({what}) are all zero: {meaning}")
        if const:
            lead = f"{const:,} more" if zero else f"{const:,} of {n_lines:,} {word} ({what})"
            parts.append(f"{lead} are constant (every entry equal, not zero)")
        out.append(Finding(severity, "zero_rows_cols",
                           f"{h.name} {list(h.shape)}: {'; '.join(parts)} (at index "
                           f"{', '.join(map(str, first))}{', ...' if zero + const > len(first) else ''}).",
                           step=step, tensor=h.name, value=float(zero + const), threshold=float(allowed),
                           metric=f"constant_{word}"))
    return out


def family_findings(health: Sequence[TensorHealth], step: int | None, cfg: AnalysisConfig) -> list[Finding]:
    """``spectral_outlier`` / ``norm_outlier``: sigma_1 or ||W||_F outside [median/k, k*median] of
    its family (same name but the layer index, same shape)."""
    mats = [h for h in health if len(h.shape) >= 2 and h.skip_reason is None]
    fams = [f"{family_key(h.name)} {list(h.shape)}" for h in mats]
    out: list[Finding] = []
    for code, attr, label, k, field in (
            ("spectral_outlier", "sigma", "spectral norm", cfg.spectral_outlier_ratio, "spectral_outlier_ratio"),
            ("norm_outlier", "fro_norm", "Frobenius norm", cfg.norm_outlier_ratio, "norm_outlier_ratio")):
        med, ratio, size = family_medians([getattr(h, attr) for h in mats], fams, cfg.family_min_size)
        for i, h in enumerate(mats):
            side = outlier_side(float(ratio[i]), k)
            if side == 0:
                continue
            bound = k if side > 0 else 1.0 / k
            out.append(Finding(
                Severity.WARNING, code,
                f"{h.name}: {label} {getattr(h, attr):.4g} is {ratio[i]:.3g}x the median {med[i]:.4g} of its family "
                f"{fams[i]} ({int(size[i])} tensors); the rule flags a ratio above {k:g} or below 1/{k:g} "
                f"(AnalysisConfig.{field}).", step=step, tensor=h.name, value=float(ratio[i]), threshold=bound,
                metric=f"{attr}_ratio_to_family_median"))
    return out
