"""What changed between a checkpoint and its base: the library behind ``audit CKPT --baseline BASE``.

Per tensor: the relative change ``||W - W0||_F / ||W0||_F`` and sigma_1 before and after (§4);
tensors added, removed or reshaped; the layers (all tensors of one layer index taken together)
and the tensors that moved most. Findings: a tensor named as
frozen (``--frozen`` patterns) that moved (error), and a family of same-role tensors (same name
but the layer index) whose median change is far above the median over families (warning,
``AnalysisConfig.family_moved_ratio``).

Both checkpoints are read with the loaders' readers (any layout: safetensors or torch files,
sharded or single, ``module.``-style prefixes already removed). Names are matched as they are,
or after removing one leading component from one side (``transformer.h.0...`` vs ``h.0...``).
The two files are streamed side by side: a tensor waits only until its partner is read, so
checkpoints written in the same order hold two tensors at a time.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analyze.config import AnalysisConfig
from analyze.metrics.spectral import as_matrix, estimate_spectral_norm
from analyze.metrics.static import change_norms, family_key, family_medians, group_change, layer_key, ratio_of_norms
from analyze.pipeline.tables import Finding, Severity
from loaders.checkpoints import checkpoint_info, iter_tensors

__all__ = ["TensorChange", "compare_checkpoints", "match_names", "MOST_MOVED_LISTED"]

MOST_MOVED_LISTED = 5


@dataclass(frozen=True, slots=True)
class TensorChange:
    """One tensor against its base. ``status``: changed (float, same shape), buffer (integer or
    bool, compared for equality), reshaped, added (no base), removed (only in the base)."""

    name: str
    base_name: str | None
    status: str
    shape: tuple[int, ...] | None
    base_shape: tuple[int, ...] | None
    rel_change: float = math.nan
    sigma_before: float = math.nan
    sigma_after: float = math.nan
    equal: bool | None = None
    diff_norm: float = math.nan          # ||W - W0||_F
    base_norm: float = math.nan          # ||W0||_F


def match_names(names: Sequence[str], base_names: Sequence[str]) -> tuple[dict[str, str], str]:
    """Checkpoint name -> base name, and a note on the prefix removed ("" when names matched as
    they are). Tries the names as they are and with one leading component (``transformer.``,
    ``bert.``, ``model.``) removed from either side; keeps the mapping that matches most."""
    base = set(base_names)
    best = {n: n for n in names if n in base}
    note = ""
    firsts = sorted({n.split(".", 1)[0] + "." for n in [*names, *base_names] if "." in n})
    for pre in firsts:
        strip_ckpt = {n: n[len(pre):] for n in names if n.startswith(pre) and n[len(pre):] in base}
        strip_base = {n: pre + n for n in names if pre + n in base}
        for cand, how in ((strip_ckpt, f"prefix {pre!r} removed from the checkpoint's names"),
                          (strip_base, f"prefix {pre!r} removed from the base's names")):
            merged = {**{n: n for n in names if n in base and n not in cand}, **cand}
            if len(set(merged.values())) == len(merged) and len(merged) > len(best):
                best, note = merged, how
    return best, note


def _sigma(t: torch.Tensor, finite: bool) -> float:
    """sigma_1 (§4) of a tensor known to be finite (its norm is), NaN for non-matrices."""
    m = as_matrix(t)
    if m is None or not finite:
        return math.nan
    return estimate_spectral_norm(m, check_finite=False).sigma


def _compare(name: str, base_name: str, t: torch.Tensor, t0: torch.Tensor, sigma_after: float | None) -> TensorChange:
    shape, base_shape = tuple(t.shape), tuple(t0.shape)
    if shape != base_shape:
        return TensorChange(name, base_name, "reshaped", shape, base_shape)
    if not (t.is_floating_point() and t0.is_floating_point()):
        return TensorChange(name, base_name, "buffer", shape, base_shape, equal=bool(torch.equal(t, t0)))
    diff, norm0, norm = change_norms(t, t0)
    after = _sigma(t, math.isfinite(norm)) if sigma_after is None else sigma_after
    return TensorChange(name, base_name, "changed", shape, base_shape, ratio_of_norms(diff, norm0),
                        _sigma(t0, math.isfinite(norm0)), after, equal=bool(torch.equal(t, t0)), diff_norm=diff, base_norm=norm0)


def _paired(path: Path, base: Path, mapping: dict[str, str],
            known_sigma: dict[str, float]) -> Iterator[TensorChange]:
    """Stream both checkpoints side by side; yield each pair once both halves were read, and each
    unmatched tensor as added / removed."""
    inverse = {b: a for a, b in mapping.items()}
    its = [iter(iter_tensors(path)), iter(iter_tensors(base))]
    pending: list[dict[str, torch.Tensor]] = [{}, {}]   # keyed by checkpoint name
    live = [True, True]
    while any(live):
        for side in (0, 1):
            if not live[side]:
                continue
            try:
                name, t = next(its[side])
            except StopIteration:
                live[side] = False
                continue
            key = name if side == 0 else inverse.get(name)
            if key is None or (side == 0 and name not in mapping):
                shape = tuple(t.shape)
                yield (TensorChange(name, None, "added", shape, None) if side == 0
                       else TensorChange(name, name, "removed", None, shape))
                continue
            other = pending[1 - side].pop(key, None)
            if other is None:
                pending[side][key] = t
                continue
            a, b = (t, other) if side == 0 else (other, t)
            change = _compare(key, mapping[key], a, b, known_sigma.get(key))
            del t, other, a, b   # not held while the next pair is read
            yield change
    for name, t in pending[0].items():   # matched by name in the headers but never read: a partial file
        yield TensorChange(name, None, "added", tuple(t.shape), None)
    for name, t in pending[1].items():
        yield TensorChange(mapping[name], mapping[name], "removed", None, tuple(t.shape))


def _fmt(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4g}"


def compare_checkpoints(path: Path, base: Path, cfg: AnalysisConfig, *, frozen: Sequence[str] = (),
                        step: int | None = None, sigma: dict[str, float] | None = None,
                        ) -> tuple[list[TensorChange], list[Finding]]:
    """Per-tensor changes of ``path`` against ``base`` and their findings (module docstring).
    ``sigma``: sigma_1 of the checkpoint's tensors already estimated (the audit's), not redone."""
    names = [t.name for t in checkpoint_info(path).tensors]
    base_names = [t.name for t in checkpoint_info(base).tensors]
    mapping, note = match_names(names, base_names)
    order = {n: i for i, n in enumerate(names)}
    base_order = {n: i for i, n in enumerate(base_names)}
    rows = sorted(_paired(path, base, mapping, {k: v for k, v in (sigma or {}).items() if math.isfinite(v)}),
                  key=lambda r: (order.get(r.name, len(order)), base_order.get(r.base_name or "", 0)))
    out: list[Finding] = []
    f = out.append
    if note:
        f(Finding(Severity.INFO, "baseline_names", f"names matched with the base {base}: {note}.", step=step))
    for r in rows:
        if r.status == "changed":
            sig = (f"; sigma_1 {_fmt(r.sigma_before)} -> {_fmt(r.sigma_after)}"
                   if math.isfinite(r.sigma_before) or math.isfinite(r.sigma_after) else "")
            f(Finding(Severity.INFO, "weight_change", f"{r.name}: ||W - W0|| / ||W0|| = {_fmt(r.rel_change)}{sig}.",
                      step=step, tensor=r.name, value=r.rel_change, metric="relative_change"))
        elif r.status == "buffer" and not r.equal:
            f(Finding(Severity.INFO, "buffer_changed", f"{r.name} (integer buffer) differs from the base.",
                      step=step, tensor=r.name))
        elif r.status in ("added", "removed", "reshaped"):
            what = {"added": f"{r.name} {list(r.shape or ())} is not in the base",
                    "removed": f"{r.base_name} {list(r.base_shape or ())} is in the base only",
                    "reshaped": f"{r.name}: shape {list(r.base_shape or ())} in the base, {list(r.shape or ())} now"}
            f(Finding(Severity.INFO, f"tensor_{r.status}", what[r.status] + ".", step=step,
                      tensor=r.name if r.status != "removed" else r.base_name))
    if not any(r.status in ("changed", "buffer") for r in rows):
        f(Finding(Severity.WARNING, "baseline_unrelated",
                  f"no tensor of {path} has a partner of the same name and shape in {base}: is it the right base?",
                  step=step))
    moved = [r for r in rows if r.status == "changed" and math.isfinite(r.rel_change)]
    top = sorted(moved, key=lambda r: (-r.rel_change, order.get(r.name, 0)))[:MOST_MOVED_LISTED]
    if top:
        layers = group_change(np.asarray([r.diff_norm for r in moved]), np.asarray([r.base_norm for r in moved]),
                              [layer_key(r.name) for r in moved])
        by_layer = sorted(((v, k) for k, v in layers.items() if math.isfinite(v)), key=lambda kv: (-kv[0], kv[1]))
        f(Finding(Severity.INFO, "moved_most", "moved most (||W - W0|| / ||W0||): layers "
                  + ", ".join(f"{k} {_fmt(v)}" for v, k in by_layer[:MOST_MOVED_LISTED]) + "; tensors "
                  + ", ".join(f"{r.name} {_fmt(r.rel_change)}" for r in top) + ".", step=step,
                  tensor=top[0].name, value=top[0].rel_change, metric="relative_change"))
    out.extend(_frozen_findings(rows, frozen, step))
    out.extend(_family_moved(moved, cfg, step))
    return rows, out


def _frozen_findings(rows: Sequence[TensorChange], patterns: Sequence[str], step: int | None) -> list[Finding]:
    """``frozen_moved`` (error): a tensor matching a ``--frozen`` pattern that is not bit-identical
    to its base; ``frozen_unmatched`` (warning): a pattern that names no tensor (a typo would
    otherwise pass the gate)."""
    out: list[Finding] = []
    for pat in patterns:
        hit = [r for r in rows if r.status in ("changed", "buffer", "reshaped")
               and (fnmatch.fnmatchcase(r.name, pat) or fnmatch.fnmatchcase(r.base_name or "", pat))]
        if not hit:
            out.append(Finding(Severity.WARNING, "frozen_unmatched",
                               f"--frozen {pat!r} matches no tensor present in both checkpoints.", step=None))
        for r in hit:
            if r.status == "reshaped" or not r.equal:
                change = "was reshaped" if r.status == "reshaped" else (
                    f"moved: ||W - W0|| / ||W0|| = {_fmt(r.rel_change)}" if r.status == "changed" else "changed")
                out.append(Finding(Severity.ERROR, "frozen_moved", f"{r.name} should be frozen ({pat!r}) but {change}.",
                                   step=step, tensor=r.name, value=r.rel_change if r.status == "changed" else None,
                                   threshold=0.0, metric="relative_change"))
    return out


def _family_moved(moved: Sequence[TensorChange], cfg: AnalysisConfig, step: int | None) -> list[Finding]:
    """``family_moved``: a family's median change over the median of all families' medians above
    ``cfg.family_moved_ratio`` (matrices only; families as in the static checks)."""
    mats = [r for r in moved if r.shape is not None and len(r.shape) >= 2]
    fams = sorted({family_key(r.name) for r in mats})
    if len(fams) < cfg.family_min_size:
        return []
    fam_of = [family_key(r.name) for r in mats]
    med, _, _ = family_medians([r.rel_change for r in mats], fam_of, 1)
    by_fam = dict(zip(fam_of, med.tolist(), strict=True))
    med_by_fam = np.asarray([by_fam[fam] for fam in fams])
    overall, ratio, _ = family_medians(med_by_fam, ["all"] * len(fams), cfg.family_min_size)
    out: list[Finding] = []
    for fam, m, r in zip(fams, med_by_fam, ratio, strict=True):
        if math.isfinite(r) and r > cfg.family_moved_ratio:
            n = fam_of.count(fam)
            out.append(Finding(Severity.WARNING, "family_moved",
                               f"{fam} ({n} tensors) moved {r:.3g}x more than the median family: median "
                               f"||W - W0|| / ||W0|| {m:.4g} against {overall[0]:.4g}; the rule flags above "
                               f"{cfg.family_moved_ratio:g} (AnalysisConfig.family_moved_ratio).", step=step,
                               tensor=fam, value=float(r), threshold=cfg.family_moved_ratio,
                               metric="family_change_ratio"))
    return out
