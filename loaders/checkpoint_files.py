"""Where a checkpoint's tensors are: the file kinds, steps in names, Hugging Face folders and
sharded indexes, and the pickled side files that are never opened (bad-inputs.md A6, B13)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.safeio import read_bounded
from loaders.safetensors_file import check_safetensors_header

if TYPE_CHECKING:  # loaders.run imports pandas: the checkpoint commands never need it
    from loaders.run import CheckpointRef

__all__ = ["HF_SIDE_FILES", "Part", "Source", "checkpoint_kind", "missing_error", "resolve", "shard_header",
           "ref_path", "skipped_side_files", "step_from_name"]

MAX_INDEX = 64 << 20                # a sharded index JSON larger than this is refused
# Hugging Face Trainer pickles in checkpoint-N/ that hold no weights: never unpickled.
HF_SIDE_FILES = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt",
                 "scaler.pt", "rng_state.pth")
_HF_SIDE_RE = re.compile(r"^(rng_state(_\d+)?\.pth|optimizer(_\d+)?\.(pt|bin)|scheduler\.pt|scaler\.pt|"
                         r"training_args\.bin)$")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


_STEP_RES = (re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.I), re.compile(r"checkpoint[-_](\d+)", re.I),
             re.compile(r"(?:^|[^a-z])iter(?:ation)?[=_-]?(\d+)", re.I), re.compile(r"ckpt[-_](\d+)", re.I))


def step_from_name(name: str) -> int | None:
    """Training step written in a checkpoint's file name (``step_00000100``, ``checkpoint-500``,
    ``epoch=1-step=200.ckpt``, ``iter_2000.pt``), or None."""
    for rx in _STEP_RES:
        m = rx.search(name)
        if m:
            return int(m.group(1))
    return None


def checkpoint_kind(path: str | os.PathLike[str]) -> str:
    """``CheckpointRef.kind`` for a path: safetensors | sharded-safetensors | hf-dir | dcp | torch."""
    p = Path(path)
    if p.is_dir():
        from loaders.dcp import is_dcp_dir

        return "dcp" if is_dcp_dir(p) and not any((p / n).exists() for n in _HF_WEIGHT_FILES) else "hf-dir"
    if p.name.endswith(".safetensors.index.json"):
        return "sharded-safetensors"
    if p.suffix == ".safetensors":
        return "safetensors"
    return "torch"


def skipped_side_files(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the pickled HF side files in ``folder`` that are never opened (row A6)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [n for n in names if _HF_SIDE_RE.match(n)]


@dataclass(frozen=True, slots=True)
class Part:
    path: Path
    fmt: str  # "safetensors" | "torch" | "dcp" (a torch.distributed.checkpoint folder, loaders.dcp)


@dataclass(slots=True)
class Source:
    path: Path
    kind: str
    parts: list[Part]
    root: Path | None
    missing: list[str] = field(default_factory=list)   # shards named by an index but absent
    index_names: list[str] | None = None               # every tensor name an index lists
    unreadable: list[str] = field(default_factory=list)  # shards present but cut short or corrupt


def _read_index(index: Path, root: Path) -> tuple[list[str], list[str], list[str]]:
    """Shard file names (in order), names missing on disk, and all tensor names of an HF index.

    Shards are looked up beside the index and must resolve inside ``root`` (the index's folder,
    or the repository folder of a hub-cache snapshot whose files link into ``blobs/``)."""
    raw = read_bounded(index, root, max_bytes=MAX_INDEX)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        raise TrainauditError(index, "not a valid JSON index") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise TrainauditError(index, "index has no weight_map of names to shard files")
    shards: list[str] = []
    for fname in wm.values():
        if fname not in shards:
            shards.append(fname)
    real_root = Path(os.path.realpath(root))
    folder = index.parent
    missing: list[str] = []
    for fname in shards:
        q = Path(fname)
        if q.is_absolute() or ".." in q.parts or len(q.parts) != 1:
            raise TrainauditError(index, f"shard {fname!r} points outside the checkpoint folder")
        real = Path(os.path.realpath(folder / q))
        if real_root not in real.parents:
            raise TrainauditError(index, f"shard {fname!r} points outside the checkpoint folder")
        if not (folder / q).exists():
            missing.append(fname)
    return shards, missing, list(wm.keys())


def _hub_root(folder: Path) -> Path:
    """The folder a checkpoint folder's files must stay in. A Hugging Face hub cache snapshot
    (``models--org--name/snapshots/<rev>/``) holds symlinks to ``../../blobs/<sha>``: its root
    is the ``models--org--name`` folder, so those links are followed and nothing beyond it."""
    parent = folder.parent
    if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
        return parent.parent
    return folder


def ref_path(ref_or_path: CheckpointRef | str | os.PathLike[str]) -> Path:
    """The path of a ``CheckpointRef`` (anything with a ``path``) or of a path."""
    return Path(getattr(ref_or_path, "path", ref_or_path))


def resolve(ref_or_path: CheckpointRef | str | os.PathLike[str], root: str | os.PathLike[str] | None) -> Source:
    p = ref_path(ref_or_path)
    r = Path(root) if root is not None else None
    if p.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (p / name).exists() or (p / name).is_symlink():
                q = p / name
                break
        else:
            from loaders.dcp import is_dcp_dir

            if is_dcp_dir(p):
                return Source(p, "dcp", [Part(p, "dcp")], r if r is not None else p)
            sts = sorted(x for x in os.listdir(p) if x.endswith(".safetensors"))
            if len(sts) == 1:
                q = p / sts[0]
            else:
                raise TrainauditError(p, f"no weights found (looked for: {', '.join(_HF_WEIGHT_FILES)})")
        src = resolve(q, r if r is not None else _hub_root(p))
        return Source(p, "hf-dir", src.parts, src.root, src.missing, src.index_names)
    if p.name.endswith(".index.json"):
        folder = p.parent
        shards, missing, names = _read_index(p, r if r is not None else folder)
        fmt = "safetensors" if p.name.endswith(".safetensors.index.json") else "torch"
        parts = [Part(folder / s, "safetensors" if s.endswith(".safetensors") else "torch")
                 for s in shards if s not in missing]
        kind = "sharded-safetensors" if fmt == "safetensors" else "torch"
        return Source(p, kind, parts, r if r is not None else folder, missing, names)
    if p.suffix == ".safetensors":
        return Source(p, "safetensors", [Part(p, "safetensors")], r)
    return Source(p, "torch", [Part(p, "torch")], r)


def missing_error(src: Source) -> TrainauditError:
    parts = [f"{what} shard{'s' if len(names) > 1 else ''} {', '.join(names)}"
             for what, names in (("missing", src.missing), ("unreadable", src.unreadable)) if names]
    return TrainauditError(src.path, f"{'; '.join(parts)} (the other shards were read)")


def shard_header(src: Source, part: Part, warnings: DataWarnings | None, *, skip: bool) -> dict[str, Any] | None:
    """A safetensors part's validated header. With `skip`, an unreadable shard of a sharded
    checkpoint (cut short, corrupt header) is recorded, warned about and skipped, so the other
    shards are still analysed (row B13); otherwise, and for a single file, the problem is raised."""
    try:
        return check_safetensors_header(part.path, src.root)
    except TrainauditError as exc:
        if not skip or src.index_names is None:
            raise
        src.unreadable.append(part.path.name)
        if warnings is not None:
            warnings.add(part.path, f"shard skipped: {exc.problem}")
        return None
