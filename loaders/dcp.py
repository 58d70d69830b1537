"""``torch.distributed.checkpoint`` folders (``.metadata`` + ``__N_M.distcp``, as FSDP and
torchtitan write them), read tensor by tensor with torch's own reader, no process group.

Safety (bad-inputs.md A: untrusted files are data). torch's ``FileSystemReader.read_metadata``
reads ``.metadata`` with a plain ``pickle.load``, so a crafted file runs code when opened, and its
planner's ``load_bytes`` loads non-tensor entries with ``torch.load`` without ``weights_only``. Here:

- ``.metadata`` goes through ``_MetadataUnpickler``, which resolves only the classes a DCP
  metadata file is made of (the dataclasses of ``torch.distributed.checkpoint.metadata``,
  ``_StorageInfo``, ``torch.Size``, dtypes, layouts, ``pathlib`` paths); any other global is
  refused with a one-line error. Those classes only hold data: building them runs no user code.
- only tensor entries are loaded: torch's ``FileSystemReader.read_data`` reads each one with
  ``torch.load(..., weights_only=True)``; non-tensor entries (optimizer step counters, pickled
  objects) are listed as skipped, never loaded.
- every storage item must name a regular file directly in the folder, within its size, and a
  tensor's declared size must fit in the bytes stored for it (no huge allocation from a header).

Memory: one tensor at a time. torch's reader loads a stored blob and copies it into the target,
so the peak is about twice the largest tensor.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.errors import TrainauditError
from loaders.safeio import check_regular, read_bounded

__all__ = ["DcpTensor", "DcpInfo", "is_dcp_dir", "read_dcp_info", "iter_dcp_tensors", "MAX_METADATA"]

METADATA = ".metadata"
MAX_METADATA = 256 << 20           # a .metadata file larger than this is refused

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata``: only the data classes listed in ``_ALLOWED`` and torch
    dtypes resolve (the "restricting globals" recipe of the pickle documentation)."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            import importlib

            return getattr(importlib.import_module(module), name)
        raise TrainauditError(self.path, f"refused to load {module}.{name} (a DCP .metadata holds only "
                                         f"checkpoint metadata; the file may be crafted)")


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    """A folder with a ``.metadata`` file and at least one ``.distcp`` file."""
    p = Path(path)
    if not p.is_dir() or not (p / METADATA).is_file():
        return False
    try:
        return any(n.endswith(".distcp") for n in os.listdir(p))
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class DcpTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str                   # torch name, e.g. "bfloat16"


@dataclass(frozen=True, slots=True)
class DcpInfo:
    """The tensors of a DCP folder (storage order) and the non-tensor entries left unread."""

    path: Path
    tensors: tuple[DcpTensor, ...]
    skipped: tuple[str, ...]
    metadata: Any                # torch's Metadata object (validated)


def read_dcp_info(path: str | os.PathLike[str]) -> DcpInfo:
    """Read and check ``.metadata`` (module docstring); raises ``TrainauditError`` naming the
    folder and the problem."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    p = Path(path)
    mpath = p / METADATA
    raw = read_bounded(mpath, p, max_bytes=MAX_METADATA)
    try:
        md = _MetadataUnpickler(raw, mpath).load()
    except TrainauditError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a data error
        raise TrainauditError(mpath, f"not a readable DCP metadata file ({type(exc).__name__})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) or \
            not isinstance(md.storage_data, dict):
        raise TrainauditError(mpath, "not a DCP metadata file (no Metadata object with storage data)")
    sizes: dict[str, int] = {}
    stored: dict[str, int] = {}     # bytes stored per tensor (its chunks' blobs)
    first: dict[str, tuple[str, int]] = {}
    for index, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(rel, str) or not rel or os.sep in rel or "/" in rel or rel in (".", "..") or \
                not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise TrainauditError(mpath, f"invalid storage entry for {getattr(index, 'fqn', '?')!r} "
                                         f"(file {rel!r}, offset {offset!r}, length {length!r})")
        if rel not in sizes:
            try:
                sizes[rel] = check_regular(p / rel, p).st_size
            except TrainauditError as exc:
                raise TrainauditError(p / rel, f"{exc.problem} (named by .metadata)") from None
        if offset + length > sizes[rel]:
            raise TrainauditError(p / rel, f"truncated: .metadata places {index.fqn!r} at bytes "
                                           f"{offset}-{offset + length}, the file holds {sizes[rel]}")
        stored[index.fqn] = stored.get(index.fqn, 0) + length
        first[index.fqn] = min(first.get(index.fqn, (rel, offset)), (rel, offset))
    tensors: list[DcpTensor] = []
    skipped: list[str] = []
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            skipped.append(fqn)
            continue
        if not isinstance(meta, TensorStorageMetadata) or not isinstance(fqn, str):
            raise TrainauditError(mpath, f"unknown entry type for {fqn!r}")
        dtype = meta.properties.dtype
        shape = tuple(int(d) for d in meta.size)
        if not isinstance(dtype, torch.dtype) or any(d < 0 for d in shape):
            raise TrainauditError(mpath, f"invalid dtype or shape for tensor {fqn!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > stored.get(fqn, 0):
            raise TrainauditError(mpath, f"tensor {fqn!r} declares {nbytes} bytes but {stored.get(fqn, 0)} "
                                         f"are stored for it")
        tensors.append(DcpTensor(fqn, shape, str(dtype).removeprefix("torch.")))
    tensors.sort(key=lambda t: first.get(t.name, ("", 0)))
    return DcpInfo(p, tuple(tensors), tuple(skipped), md)


def _reader(info: DcpInfo) -> Any:
    """torch's FileSystemReader with the validated metadata in place of its pickle.load."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = info.metadata
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader(str(info.path))


def iter_dcp_tensors(path: str | os.PathLike[str], names: Sequence[str] | None = None,
                     info: DcpInfo | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` one at a time in storage order (only `names` when given), each loaded by
    ``torch.distributed.checkpoint.load`` into a fresh tensor of its declared shape, no process
    group (``no_dist``), through torch's ``DefaultLoadPlanner``."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    info = info if info is not None else read_dcp_info(path)
    reader = _reader(info)
    wanted = set(names) if names is not None else None
    for t in info.tensors:
        if wanted is not None and t.name not in wanted:
            continue
        target = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
                dcp.load({t.name: target}, storage_reader=reader,
                         planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                         no_dist=True)
        except TrainauditError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt shard is a data error, named
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise TrainauditError(info.path, f"cannot read tensor {t.name!r} ({type(exc).__name__}"
                                             f"{': ' + msg if msg else ''})") from None
        yield t.name, target
        del target
