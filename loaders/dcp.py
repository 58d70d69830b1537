"""``torch.distributed.checkpoint`` folders (``.metadata`` + ``__N_M.distcp``, as FSDP and
torchtitan write them), read tensor by tensor with torch's own deserializer, no process group.

Safety (bad-inputs.md A: untrusted files are data). torch's ``FileSystemReader.read_metadata``
reads ``.metadata`` with a plain ``pickle.load``, so a crafted file runs code when opened, and its
planner's ``load_bytes`` loads non-tensor entries with ``torch.load`` without ``weights_only``. Here:

- ``.metadata`` goes through ``_MetadataUnpickler``, which resolves only the classes a DCP
  metadata file is made of (the dataclasses of ``torch.distributed.checkpoint.metadata``,
  ``_StorageInfo``, ``torch.Size``, dtypes, layouts, ``pathlib`` paths); any other global is
  refused with a one-line error. Those classes only hold data: building them runs no user code.
- only tensor entries are loaded, each stored item with ``torch.load(..., weights_only=True)``
  on a window of its ``.distcp`` file bounded to the item's bytes; non-tensor entries
  (optimizer step counters, pickled objects) are listed as skipped, never loaded.
- every storage item must name a regular file directly in the folder, within its size, and a
  tensor's declared size must fit in the bytes stored for it (no huge allocation from a header);
  its chunks must lie inside it and tile it exactly (no byte of a result left unwritten), and
  each loaded item must be a tensor of the chunk's declared dtype and shape.

Memory: one tensor at a time, about once its size. torch's ``FileSystemReader.read_data``
loads each stored item and then copies it into the planner's target, so both coexist (twice
the tensor). Here a tensor stored as one item is returned as ``torch.load`` built it (the
window reads the bytes straight into its storage); one stored as several chunks (FSDP) is
assembled into one tensor chunk by chunk, the tensor plus its largest chunk. Items written with
stream transforms (``_extensions``, e.g. compression) go through torch's own reader instead.
"""
from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.errors import TrainauditError
from loaders.safeio import check_regular, open_regular, read_bounded

__all__ = ["DcpTensor", "DcpChunk", "DcpInfo", "is_dcp_dir", "read_dcp_info", "iter_dcp_tensors", "MAX_METADATA"]

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
class DcpChunk:
    """One stored item of a tensor: the block ``[offsets, offsets + sizes)`` of it, a
    ``torch.save`` blob at bytes ``[start, start + length)`` of ``file`` (folder-relative)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int
    transformed: bool            # written through stream transforms: torch's reader decodes it


@dataclass(frozen=True, slots=True)
class DcpInfo:
    """The tensors of a DCP folder (storage order), the non-tensor entries left unread and each
    tensor's stored chunks (validated: they tile the tensor)."""

    path: Path
    tensors: tuple[DcpTensor, ...]
    skipped: tuple[str, ...]
    metadata: Any                # torch's Metadata object (validated)
    chunks: dict[str, tuple[DcpChunk, ...]] = field(default_factory=dict)


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
    chunks: dict[str, tuple[DcpChunk, ...]] = {}
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            skipped.append(fqn)
            continue
        if not isinstance(meta, TensorStorageMetadata) or not isinstance(fqn, str):
            raise TrainauditError(mpath, f"unknown entry type for {fqn!r}")
        dtype = meta.properties.dtype
        shape = tuple(int(d) for d in meta.size)
        if not isinstance(dtype, torch.dtype) or any(d < 0 or d >= 1 << 62 for d in shape):
            raise TrainauditError(mpath, f"invalid dtype or shape for tensor {fqn!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > stored.get(fqn, 0):
            raise TrainauditError(mpath, f"tensor {fqn!r} declares {nbytes} bytes but {stored.get(fqn, 0)} "
                                         f"are stored for it")
        chunks[fqn] = _chunks(md, fqn, meta, shape, dtype.itemsize, mpath)
        tensors.append(DcpTensor(fqn, shape, str(dtype).removeprefix("torch.")))
    tensors.sort(key=lambda t: first.get(t.name, ("", 0)))
    return DcpInfo(p, tuple(tensors), tuple(skipped), md, chunks)


def _chunks(md: Any, fqn: str, meta: Any, shape: tuple[int, ...], itemsize: int,
            mpath: Path) -> tuple[DcpChunk, ...]:
    """The stored chunks of tensor `fqn`, each inside the tensor with its storage entry and bytes
    enough for its elements, together tiling the tensor: disjoint, volumes summing to its size."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    raw = getattr(meta, "chunks", None)
    if not isinstance(raw, (list, tuple)):
        raise TrainauditError(mpath, f"tensor {fqn!r} has no chunk list")
    out: list[DcpChunk] = []
    for c in raw:
        offsets, sizes = getattr(c, "offsets", None), getattr(c, "sizes", None)
        if not isinstance(offsets, (tuple, list)) or not isinstance(sizes, (tuple, list)) or \
                len(offsets) != len(shape) or len(sizes) != len(shape) or \
                not all(isinstance(v, int) and v >= 0 for v in (*offsets, *sizes)) or \
                any(o + n > d for o, n, d in zip(offsets, sizes, shape)):
            raise TrainauditError(mpath, f"tensor {fqn!r} of shape {list(shape)} has a chunk outside it "
                                         f"(offsets {_ints(offsets)}, sizes {_ints(sizes)})")
        info = md.storage_data.get(MetadataIndex(fqn, offsets))
        if info is None:
            raise TrainauditError(mpath, f"tensor {fqn!r}: no storage entry for its chunk at {list(offsets)}")
        if math.prod(sizes) * itemsize > info.length:
            raise TrainauditError(mpath, f"tensor {fqn!r}: chunk at {list(offsets)} declares "
                                         f"{math.prod(sizes) * itemsize} bytes but {info.length} are stored for it")
        out.append(DcpChunk(tuple(offsets), tuple(sizes), info.relative_path, info.offset, info.length,
                            bool(getattr(info, "transform_descriptors", None))))
    if sum(math.prod(c.sizes) for c in out) != math.prod(shape) or _overlap(out):
        raise TrainauditError(mpath, f"the {len(out)} chunks of tensor {fqn!r} do not tile its shape {list(shape)}")
    return tuple(out)


def _ints(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else repr(v)


def _overlap(chunks: Sequence[DcpChunk]) -> bool:
    """Whether two non-empty chunks share an element (boxes intersect in every dimension);
    compared a block of chunks against all at a time."""
    import numpy as np

    boxes = [c for c in chunks if math.prod(c.sizes) > 0]
    if len(boxes) < 2:
        return False
    lo = np.array([c.offsets for c in boxes], dtype=np.int64).reshape(len(boxes), -1)
    hi = lo + np.array([c.sizes for c in boxes], dtype=np.int64).reshape(len(boxes), -1)
    step = 256
    for i in range(0, len(boxes), step):
        meet = ((lo[i:i + step, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[i:i + step, None, :])).all(-1)
        meet[np.arange(meet.shape[0]), np.arange(i, i + meet.shape[0])] = False
        if meet.any():
            return True
    return False


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


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable stream of its own:
    ``torch.load`` finds the item's zip directory from the window's end, reads its storage
    straight into the tensor (``readinto``) and can never read past the item."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = offset + {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}[whence]
        if pos < 0:
            raise OSError("seek before the start of the stored item")
        self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), max(0, self._len - self._pos))
        done = 0
        if n:
            self._f.seek(self._start + self._pos)
        while done < n:
            k = self._f.readinto(mv[done:n])
            if not k:
                break
            done += k
        self._pos += done
        return done


def _load_chunk(f: Any, path: Path, name: str, c: DcpChunk, dtype: Any) -> Any:
    """One stored item as a tensor of the chunk's shape and the declared dtype, contiguous and
    owning exactly its bytes (``torch.load(weights_only=True)`` on the item's window)."""
    import torch

    where = f"tensor {name!r} (bytes {c.start}-{c.start + c.length})"
    try:
        obj = torch.load(_Window(f, c.start, c.length), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt item is a data error, named
        # torch's weights-only refusal goes on to advise turning that check off: never here
        msg = "not a tensor torch.load(weights_only=True) accepts" if isinstance(exc, pickle.UnpicklingError) \
            else str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise TrainauditError(path, f"cannot read {where} ({type(exc).__name__}{': ' + msg if msg else ''})") from None
    if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided:
        raise TrainauditError(path, f"{where} is stored as {type(obj).__name__}, not a dense tensor")
    t = obj.detach()
    del obj
    if t.dtype != dtype or tuple(t.shape) != c.sizes:
        raise TrainauditError(path, f"{where} is stored as {str(t.dtype).removeprefix('torch.')} "
                                    f"{list(t.shape)}, .metadata says {str(dtype).removeprefix('torch.')} "
                                    f"{list(c.sizes)}")
    if not t.is_contiguous():
        t = t.contiguous()
    elif t.untyped_storage().nbytes() != t.nbytes:   # a view of a larger stored storage
        t = t.clone()
    return t


class _Files:
    """The folder's ``.distcp`` files, opened (``open_regular``) on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.open: dict[str, Any] = {}

    def get(self, rel: str) -> Any:
        if rel not in self.open:
            f = open_regular(self.root / rel, self.root)
            try:  # items are read in storage order: let the kernel read ahead
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass
            self.open[rel] = f
        return self.open[rel]

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


def _load_tensor(info: DcpInfo, t: DcpTensor, files: _Files) -> Any:
    """Tensor `t`: its one stored item as loaded, or its chunks copied one by one into a tensor
    of its shape (each chunk freed before the next is loaded)."""
    import torch

    dtype = getattr(torch, t.dtype)
    chunks = info.chunks[t.name]
    if len(chunks) == 1 and chunks[0].sizes == t.shape:   # validated: then it is the whole tensor
        c = chunks[0]
        return _load_chunk(files.get(c.file), info.path / c.file, t.name, c, dtype)
    out = torch.empty(t.shape, dtype=dtype)
    for c in chunks:
        part = _load_chunk(files.get(c.file), info.path / c.file, t.name, c, dtype)
        out[tuple(slice(o, o + n) for o, n in zip(c.offsets, c.sizes))].copy_(part)
        del part
    return out


def _load_with_torch(info: DcpInfo, t: DcpTensor) -> Any:
    """Tensor `t` through ``torch.distributed.checkpoint.load`` into a fresh tensor of its shape,
    no process group (``no_dist``), torch's ``DefaultLoadPlanner``: for items written through
    stream transforms, which only torch's reader decodes (twice the tensor in memory)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    target = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
            dcp.load({t.name: target}, storage_reader=_reader(info),
                     planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False),
                     no_dist=True)
    except TrainauditError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt shard is a data error, named
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise TrainauditError(info.path, f"cannot read tensor {t.name!r} ({type(exc).__name__}"
                                         f"{': ' + msg if msg else ''})") from None
    return target


def iter_dcp_tensors(path: str | os.PathLike[str], names: Sequence[str] | None = None,
                     info: DcpInfo | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` one at a time in storage order (only `names` when given), each a fresh
    contiguous tensor of its declared shape and dtype, no process group (module docstring)."""
    info = info if info is not None else read_dcp_info(path)
    wanted = set(names) if names is not None else None
    files = _Files(info.path)
    try:
        for t in info.tensors:
            if wanted is not None and t.name not in wanted:
                continue
            if any(c.transformed for c in info.chunks[t.name]):
                tensor = _load_with_torch(info, t)
            else:
                tensor = _load_tensor(info, t, files)
            yield t.name, tensor
            del tensor
    finally:
        files.close()
