"""Tensors of one checkpoint read one at a time into recycled buffers, upcast block-wise.

Two readers over the same file layer (``loaders.safetensors_file``: header validated first, then a
plain pread of one tensor's bytes, never an mmap, so the resident set stays near one tensor):

- ``TensorStream``: every tensor of a checkpoint in storage order (shards in index order), read
  ahead by a background thread, half-precision tensors (bf16, fp16, fp8) converted to float32
  block by block into a recycled buffer, and an optional per-block reducer (the caller's fused
  norms) run on each block while it is in cache. Used by ``audit`` and ``spectral``.
- ``TensorReader``: tensors by name (the report's weights task, which reads a group of tensors and
  the same tensors of the previous checkpoint in row blocks for the update ratio).

Why recycled buffers: a fresh 46 MB tensor costs ~11,000 page faults, each with the kernel
zeroing a page; measured on a 5632 x 2048 bf16 matrix, ``.to(torch.float32)`` takes 84 ms and a
``copy_`` into a buffer the process already touched 3 ms (one thread, torch 2.13).
Other kinds (torch pickles, DCP folders) go through ``loaders.checkpoints.iter_tensors``, one
tensor at a time, and are upcast into the same buffers.

Over 400 lines on purpose: both readers share the buffer pool and the block-wise upcast, whose
correctness depends on the two staying in step.
"""
from __future__ import annotations

import math
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from loaders.checkpoint_files import ref_path
from loaders.errors import DataWarnings, TrainauditError

if TYPE_CHECKING:  # loaders.run imports pandas: reading a checkpoint never needs it
    from loaders.run import CheckpointRef

__all__ = ["ReadBuffers", "TensorReader", "TensorStream", "StreamItem", "BlockReducer", "ROW_BLOCK_ELEMENTS",
           "RECYCLE_MIN", "UPCAST_DTYPES", "safetensors_locations"]

ROW_BLOCK_ELEMENTS = 1 << 20  # elements per row block of `TensorReader.row_blocks` (~4 MB float32)
CONVERT_BLOCK = 1 << 18       # elements converted (and reduced) at a time: 1 MB of float32 stays in cache
RECYCLE_MIN = 1 << 16         # tensors with fewer elements get their own memory (a caller may keep them)
READ_AHEAD_FRACTION = 4       # TensorStream reads ahead while waiting items hold < largest tensor / this
_WIDENED = ("F16", "BF16", "F8_E5M2", "F8_E4M3")   # safetensors dtypes held as float32 once upcast
UPCAST_DTYPES = (torch.float16, torch.bfloat16) + tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n))


class ReadBuffers:
    """Read buffers recycled across the tensors of a task: a tensor's bytes land in memory this
    process already touched, so a read costs one copy, not a copy plus a page fault (and the
    kernel zeroing a fresh page) every 4 KB. Keeps at most `keep` idle buffers."""

    def __init__(self, keep: int = 3) -> None:
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._keep = keep

    def take(self, nbytes: int) -> torch.Tensor:
        """The smallest idle buffer of at least `nbytes` bytes and at most 4x that (a small tensor
        never ties up the buffer a large one will need), or a new one."""
        with self._lock:
            fits = [i for i, b in enumerate(self._idle) if nbytes <= b.numel() <= 4 * nbytes]
            if fits:
                return self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor | None) -> None:
        """Return a buffer once nothing aliases it any more."""
        if buf is None:
            return
        with self._lock:
            self._idle.append(buf)
            self._idle.sort(key=torch.Tensor.numel, reverse=True)
            del self._idle[self._keep:]


class BlockReducer(Protocol):
    """A caller's reduction over a tensor, fed float32 (or float64) blocks in order."""

    def add(self, block: torch.Tensor) -> None: ...

    def result(self) -> Any: ...


def _upcast(t: torch.Tensor, buffers: ReadBuffers | None, reducer: BlockReducer | None, upcast: bool,
            inplace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`t` as float32 when it is a half type (block by block into a recycled buffer), feeding
    `reducer` each block while it is in cache (blocks in any order). Returns (tensor, buffer it
    lives in or None).

    `inplace`: the uint8 buffer `t`'s bytes were read into, at its start, with room for the
    float32 result. The conversion then widens in place from the last block to the first: block
    [i, j) reads bytes [2i, 2j) and writes [4i, 4j), never bytes of a block not yet converted, and
    only the first block overlaps itself (it is copied out first). No second buffer is needed.
    """
    convert = upcast and t.dtype in UPCAST_DTYPES
    if not convert and (reducer is None or not t.is_floating_point()):
        return t, None
    flat_in = t.reshape(-1)
    n = flat_in.numel()
    buf = None
    if convert and inplace is not None and inplace.numel() >= 4 * n and flat_in.element_size() == 2 \
            and flat_in.data_ptr() == inplace.data_ptr():
        buf = inplace
        out = buf[: 4 * n].view(torch.float32)
        starts = range(0, n, CONVERT_BLOCK)[::-1]
    else:
        inplace = None
        if convert:
            if buffers is not None and n >= RECYCLE_MIN:
                buf = buffers.take(4 * n)
                out = buf[: 4 * n].view(torch.float32)
            else:
                out = torch.empty(n, dtype=torch.float32)
        else:
            out = flat_in
        starts = range(0, n, CONVERT_BLOCK)
    for i in starts:
        blk = out[i: i + CONVERT_BLOCK]
        if convert:
            src = flat_in[i: i + CONVERT_BLOCK]
            blk.copy_(src.clone() if inplace is not None and 2 * i < i + src.numel() else src)
        if reducer is not None:
            reducer.add(blk)
    return out.view(t.shape), buf


# --------------------------------------------------------------------------- where tensors are


@dataclass(frozen=True, slots=True)
class _Loc:
    name: str                 # normalised (prefixes stripped)
    path: Path                # the safetensors file
    entry: dict[str, Any]     # its header entry
    order: int                # position of the file in the checkpoint


@dataclass(slots=True)
class _Files:
    """Open safetensors files with their data offsets, opened on first use."""

    root: Path | None
    open: dict[Path, tuple[Any, int]] = field(default_factory=dict)

    def get(self, path: Path) -> tuple[Any, int]:
        if path not in self.open:
            from loaders.safeio import open_regular

            f = open_regular(path, self.root)
            (n,) = struct.unpack("<Q", f.read(8))
            try:  # a cold file is read in order: let the kernel read ahead generously
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (AttributeError, OSError):
                pass
            self.open[path] = (f, 8 + n)
        return self.open[path]

    def close(self) -> None:
        for f, _ in self.open.values():
            f.close()
        self.open.clear()


def safetensors_locations(ref_or_path: CheckpointRef | str | os.PathLike[str], *,
                          warnings: DataWarnings | None = None, partial: bool = False,
                          ) -> tuple[list[_Loc], Any] | None:
    """Every tensor of a safetensors-only checkpoint (one file, an HF folder or a sharded index)
    in storage order: shards in index order, each by offset. None for other kinds. Shards that are
    missing or unreadable are left out and recorded on the returned source (``missing``,
    ``unreadable``; with `partial` an unreadable one is also a warning); a single file that
    cannot be read raises."""
    from loaders.checkpoint_files import resolve, shard_header
    from loaders.checkpoints import _strip
    from loaders.safetensors_file import safetensors_entries

    try:
        src = resolve(ref_or_path, None)
    except TrainauditError:
        if _is_dcp(ref_or_path):
            return None
        raise
    if not src.parts or any(part.fmt != "safetensors" for part in src.parts):
        return None
    rename = _strip(src.index_names, src.path, warnings)[0] if src.index_names is not None else None
    locs: list[_Loc] = []
    for k, part in enumerate(src.parts):
        # an unreadable shard of a sharded checkpoint is left out and recorded on `src`: the caller
        # reads the others first and then raises (or, with `partial`, warns: bad-inputs.md B13)
        header = shard_header(src, part, warnings if partial else None, skip=True)
        if header is None:
            continue
        rows = safetensors_entries(header)
        ren = rename if rename is not None else _strip([r[0] for r in rows], part.path, warnings)[0]
        locs.extend(_Loc(ren.get(r[0], r[0]), part.path, header[r[0]], k) for r in rows)
    return locs, src


def _is_dcp(ref_or_path: CheckpointRef | str | os.PathLike[str]) -> bool:
    p = ref_path(ref_or_path)
    return p.is_dir() and (p / ".metadata").is_file()


def _read(files: _Files, loc: _Loc, buffers: ReadBuffers | None, rows: tuple[int, int] | None = None,
          out: torch.Tensor | None = None, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tensor (or rows of it) by pread; with `buffers`, a tensor of at least RECYCLE_MIN
    elements lands at the start of a recycled buffer, which for a 2-byte type read for `upcast`
    has room for its float32 version (`_upcast` widens it in place)."""
    from loaders.safetensors_file import ST_DTYPES, read_safetensors_tensor

    f, base = files.get(loc.path)
    begin, end = loc.entry["data_offsets"]
    buf = None
    if out is None and buffers is not None and math.prod(loc.entry["shape"]) >= RECYCLE_MIN:
        wide = upcast and ST_DTYPES[loc.entry["dtype"]][0] == 16 and loc.entry["dtype"] in ("F16", "BF16")
        buf = out = buffers.take(2 * (end - begin) if wide else end - begin)
    return read_safetensors_tensor(f, base, loc.path, loc.name, loc.entry, rows=rows, out=out), buf


# --------------------------------------------------------------------------- by name


class TensorReader:
    """Tensors of checkpoint `ref` by name, restricted to `names`; closed with ``close()``.

    Safetensors checkpoints (one file, HF folder, sharded index) are read tensor by tensor with
    pread; other kinds through one pass of ``iter_tensors`` keeping the named tensors.
    """

    def __init__(self, ref: CheckpointRef, names: Sequence[str], *, upcast: bool = True) -> None:
        self.ref = ref
        self.path = Path(ref.path)
        self.names = set(names)
        self.upcast = upcast
        self._kept: dict[str, torch.Tensor] | None = None
        # partial: a missing or unreadable shard was already reported when the checkpoint was
        # planned (checkpoint_info); the tensors of the other shards are analysed (row B13)
        found = safetensors_locations(ref, warnings=DataWarnings(), partial=True)
        self._locs: dict[str, _Loc] | None = None
        self._files: _Files | None = None
        self._dcp: tuple[Any, dict[str, str]] | None = None   # (DcpInfo, name -> stored name)
        if found is not None:
            self._locs = {loc.name: loc for loc in found[0] if loc.name in self.names}
            self._files = _Files(found[1].root)
        elif _is_dcp(ref):
            from loaders.checkpoints import _strip
            from loaders.dcp import read_dcp_info

            info = read_dcp_info(self.path)
            ren = _strip([t.name for t in info.tensors], self.path, None)[0]
            self._dcp = (info, {new: old for old, new in ren.items() if new in self.names})

    def get(self, name: str, buffers: ReadBuffers | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tensor, the recycled buffer it lives in or None); (None, None) when absent. Half
        types come back as float32 (converted into a buffer from `buffers`)."""
        if self._locs is None or self._files is None:
            t = self._all().get(name)
            return (None, None) if t is None else _upcast(t, buffers, None, self.upcast)
        loc = self._locs.get(name)
        if loc is None:
            return None, None
        t, raw = _read(self._files, loc, buffers, upcast=self.upcast)
        out, buf = _upcast(t, buffers, None, self.upcast, inplace=raw)
        if buf is None or buf is raw:
            return out, raw
        if buffers is not None:
            buffers.give(raw)
        return out, buf

    def _all(self) -> dict[str, torch.Tensor]:
        if self._dcp is not None:  # a DCP folder: only the tensor asked for, never the whole model
            return _OneDcpTensor(*self._dcp)  # type: ignore[return-value]
        if self._kept is None:
            from loaders.checkpoints import iter_tensors

            self._kept = {n: t for n, t in iter_tensors(self.ref, warnings=DataWarnings(), partial=True)
                          if n in self.names}
        return self._kept

    def row_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]] | None:
        """(first row, rows) blocks of ~4 MB covering tensor `name`, or None when it is absent or its
        shape is not `shape`. From a safetensors file each block is its own plain read, so the
        update ratio never holds a second copy of a large tensor; half types are upcast."""
        if self._locs is None or self._files is None:
            t = self._all().get(name)
            if t is None or tuple(t.shape) != shape:
                return None
            return iter([(0, t.float() if self.upcast and t.dtype in UPCAST_DTYPES else t)])
        loc = self._locs.get(name)
        if loc is None or tuple(loc.entry["shape"]) != shape or not shape:
            return None
        files = self._files
        row_elems = max(1, math.prod(shape[1:]))
        step = max(1, ROW_BLOCK_ELEMENTS // row_elems)
        begin, end = loc.entry["data_offsets"]
        buf = torch.empty(min(end - begin, step * ((end - begin) // shape[0] if shape[0] else 0)), dtype=torch.uint8)

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            # One buffer for every block: each block is consumed before the next read overwrites it.
            for i in range(0, shape[0], step):
                t, _ = _read(files, loc, None, rows=(i, min(i + step, shape[0])), out=buf)
                yield i, t.float() if self.upcast and t.dtype in UPCAST_DTYPES else t
        return blocks()

    def close(self) -> None:
        """Close the files and drop the tensors kept from a whole-checkpoint read."""
        if self._files is not None:
            self._files.close()
        self._kept = None


class _OneDcpTensor:
    """``.get(name)`` of a DCP folder, loading that one tensor (loaders.dcp)."""

    def __init__(self, info: Any, stored: dict[str, str]) -> None:
        self.info, self.stored = info, stored

    def get(self, name: str) -> torch.Tensor | None:
        from loaders.dcp import iter_dcp_tensors

        if name not in self.stored:
            return None
        return next((t for _, t in iter_dcp_tensors(self.info.path, [self.stored[name]], info=self.info)), None)


# --------------------------------------------------------------------------- the stream


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One tensor of a `TensorStream`: `tensor` (float32 when it was a half type), the dtype it
    was stored in, and the reducer's result (None without one)."""

    name: str
    tensor: torch.Tensor
    stored_dtype: str
    reduced: Any = None


class TensorStream:
    """Every tensor of a checkpoint, in storage order, read ahead (module docstring).

    Iterate once; ``close()`` (or leaving a ``with`` block) stops the reader thread and closes the
    files. A tensor of at least ``RECYCLE_MIN`` elements lives in a recycled buffer that is
    overwritten once the *next* item is taken: keep it with ``.clone()``. Smaller tensors are
    the caller's. Besides the caller's item, the reader holds one waiting item, or several while
    they total under a quarter of the largest tensor (safetensors, whose sizes are known first:
    a big tensor's read then overlaps the compute of the small ones before it), plus the one it
    is reading: at most 2.25 times the largest tensor in float32.

    `reducer`: a zero-argument factory of `BlockReducer`; each floating tensor's blocks are fed to
    a fresh one in the reader thread and its ``result()`` lands in ``StreamItem.reduced``.
    A shard named by the index but missing or unreadable raises ``TrainauditError`` after the
    other tensors were yielded (bad-inputs.md B13), or with `partial` is a warning.
    """

    def __init__(self, ref_or_path: CheckpointRef | str | os.PathLike[str], *, warnings: DataWarnings | None = None,
                 partial: bool = False, upcast: bool = True, reducer: Callable[[], BlockReducer] | None = None,
                 names: Sequence[str] | None = None) -> None:
        self.ref = ref_or_path
        self.warnings = warnings
        self.partial = partial
        self.upcast = upcast
        self.reducer = reducer
        self.names = set(names) if names is not None else None
        self._buffers = ReadBuffers(keep=3)
        self._ahead_bytes = 0       # set once the tensors' sizes are known (safetensors)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files: _Files | None = None

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _items(self) -> Iterator[tuple[str, torch.Tensor, str, torch.Tensor | None]]:
        """(name, tensor as stored, dtype name, recycled buffer it lives in or None) in storage
        order; safetensors by pread."""
        found = safetensors_locations(self.ref, warnings=self.warnings, partial=self.partial)
        if found is None:
            from loaders.checkpoints import iter_tensors

            for name, t in iter_tensors(self.ref, warnings=self.warnings, partial=self.partial):
                if self.names is None or name in self.names:
                    yield name, t, str(t.dtype).removeprefix("torch."), None
            return
        locs, src = found
        self._files = _Files(src.root)
        held = [math.prod(loc.entry["shape"]) * 4 if self.upcast and loc.entry["dtype"] in _WIDENED
                else loc.entry["data_offsets"][1] - loc.entry["data_offsets"][0]
                for loc in locs if self.names is None or loc.name in self.names]
        self._ahead_bytes = max(held, default=0) // READ_AHEAD_FRACTION
        for loc in locs:
            if self._stop.is_set():
                return
            if self.names is not None and loc.name not in self.names:
                continue
            t, raw = _read(self._files, loc, self._buffers, upcast=self.upcast)
            yield loc.name, t, str(t.dtype).removeprefix("torch."), raw
        if src.missing or src.unreadable:
            from loaders.checkpoint_files import missing_error

            if not self.partial:
                raise missing_error(src)
            if self.warnings is not None:
                self.warnings.add(src.path, str(missing_error(src).problem))

    def __iter__(self) -> Iterator[StreamItem]:
        # The reader starts the next read while at most one item waits for the caller, or while
        # the waiting items hold less than `_ahead_bytes` (known for safetensors: a quarter of the
        # largest tensor), so that a big tensor's read overlaps the compute of the small ones
        # queued before it. The caller's item is not counted: it frees its buffer on the next ask.
        waiting: list[int] = []     # bytes held by each item prepared and not yet taken
        room = threading.Condition()
        ready: queue.Queue[Any] = queue.Queue()
        stop = self._stop

        def may_read() -> bool:
            return len(waiting) <= 1 or sum(waiting) < self._ahead_bytes

        def produce() -> None:
            try:
                items = self._items()
                while True:
                    with room:
                        while not may_read():
                            room.wait(timeout=0.1)
                            if stop.is_set():
                                return
                    if stop.is_set():
                        return
                    nxt = next(items, None)
                    if nxt is None:
                        break
                    name, t, dtype, raw = nxt
                    red = self.reducer() if self.reducer is not None and t.is_floating_point() else None
                    out, buf = _upcast(t, self._buffers, red, self.upcast, inplace=raw)
                    if buf is None:
                        buf = raw  # not converted: the item lives in its read buffer
                    elif buf is not raw:
                        self._buffers.give(raw)  # converted elsewhere: the stored bytes are no longer needed
                    del t
                    size = buf.numel() if buf is not None else out.nbytes
                    with room:
                        waiting.append(size)
                    ready.put((True, StreamItem(name, out, dtype, red.result() if red is not None else None), buf))
                ready.put((True, None, None))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                ready.put((False, exc, None))

        self._thread = threading.Thread(target=produce, name="trainaudit-tensor-stream", daemon=True)
        self._thread.start()
        held: torch.Tensor | None = None
        try:
            while True:
                self._buffers.give(held)
                held = None
                ok, item, buf = ready.get()
                if not ok:
                    raise item
                if item is None:
                    return
                with room:
                    waiting.pop(0)
                    room.notify()
                held = buf
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
        if self._files is not None:
            self._files.close()
            self._files = None
