"""Where each training library puts its checkpoints, and the step each checkpoint records.

The step of a checkpoint comes from what the run wrote, first match wins (``recorded_step``):

1. a Hugging Face ``checkpoint-N/`` folder on the path: N, which the Trainer writes from its
   ``global_step`` (a file inside ``checkpoint-200/`` is step 200; the ``trainer_state.json``
   inside, often many MB, is not read again for it);
2. an accelerate ``save_state`` folder (``random_states_0.pkl`` / ``scheduler.bin`` beside the
   weights): the LR scheduler's ``last_epoch`` (one scheduler step per optimizer step), else
   the ``step`` accelerate stores with the RNG state when it is not 0. The ``N`` of
   ``checkpoint_N`` is accelerate's save counter, never a step;
3. our logger's safetensors metadata ``step``;
4. a torch file's top-level ``global_step`` (Lightning), ``iter_num`` (nanoGPT) or ``step``;
5. a step written in the name (``step_100``, ``epoch=1-step=200``, ``iter_2000``).

Only when none of these exists is the file order used, and a data warning says so.

The same weights saved twice (Lightning's ``last.ckpt`` beside ``epoch=9-step=200.ckpt``, a
final ``save_model`` beside ``checkpoint-200/``) are one checkpoint (``dedupe``): two
checkpoints with the same recorded step and the same tensors (names, shapes, and equal values
of the first, middle and last tensor) keep the one whose name carries the step. Files a library
always writes beside the weights and that nothing here analyses (optimizer, scheduler, RNG,
sampler, scaler state, training arguments) are never opened: ``not_analysed`` lists them so the
report can name them without counting them as data problems.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from loaders.checkpoint_files import checkpoint_kind, step_from_name
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef
from loaders.safetensors_file import check_safetensors_header
from loaders.torch_files import TORCH_SUFFIXES, load_torch_object

__all__ = ["CHECKPOINT_FOLDERS", "NOT_ANALYSED_RE", "WEIGHT_FILES", "dedupe", "find_checkpoints", "has_weights",
           "is_accelerate_dir", "not_analysed", "recorded_step", "same_weights"]

# Files Transformers, accelerate, Lightning and DeepSpeed write beside the weights that hold no
# weights (pickles or torch files of optimizer / scheduler / RNG / sampler state).
NOT_ANALYSED_RE = re.compile(
    r"^(rng_state(_\d+)?\.pth|optimizer(_\d+)?\.(pt|bin|pth)|scheduler(_\d+)?\.(pt|bin|pth)|scaler(_\d+)?\.(pt|bin)|"
    r"training_args\.bin|random_states_\d+\.pkl|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|"
    r"custom_checkpoint_\d+\.pkl|.*_optim_states\.pt|zero_pp_rank_.*\.pt)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
# Sub-folders where people and libraries keep a run's checkpoints beside its logs.
CHECKPOINT_FOLDERS = ("checkpoints", "checkpoint", "ckpt", "ckpts")
_HF_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_STEP_KEYS = ("global_step", "iter_num", "step")


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int) and v >= 0:
        return v
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    return None


def not_analysed(folder: str | os.PathLike[str], prefix: str = "") -> list[str]:
    """Names (``prefix`` + name) of the library state files in ``folder`` that are never opened."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [prefix + n for n in names if NOT_ANALYSED_RE.match(n)]


def has_weights(d: Path) -> bool:
    """A folder holding a model's weights (an HF / accelerate checkpoint folder, or a
    ``torch.distributed.checkpoint`` folder: ``.metadata`` + ``*.distcp``)."""
    if not d.is_dir():
        return False
    from loaders.dcp import is_dcp_dir

    return any((d / w).exists() for w in WEIGHT_FILES) or is_dcp_dir(d)


def is_accelerate_dir(d: Path) -> bool:
    """A folder written by accelerate's ``save_state``."""
    try:
        names = set(os.listdir(d))
    except OSError:
        return False
    return any(re.match(r"^random_states_\d+\.pkl$", n) for n in names) or (
        "optimizer.bin" in names and has_weights(d))


def _hf_dir(p: Path, stop: Path | None) -> tuple[int, Path] | None:
    """The ``checkpoint-N`` folder ``p`` is or sits in (not above ``stop``)."""
    for q in (p, *p.parents):
        m = _HF_DIR_RE.match(q.name)
        if m and q.is_dir():
            return int(m.group(1)), q
        if stop is not None and q == stop:
            break
    return None


def _accelerate_step(d: Path, root: Path | None) -> tuple[int | None, str]:
    for n in sorted(os.listdir(d)):
        if re.match(r"^scheduler(_\d+)?\.bin$", n):
            try:
                obj = load_torch_object(d / n, root=root)
            except TrainauditError:
                continue  # no step from it: the file-order fallback warns
            s = _int(obj.get("last_epoch")) if isinstance(obj, dict) else None
            if s is not None:
                return s, f"{n} last_epoch"
    for n in sorted(os.listdir(d)):
        if re.match(r"^random_states_\d+\.pkl$", n):
            try:
                obj = load_torch_object(d / n, root=root)
            except TrainauditError:
                continue
            s = _int(obj.get("step")) if isinstance(obj, dict) else None
            if s:
                return s, f"{n} step"
    return None, ""


def _file_step(f: Path, root: Path | None) -> tuple[int | None, str]:
    if f.suffix == ".safetensors":
        try:  # a bad header is reported when the analysis reads the file
            meta = check_safetensors_header(f, root).get("__metadata__") or {}
        except TrainauditError:
            meta = {}
        s = _int(meta.get("step"))
        if s is not None:
            return s, "safetensors metadata step"
    elif f.name.endswith(TORCH_SUFFIXES):
        try:  # what the load warns about, or fails on, is reported when the analysis reads the tensors
            obj = load_torch_object(f, root=root, warnings=DataWarnings())
        except TrainauditError:
            obj = None
        if isinstance(obj, dict):
            for k in _STEP_KEYS:
                s = _int(obj.get(k))
                if s is not None:
                    return s, k
        del obj
    return None, ""


def recorded_step(path: str | os.PathLike[str], *,
                  root: str | os.PathLike[str] | None = None) -> tuple[int | None, str]:
    """The step a checkpoint (file or folder) records and where it was read; ``(None, "")`` when
    nothing records it. The order of the sources is in the module docstring. Silent: a file that
    cannot be read is reported when the analysis reads its tensors."""
    p = Path(path)
    r = Path(root) if root is not None else None
    hf = _hf_dir(p, r)
    if hf is not None:
        return hf[0], f"folder {hf[1].name}"
    folder = p if p.is_dir() else p.parent
    if is_accelerate_dir(folder):
        s, where = _accelerate_step(folder, r)
        if s is not None:
            return s, where
    if p.is_dir():
        from loaders.checkpoint_files import resolve
        try:
            parts = resolve(p, r).parts
        except TrainauditError:
            parts = []
        if parts:
            s, where = _file_step(parts[0].path, r)
            if s is not None:
                return s, where
        if is_accelerate_dir(p):
            return None, ""  # checkpoint_N: a save counter, not a step
    else:
        s, where = _file_step(p, r)
        if s is not None:
            return s, where
    s = step_from_name(p.name)
    return (s, "file name") if s is not None else (None, "")


def _natural(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _candidates(folder: Path) -> list[Path]:
    """Weight files and weight folders directly in ``folder`` (library state files excluded)."""
    out = []
    for n in sorted(os.listdir(folder), key=_natural):
        q = folder / n
        if NOT_ANALYSED_RE.match(n) or q.is_symlink() and q.is_dir():
            continue
        if q.is_dir():
            if has_weights(q):
                out.append(q)
        elif n.endswith(_WEIGHT_SUFFIXES) or n.endswith(".safetensors.index.json"):
            if n.endswith(".safetensors") and re.match(r".*-\d{5}-of-\d{5}\.safetensors$", n) and \
                    (folder / "model.safetensors.index.json").exists():
                continue  # a shard: the index stands for the checkpoint
            out.append(q)
    return out


def find_checkpoints(folder: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                     warnings: DataWarnings, skipped: list[str] | None = None,
                     prefix: str = "") -> list[CheckpointRef]:
    """Every checkpoint directly in ``folder`` (weight files and checkpoint folders), each at its
    recorded step, duplicates merged (``dedupe``). Steps nothing records become the file order,
    with a warning. Library state files found (also inside checkpoint folders) go to ``skipped``."""
    f = Path(folder)
    r = Path(root) if root is not None else f
    found = _candidates(f)
    if skipped is not None:
        skipped.extend(not_analysed(f, prefix))
        for q in found:
            if q.is_dir():
                skipped.extend(not_analysed(q, f"{prefix}{q.name}/"))
    refs: list[CheckpointRef] = []
    unknown: list[Path] = []
    for q in found:
        s, _ = recorded_step(q, root=r)
        if s is None:
            unknown.append(q)
        else:
            refs.append(CheckpointRef(s, q, checkpoint_kind(q)))
    if unknown:
        taken = {c.step for c in refs}
        nxt = 0
        for q in unknown:
            while nxt in taken:
                nxt += 1
            refs.append(CheckpointRef(nxt, q, checkpoint_kind(q)))
            taken.add(nxt)
        names = ", ".join(q.name for q in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        warnings.add(f, f"no recorded step in {names}: file order used as the step")
    return dedupe(refs, warnings)


def _sample(ref: CheckpointRef) -> tuple[tuple[Any, ...], list[Any]] | None:
    """Names/shapes/dtypes of a checkpoint and its first, middle and last tensor, or None."""
    from loaders.checkpoints import checkpoint_info, iter_tensors

    try:
        info = checkpoint_info(ref)
        sig = tuple((t.name, t.shape, t.dtype) for t in info.tensors)
        picks = {0, len(sig) // 2, len(sig) - 1} if sig else set()
        vals = [t for i, (_, t) in enumerate(iter_tensors(ref, partial=True)) if i in picks]
    except TrainauditError:
        return None
    return sig, vals


def same_weights(a: CheckpointRef, b: CheckpointRef) -> bool:
    """Same tensor names, shapes and dtypes, and equal first, middle and last tensor."""
    sa, sb = _sample(a), _sample(b)
    if sa is None or sb is None or sa[0] != sb[0] or len(sa[1]) != len(sb[1]):
        return False
    import torch
    return all(torch.equal(x, y) for x, y in zip(sa[1], sb[1], strict=True))


def dedupe(refs: list[CheckpointRef], warnings: DataWarnings) -> list[CheckpointRef]:
    """One checkpoint per recorded step. Same step and same tensors: one save of the same weights
    (kept: the one with the step in its name, e.g. ``epoch=9-step=200.ckpt`` over ``last.ckpt``).
    Same step and different tensors: the named one is kept and a warning names the other."""
    by_step: dict[int, list[CheckpointRef]] = {}
    for c in refs:
        by_step.setdefault(c.step, []).append(c)
    out: list[CheckpointRef] = []
    for step, group in sorted(by_step.items()):
        group.sort(key=lambda c: (step_from_name(c.path.name) != step, _natural(c.path.name)))
        keep = group[0]
        out.append(keep)
        for other in group[1:]:
            if not same_weights(keep, other):
                warnings.add(other.path, f"records step {step} like {keep.path.name} but holds other "
                                         f"weights; {keep.path.name} kept")
    return out


def checkpoints_beside(folders: list[Path], *, root: Path, warnings: DataWarnings,
                       skipped: list[str] | None = None) -> list[CheckpointRef]:
    """The checkpoints in the ``checkpoints/`` (or ``checkpoint/``, ``ckpt/``, ``ckpts/``) sub-folder
    of each of ``folders`` (a log folder and the run folder above it, say), merged and deduplicated."""
    refs: list[CheckpointRef] = []
    seen: set[Path] = set()
    for f in folders:
        for n in CHECKPOINT_FOLDERS:
            d = f / n
            if d in seen or not d.is_dir() or d.is_symlink():
                continue
            seen.add(d)
            rel = os.path.relpath(d, root) if root in d.parents else d.name
            refs.extend(find_checkpoints(d, root=root, warnings=warnings, skipped=skipped, prefix=f"{rel}/"))
    return dedupe(refs, warnings)
