"""One checkpoint's health and its spectral table: the library behind `audit` and `spectral`.

``audit_checkpoint`` visits the tensors one at a time (``loaders.checkpoints.iter_tensors``)
and states, per tensor, what a CI gate needs: non-finite values (error), exploding magnitudes
(warning), all-zero or constant rows and columns named by the storage layout (dead units,
unused inputs; warning), spectral or Frobenius norms far from their family's median across
layers (warning), empty tensors (info), and for every matrix the spectral norm (§4) and stable
rank (§12) as info. With a base checkpoint it adds what changed (`analyze.pipeline.baseline`).
Integer and boolean tensors (step counters, position ids) are buffers, never weights.
``spectral_rows`` is the validation table of §4 for one checkpoint: the default estimator with
its error bound, the sheet's power iteration and, on request, the exact value
(`analyze.metrics.spectral.spectral_validation`, the row the report's table uses too).

Every threshold is an ``AnalysisConfig`` field (docs/metrics/static-checks.md). Results are
deterministic: seeded estimators, findings in checkpoint order, no timings.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from analyze.config import AnalysisConfig
from analyze.metrics.gradients import sum_of_squares
from analyze.metrics.static import LineCounts, count_constant_lines
from analyze.metrics.spectral import (
    EXACT_MAX_DIM,
    as_matrix,
    estimate_spectral_norm,
    estimate_spectral_norm_batched,
    estimate_with_power_iteration,
    exact_top_singular_values,
    matrix_skip_reason,
    spectral_validation,
    stable_rank,
)
from analyze.pipeline.audit_static import family_findings, layouts, line_findings
from analyze.pipeline.runners import one_thread
from analyze.pipeline.tables import SEVERITY_ORDER, Finding, Severity
from analyze.pipeline.tensor_norms import BlockNorms, FiniteCheck, FusedNorms
from loaders.checkpoint_files import skipped_side_files, step_from_name
from loaders.checkpoints import checkpoint_info, iter_tensors, step_metadata
from loaders.errors import DataWarnings, TrainauditError
from loaders.tensor_reader import TensorStream

__all__ = ["AuditResult", "SpectralRow", "TensorHealth", "audit_checkpoint", "fails", "spectral_rows",
           "SPECTRAL_JSON_KEYS", "METHODS"]

METHODS = ("auto", "lanczos", "exact")
# Small tensors (biases, norms, tiny layers) are audited in same-shape stacks: per-tensor torch
# calls cost ~0.5 ms each, so 10,000 tiny tensors took 5 s one by one (bad-inputs.md F3).
_BATCH_NUMEL = 1 << 14      # tensors up to this many elements are stacked
_BATCH_ELEMENTS = 1 << 22   # elements held pending at most (16 MB of float32)
SPECTRAL_JSON_KEYS = ("tensor", "shape", "method", "sigma_est", "err_bound", "sigma_power", "sigma_exact",
                      "rel_err", "power_rel_err", "iterations", "sigma_ratio")
_MAX_LISTED = 5


@dataclass(frozen=True, slots=True)
class TensorHealth:
    """Per-tensor figures of an audit (NaN where not defined)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nonfinite: int
    max_abs: float
    sigma: float
    err_bound: float
    stable_rank: float
    skip_reason: str | None
    fro_norm: float = math.nan
    # constant lines (all-zero, constant non-zero) per axis; -1 where not checked
    zero_rows: int = -1
    const_rows: int = -1
    zero_cols: int = -1
    const_cols: int = -1
    first_rows: tuple[int, ...] = ()
    first_cols: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditResult:
    """Findings of one checkpoint; ``error`` is set when part of it could not be read."""

    path: Path
    step: int | None
    findings: tuple[Finding, ...]
    tensors: tuple[TensorHealth, ...]
    n_params: int
    warnings: tuple[str, ...]
    error: str | None
    changes: tuple[Any, ...] = ()        # analyze.pipeline.baseline.TensorChange rows (with a base)
    baseline: Path | None = None


@dataclass(frozen=True, slots=True)
class SpectralRow:
    """One matrix of the spectral validation table (§4)."""

    tensor: str
    shape: tuple[int, ...]
    method: str
    sigma_est: float | None
    err_bound: float | None
    sigma_power: float | None
    sigma_exact: float | None
    rel_err: float | None
    power_rel_err: float | None
    iterations: int | None
    sigma_ratio: float | None

    def to_json(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x
        return {"tensor": self.tensor, "shape": list(self.shape), "method": self.method,
                "sigma_est": clean(self.sigma_est), "err_bound": clean(self.err_bound),
                "sigma_power": clean(self.sigma_power), "sigma_exact": clean(self.sigma_exact),
                "rel_err": clean(self.rel_err), "power_rel_err": clean(self.power_rel_err),
                "iterations": self.iterations, "sigma_ratio": clean(self.sigma_ratio)}


def _checkpoint_step(path: Path) -> int | None:
    try:
        meta = step_metadata(path)
    except TrainauditError:
        meta = {}
    for key in ("step", "global_step", "iter_num"):
        v = meta.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
    return step_from_name(path.name)


def _health(name: str, t: torch.Tensor, norms: BlockNorms | None = None) -> TensorHealth:
    """`norms`: extremes and sum of squares already computed while the tensor was read (fused
    into the read, `analyze.pipeline.tensor_norms`): the passes for them are skipped."""
    shape = tuple(t.shape)
    dtype = str(t.dtype).removeprefix("torch.")
    nan = math.nan
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return TensorHealth(name, shape, dtype, t.numel(), 0, nan, nan, nan, nan, matrix_skip_reason(t) or
                            f"{t.ndim}-D tensor: no spectral norm")
    x = t.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)  # bf16/fp16 (and fp8) upcast before any reduction
    lo = hi = nan
    if norms is not None and norms.finite:
        lo, hi = norms.lo, norms.hi
    elif not x.is_complex():  # one pass, no temporary: finite extremes mean every value is finite
        lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isfinite(lo) and math.isfinite(hi):
        nonfinite, max_abs = 0, max(-lo, hi)
    else:  # count them (temporaries of the tensor's size, only for a broken tensor)
        finite = torch.isfinite(x)
        nonfinite = int(x.numel() - int(finite.sum()))
        max_abs = nan
        if nonfinite < x.numel():
            max_abs = float(torch.where(finite, x.abs(), torch.zeros((), dtype=x.dtype)).max())
        del finite
    reason = matrix_skip_reason(t)
    lines = _lines(count_constant_lines(x.reshape(x.shape[0], -1))) if x.ndim >= 2 and not x.is_complex() else {}
    if reason is not None or nonfinite:
        return TensorHealth(name, shape, dtype, t.numel(), nonfinite, max_abs, nan, nan, nan,
                            reason or "non-finite values: no spectral norm", **lines)
    m = as_matrix(x)
    assert m is not None
    fused = norms is not None and norms.finite  # finite extremes: check_finite's pass is not needed
    est = estimate_spectral_norm(m, check_finite=not fused)
    fro2 = norms.sum_sq if fused else sum_of_squares(m)
    return TensorHealth(name, shape, dtype, t.numel(), 0, max_abs, est.sigma, est.err_bound,
                        stable_rank(fro2, est.sigma), None, math.sqrt(fro2), **lines)


def _lines(c: LineCounts, i: int | None = None) -> dict[str, Any]:
    """TensorHealth fields of the constant rows and columns: matrix ``i`` of a batch's counts
    (None: the counts of one matrix)."""
    at = () if i is None else (i,)
    return {"zero_rows": int(c.zero_rows[at]), "const_rows": int(c.const_rows[at]),
            "zero_cols": int(c.zero_cols[at]), "const_cols": int(c.const_cols[at]),
            "first_rows": c.first_rows[i or 0], "first_cols": c.first_cols[i or 0]}


def _batchable(t: torch.Tensor) -> bool:
    return (t.is_floating_point() and 0 < t.numel() <= _BATCH_NUMEL
            and (t.ndim < 2 or min(t.shape[0], t.numel() // t.shape[0]) <= EXACT_MAX_DIM))


def _health_batch(items: list[tuple[str, torch.Tensor]]) -> list[TensorHealth]:
    """``_health`` of same-shape, same-dtype small float tensors in one stack (same figures: the
    batched spectral estimate gives each matrix the answer it gets alone). A stack with any
    non-finite value falls back to one tensor at a time."""
    if len(items) == 1:
        return [_health(*items[0])]
    t0 = items[0][1]
    shape, dtype, numel, nan = tuple(t0.shape), str(t0.dtype).removeprefix("torch."), t0.numel(), math.nan
    x = torch.stack([t.detach() for _, t in items])
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)  # bf16/fp16 (and fp8) upcast before any reduction, as in _health
    flat = x.reshape(len(items), -1)
    if not bool(torch.isfinite(flat).all()):
        return [_health(n, t) for n, t in items]
    max_abs = flat.abs().amax(dim=1).tolist()
    reason = matrix_skip_reason(t0)
    if reason is not None:
        return [TensorHealth(n, shape, dtype, numel, 0, max_abs[i], nan, nan, nan, reason)
                for i, (n, _) in enumerate(items)]
    mats = x.reshape(len(items), shape[0], -1)
    ests = estimate_spectral_norm_batched(mats)
    fro2 = (mats.to(torch.float64) ** 2).sum(dim=(1, 2)).tolist()
    c = count_constant_lines(mats)
    return [TensorHealth(n, shape, dtype, numel, 0, max_abs[i], e.sigma, e.err_bound,
                         stable_rank(fro2[i], e.sigma), None, math.sqrt(fro2[i]), **_lines(c, i))
            for i, ((n, _), e) in enumerate(zip(items, ests, strict=True))]


def _findings(h: TensorHealth, step: int | None, cfg: AnalysisConfig) -> list[Finding]:
    out: list[Finding] = []
    if h.numel == 0:
        out.append(Finding(Severity.INFO, "empty_tensor", f"{h.name} is empty (shape {list(h.shape)}).",
                           step=step, tensor=h.name, value=0.0))
        return out
    if h.nonfinite:
        out.append(Finding(Severity.ERROR, "nonfinite_tensor",
                           f"{h.name} has {h.nonfinite:,} non-finite values (NaN or inf) of {h.numel:,}.",
                           step=step, tensor=h.name, value=float(h.nonfinite), metric="nonfinite_count"))
    if math.isfinite(h.max_abs) and h.max_abs > cfg.max_abs_warn:
        out.append(Finding(Severity.WARNING, "large_weights",
                           f"{h.name} has entries up to |w| = {h.max_abs:.3g}, above {cfg.max_abs_warn:.0e}: "
                           f"exploding weights.", step=step, tensor=h.name, value=h.max_abs,
                           threshold=cfg.max_abs_warn, metric="max_abs"))
    if math.isfinite(h.sigma):
        if h.sigma > cfg.sigma_warn:
            out.append(Finding(Severity.WARNING, "large_spectral_norm",
                               f"{h.name} has spectral norm {h.sigma:.4g}, above {cfg.sigma_warn:.0e}: the layer "
                               f"amplifies some input direction {h.sigma:.3g}-fold.", step=step, tensor=h.name,
                               value=h.sigma, threshold=cfg.sigma_warn, metric="sigma_1"))
        out.append(Finding(Severity.INFO, "spectral_norm",
                           f"{h.name} {list(h.shape)}: spectral norm {h.sigma:.6g} (relative error <= "
                           f"{h.err_bound:.1e}), stable rank {h.stable_rank:.4g}.", step=step, tensor=h.name,
                           value=h.sigma, metric="sigma_1"))
        out.append(Finding(Severity.INFO, "stable_rank",
                           f"{h.name}: stable rank ||W||_F^2 / sigma_1^2 = {h.stable_rank:.4g}.", step=step,
                           tensor=h.name, value=h.stable_rank, metric="stable_rank"))
    return out


def audit_checkpoint(path: str | os.PathLike[str], cfg: AnalysisConfig | None = None, *,
                     baseline: str | os.PathLike[str] | None = None, frozen: Sequence[str] = ()) -> AuditResult:
    """Health findings of one checkpoint (file or folder), reading one tensor at a time, against
    the thresholds of `cfg` (default: `AnalysisConfig()`).

    With ``baseline`` (another checkpoint of the same model, any storage layout) the findings
    also say what changed (`analyze.pipeline.baseline.compare_checkpoints`); ``frozen`` are
    name patterns (fnmatch) of tensors that must not have moved.

    Raises ``TrainauditError`` when nothing could be read (or the base cannot be read). A
    failure after some tensors were read (a missing shard) is returned in ``error`` with the
    findings of what was read.

    Runs on one intra-op thread, as the report's tasks: its products and reductions are
    memory-bound, and a second thread only adds its wake-ups and spinning (GPT-2-small: 3.6 -> 2.8 s
    CPU; 1.1B bf16 sharded: 14.3 -> 11.2 s CPU and less wall time, same findings).
    """
    with one_thread():
        return _audit_checkpoint(path, cfg, baseline=baseline, frozen=frozen)


def _audit_checkpoint(path: str | os.PathLike[str], cfg: AnalysisConfig | None, *,
                      baseline: str | os.PathLike[str] | None, frozen: Sequence[str]) -> AuditResult:
    cfg = cfg or AnalysisConfig()
    p = Path(path)
    warnings = DataWarnings()
    step = _checkpoint_step(p)
    error: str | None = None
    slots: list[TensorHealth | None] = []   # in checkpoint order; None until its stack is done
    pending: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[int, str, torch.Tensor]]] = {}
    held = 0

    def flush() -> None:
        nonlocal held
        for group in pending.values():
            for (i, _, _), h in zip(group, _health_batch([(n, t) for _, n, t in group]), strict=True):
                slots[i] = h
        pending.clear()
        held = 0

    stored: list[str] = []                  # the dtype each tensor was stored in (they arrive upcast)
    try:
        # one tensor at a time, read ahead, half types upcast block-wise with the norms fused in
        for item in TensorStream(p, warnings=warnings, reducer=FusedNorms):
            name, t = item.name, item.tensor
            slots.append(None)
            stored.append(item.stored_dtype)
            if _batchable(t):
                pending.setdefault((tuple(t.shape), t.dtype), []).append((len(slots) - 1, name, t))
                held += t.numel()
                if held > _BATCH_ELEMENTS:
                    flush()
            else:
                slots[-1] = _health(name, t, item.reduced)
            del t, item  # not held while the next tensor is read: peak memory is ~2 tensors (F2)
    except TrainauditError as e:
        if not slots:
            raise
        error = str(e)
    flush()
    health = [replace(h, dtype=stored[i]) for i, h in enumerate(slots) if h is not None]
    findings: list[Finding] = []
    roles, _ = layouts(p, health)
    for h in health:
        findings.extend(_findings(h, step, cfg))
        findings.extend(line_findings(h, roles.get(h.name), step, cfg))
    findings.extend(family_findings(health, step, cfg))
    changes: tuple[Any, ...] = ()
    if baseline is not None:
        from analyze.pipeline.baseline import compare_checkpoints

        rows, base_findings = compare_checkpoints(p, Path(baseline), cfg, frozen=frozen, step=step,
                                                  sigma={h.name: h.sigma for h in health})
        changes = tuple(rows)
        findings.extend(base_findings)
    skipped = [h for h in health if h.skip_reason is not None and h.numel > 0 and not h.nonfinite]
    if skipped:
        shown = ", ".join(h.name for h in skipped[:_MAX_LISTED]) + (" ..." if len(skipped) > _MAX_LISTED else "")
        findings.append(Finding(Severity.INFO, "no_spectral_norm",
                                f"{len(skipped)} tensor(s) have no spectral norm (1-D, 0-D or integer): {shown}.",
                                step=step, value=float(len(skipped))))
    n_params = sum(h.numel for h in health)
    if error is None:
        try:
            info = checkpoint_info(p)
            for a, b in info.tied:
                findings.append(Finding(Severity.INFO, "tied_weights",
                                        f"{a} and {b} share storage (counted once).", step=step, tensor=b))
            n_params = info.n_params
            if info.container_key or info.stripped_prefix:  # bad-inputs.md C4, C6: where the tensors were
                where = f"under key {info.container_key!r}" if info.container_key else "at the top level"
                strip = f"; prefix {info.stripped_prefix!r} removed from every name" if info.stripped_prefix else ""
                findings.append(Finding(Severity.INFO, "state_dict_location",
                                        f"state dict found {where}{strip}.", step=step))
        except TrainauditError:
            pass
    folder = p if p.is_dir() else None
    for name in skipped_side_files(folder) if folder is not None else []:
        findings.append(Finding(Severity.INFO, "skipped_file", f"skipped {name} (pickled object, not needed).",
                                step=step))
    for w in warnings:
        findings.append(Finding(Severity.WARNING, "data_issue", w, step=step))
    if error is not None:
        findings.append(Finding(Severity.ERROR, "unreadable", error, step=step))
    findings.sort(key=lambda f: SEVERITY_ORDER[Severity(f.severity)])
    return AuditResult(p, step, tuple(findings), tuple(health), n_params, tuple(warnings), error, changes,
                       Path(baseline) if baseline is not None else None)


def fails(result: AuditResult, fail_on: str) -> bool:
    """True when a finding at or above ``fail_on`` ("warning" | "error") exists."""
    limit = SEVERITY_ORDER[Severity(fail_on)]
    return any(SEVERITY_ORDER[Severity(f.severity)] <= limit for f in result.findings)


def _num(x: float) -> float | None:
    """None where the validation row has NaN (a method that did not run, an undefined ratio)."""
    return x if math.isfinite(x) else None


def spectral_rows(path: str | os.PathLike[str], *, exact: bool = False, method: str = "auto",
                  tol: float | None = None) -> tuple[list[SpectralRow], list[str]]:
    """Per matrix: default estimate + bound, the sheet's power iteration, and exact sigma (opt.).

    ``method`` is the default estimator's (``METHODS``); ``tol`` overrides both stopping
    tolerances (estimator ``rtol``, default 1e-5; power iteration ``tol``, default 1e-4, §4).
    Returns the rows and the warnings of reading the file.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    warnings = DataWarnings()
    rows: list[SpectralRow] = []
    est_kw: dict[str, Any] = {"method": method}
    if tol is not None:
        est_kw["rtol"] = tol
        est_kw["tol"] = tol
    # One intra-op thread, as every report task (same bits as the report's table): the products
    # are matrix-vector, and a second thread only adds its wake-ups and spinning to the CPU time.
    with one_thread():
        # the table needs no norms: the read checks finiteness alone, block by block
        for item in TensorStream(path, warnings=warnings, reducer=FiniteCheck):
            name, t = item.name, item.tensor
            m = as_matrix(t)
            if m is None:
                continue
            shape = tuple(t.shape)
            if not (item.reduced.finite if item.reduced is not None else bool(torch.isfinite(m).all())):
                rows.append(SpectralRow(name, shape, "non-finite", None, None, None, None, None, None, None, None))
                continue
            # both cold from the same seeded start, sharing their products (the power steps that
            # lie in the estimator's Krylov space cost none)
            est, power = estimate_with_power_iteration(m, check_finite=False, **est_kw)
            v = spectral_validation(est, power, exact_top_singular_values(m) if exact else None)
            rows.append(SpectralRow(name, shape, v.method, v.sigma_est, v.err_bound, v.sigma_power,
                                    _num(v.sigma_exact), _num(v.rel_err), _num(v.power_rel_err), v.iterations,
                                    _num(v.sigma_ratio)))
    return rows, list(warnings)
