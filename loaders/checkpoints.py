"""Checkpoint readers: safetensors, PyTorch state dicts, Hugging Face folders, sharded weights.

Untrusted files are the norm here (bad-inputs.md groups A-C). ``iter_tensors`` visits tensors
one at a time and ``checkpoint_info`` describes them (from safetensors headers alone, or a torch
file loaded with ``mmap``); names are normalised (``module.`` / ``_orig_mod.`` prefixes, row C6)
and tied tensors counted once. The file-level work is in ``safetensors_file`` (header checks,
pread), ``torch_files`` (weights-only ``torch.load``, the state dict inside) and
``checkpoint_files`` (folders, indexes, side files that are never opened).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loaders.checkpoint_files import (  # noqa: F401 - re-exported: the checkpoint API in one place
    HF_SIDE_FILES,
    checkpoint_kind,
    missing_error,
    resolve,
    shard_header,
    skipped_side_files,
    step_from_name,
)
from loaders.errors import DataWarnings
from loaders.safetensors_file import (  # noqa: F401 - re-exported
    check_safetensors_header,
    is_lfs_pointer,
    iter_safetensors,
    read_safetensors_tensor,
    safetensors_entries,
)
from loaders.torch_files import (  # noqa: F401 - re-exported
    CONTAINER_KEYS,
    TORCH_SUFFIXES,
    Placeholder,
    find_state_dict,
    load_torch_object,
)

if TYPE_CHECKING:  # loaders.run imports pandas: reading a checkpoint never needs it
    from loaders.run import CheckpointRef

__all__ = [
    "CONTAINER_KEYS",
    "HF_SIDE_FILES",
    "TORCH_SUFFIXES",
    "CheckpointInfo",
    "Placeholder",
    "TensorInfo",
    "check_safetensors_header",
    "checkpoint_info",
    "checkpoint_kind",
    "is_lfs_pointer",
    "iter_tensors",
    "list_tensors",
    "load_torch_object",
    "read_safetensors_tensor",
    "skipped_side_files",
    "step_from_name",
    "step_metadata",
]

PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name (prefixes stripped), shape and dtype (torch name, e.g. "float32") of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What a checkpoint holds. Tied tensors (same storage) count once in ``n_params``."""

    path: Path
    kind: str
    n_params: int
    tensors: tuple[TensorInfo, ...]
    tied: tuple[tuple[str, str], ...]   # (name kept, alias) pairs
    container_key: str | None           # where the state dict was found ("" = top level)
    stripped_prefix: str                # e.g. "module._orig_mod." or ""
    metadata: dict[str, Any] = field(default_factory=dict)


def _plan_prefix(names: list[str]) -> tuple[str, list[str]]:
    """Prefix removed from every name (``module.``, ``_orig_mod.`` and their combinations, row C6)
    and the prefixes found on only some names (row C7: then that layer is left alone)."""
    stripped = ""
    cur = names
    while cur:
        for pre in PREFIXES:
            if all(n.startswith(pre) and len(n) > len(pre) for n in cur):
                stripped += pre
                cur = [n[len(pre):] for n in cur]
                break
        else:
            return stripped, [pre for pre in PREFIXES if any(n.startswith(pre) for n in cur)]
    return stripped, []


def _strip(names: list[str], p: Path, warnings: DataWarnings | None) -> tuple[dict[str, str], str]:
    prefix, mixed = _plan_prefix(names)
    if mixed and warnings is not None:
        warnings.add(p, f"inconsistent key prefixes ({', '.join(mixed)} on some names only); names kept")
    return {n: n[len(prefix):] for n in names}, prefix


def iter_tensors(ref_or_path: CheckpointRef | str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                 warnings: DataWarnings | None = None, partial: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` one at a time from any supported checkpoint, names normalised.

    Accepts a ``CheckpointRef`` or a path: ``.safetensors``, an HF folder (``model.safetensors``,
    sharded ``model-0000k-of-0000n.safetensors`` + index, ``pytorch_model.bin``), ``.pt`` /
    ``.pth`` / ``.bin`` / ``.ckpt`` / nanoGPT ``ckpt.pt``. Tied tensors are yielded once (under the
    first name). A shard that the index names but that is missing or unreadable raises
    ``TrainauditError`` after the present shards were yielded (row B13: partial kept); with
    ``partial=True`` it is a warning instead (the caller keeps what was read).
    """
    src = resolve(ref_or_path, root)
    if src.index_names is not None:
        rename, _ = _strip(src.index_names, src.path, warnings)
    else:
        rename = None
    for part in src.parts:
        if part.fmt == "safetensors":
            header = shard_header(src, part, warnings, skip=partial)
            if header is None:
                continue
            names = [r[0] for r in safetensors_entries(header)]
            ren = rename if rename is not None else _strip(names, part.path, warnings)[0]
            for name, t in iter_safetensors(part.path, header, src.root):
                yield ren.get(name, name), t
        elif part.fmt == "dcp":
            from loaders.dcp import iter_dcp_tensors, read_dcp_info

            info = read_dcp_info(part.path)
            ren = _strip([t.name for t in info.tensors], part.path, warnings)[0]
            for name, t in iter_dcp_tensors(part.path, info=info):
                yield ren.get(name, name), t
        else:
            obj = load_torch_object(part.path, root=src.root, warnings=warnings)
            sd, _key = find_state_dict(obj, part.path)
            del obj
            ren = rename if rename is not None else _strip(list(sd), part.path, warnings)[0]
            seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...], str]] = set()
            for name in list(sd):
                t = sd.pop(name)
                ident = _storage_id(t)
                if ident is not None:
                    if ident in seen:
                        continue
                    seen.add(ident)
                yield ren.get(name, name), t
    if src.missing or src.unreadable:
        if not partial:
            raise missing_error(src)
        if warnings is not None:
            warnings.add(src.path, str(missing_error(src).problem))


def _storage_id(t: Any) -> tuple[int, int, tuple[int, ...], tuple[int, ...], str] | None:
    """Identity of a tensor's bytes (tied weights share it); None for empty tensors."""
    if t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype)


def checkpoint_info(ref_or_path: CheckpointRef | str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                    warnings: DataWarnings | None = None) -> CheckpointInfo:
    """Names, shapes, dtypes, parameter count (ties once), tied pairs and where the tensors were.

    safetensors files are described from their headers alone; torch files are loaded with
    ``mmap`` (no tensor data is read).
    """
    src = resolve(ref_or_path, root)
    rename = _strip(src.index_names, src.path, warnings)[0] if src.index_names is not None else None
    infos: list[TensorInfo] = []
    tied: list[tuple[str, str]] = []
    n_params = 0
    container: str | None = None
    prefix = ""
    meta: dict[str, Any] = {}
    for part in src.parts:
        if part.fmt == "safetensors":
            header = shard_header(src, part, warnings, skip=True)
            if header is None:
                continue
            meta.update(header.get("__metadata__") or {})
            rows = safetensors_entries(header)
            if rename is None:
                ren, prefix = _strip([r[0] for r in rows], part.path, warnings)
            else:
                ren = rename
            for name, shape, dtype, _ in rows:
                infos.append(TensorInfo(ren.get(name, name), shape, dtype))
                numel = 1
                for d in shape:
                    numel *= d
                n_params += numel
        elif part.fmt == "dcp":
            from loaders.dcp import read_dcp_info

            dinfo = read_dcp_info(part.path)
            ren, prefix = _strip([t.name for t in dinfo.tensors], part.path, warnings)
            for t in dinfo.tensors:
                infos.append(TensorInfo(ren.get(t.name, t.name), t.shape, t.dtype))
                n_params += math.prod(t.shape)
        else:
            obj = load_torch_object(part.path, root=src.root, warnings=warnings)
            sd, container = find_state_dict(obj, part.path)
            if isinstance(obj, Mapping):
                meta.update({k: v for k, v in obj.items()
                             if isinstance(k, str) and isinstance(v, (int, float, str, bool))})
            if rename is None:
                ren, prefix = _strip(list(sd), part.path, warnings)
            else:
                ren = rename
            first: dict[Any, str] = {}
            for name, t in sd.items():
                new = ren.get(name, name)
                ident = _storage_id(t)
                if ident is not None and ident in first:
                    tied.append((first[ident], new))
                    continue
                if ident is not None:
                    first[ident] = new
                infos.append(TensorInfo(new, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
                n_params += t.numel()
    if (src.missing or src.unreadable) and warnings is not None:
        warnings.add(src.path, str(missing_error(src).problem))
    if rename is not None:
        _, prefix = _plan_prefix(src.index_names or [])
    return CheckpointInfo(src.path, src.kind, n_params, tuple(infos), tuple(tied), container, prefix, meta)


def list_tensors(ref_or_path: CheckpointRef | str | os.PathLike[str], *,
                 root: str | os.PathLike[str] | None = None) -> list[TensorInfo]:
    """``TensorInfo`` of every tensor (tied aliases once), in storage order."""
    return list(checkpoint_info(ref_or_path, root=root).tensors)


def step_metadata(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Metadata stored with a checkpoint: the safetensors ``__metadata__`` (our logger writes
    ``{"step": "100", "config": json}``), or a torch dict's top-level scalars (``iter_num``,
    ``global_step``, ``epoch`` ...). Empty when there is none."""
    p = Path(path)
    if p.is_dir() or p.name.endswith(".index.json"):
        src = resolve(p, root)
        if not src.parts or src.kind == "dcp":  # DCP non-tensor entries are never loaded (loaders.dcp)
            return {}
        p = src.parts[0].path
        root = src.root
    if p.suffix == ".safetensors":
        return dict(check_safetensors_header(p, root).get("__metadata__") or {})
    obj = load_torch_object(p, root=root)
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
