"""Tensors of one checkpoint by name, read one at a time into recycled buffers.

The weights task (`analyze.pipeline.weights_task`) reads every tensor of a checkpoint once and,
for the update ratio, the same tensor of the previous checkpoint in row blocks. A plain
``.safetensors`` file is read as ``loaders.safetensors_file`` reads it: header validated first, then
a plain read of one tensor's bytes (no mmap, so the resident set stays near one tensor). Other
kinds (torch pickles, HF folders, shards) go through one pass of
``loaders.checkpoints.iter_tensors``, keeping the named tensors.
"""
from __future__ import annotations

import math
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from loaders.errors import DataWarnings
from loaders.run import CheckpointRef

__all__ = ["ReadBuffers", "TensorReader", "ROW_BLOCK_ELEMENTS"]

ROW_BLOCK_ELEMENTS = 1 << 20  # elements per row block of `TensorReader.row_blocks` (~4 MB float32)


class ReadBuffers:
    """Read buffers recycled across the tensors of a task: a tensor's bytes land in memory this
    process already touched, so a read costs one copy, not a copy plus a page fault (and the
    kernel zeroing a fresh page) every 4 KB. Keeps at most `keep` idle buffers."""

    def __init__(self, keep: int = 3) -> None:
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._keep = keep

    def take(self, nbytes: int) -> torch.Tensor:
        """The smallest idle buffer of at least `nbytes` bytes, or a new one."""
        with self._lock:
            fits = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
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


class TensorReader:
    """Tensors of checkpoint `ref` by name, restricted to `names`; closed with ``close()``."""

    def __init__(self, ref: CheckpointRef, names: Sequence[str]) -> None:
        self.ref = ref
        self.path = Path(ref.path)
        self.names = set(names)
        self._file: Any = None
        self._kept: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors" and self.path.is_file():
            from loaders.checkpoints import checkpoint_info
            from loaders.safeio import open_regular
            from loaders.safetensors_file import check_safetensors_header

            self._prefix = checkpoint_info(ref).stripped_prefix
            self._header = check_safetensors_header(self.path)
            self._file = open_regular(self.path)
            (n,) = struct.unpack("<Q", self._file.read(8))
            self._base = 8 + n

    def get(self, name: str, buffers: ReadBuffers | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tensor, the recycled buffer it lives in or None); (None, None) when absent."""
        if self._file is not None:
            from loaders.safetensors_file import read_safetensors_tensor

            entry = self._header.get(self._prefix + name)
            if entry is None:
                return None, None
            begin, end = entry["data_offsets"]
            buf = buffers.take(end - begin) if buffers is not None else None
            return read_safetensors_tensor(self._file, self._base, self.path, name, entry, out=buf), buf
        return self._all().get(name), None

    def _all(self) -> dict[str, torch.Tensor]:
        if self._kept is None:
            from loaders.checkpoints import iter_tensors

            # partial: a missing or unreadable shard was already reported when the checkpoint was
            # planned (checkpoint_info); the tensors of the other shards are analysed (row B13)
            self._kept = {n: t for n, t in iter_tensors(self.ref, warnings=DataWarnings(), partial=True)
                          if n in self.names}
        return self._kept

    def row_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]] | None:
        """(first row, rows) blocks of ~4 MB covering tensor `name`, or None when it is absent or its
        shape is not `shape`. From a safetensors file each block is its own plain read, so the
        update ratio never holds a second copy of a large tensor."""
        if self._file is None:
            t = self._all().get(name)
            return None if t is None or tuple(t.shape) != shape else iter([(0, t)])
        entry = self._header.get(self._prefix + name)
        if entry is None or tuple(entry["shape"]) != shape or not shape:
            return None
        from loaders.safetensors_file import read_safetensors_tensor

        row_elems = max(1, math.prod(shape[1:]))
        step = max(1, ROW_BLOCK_ELEMENTS // row_elems)
        begin, end = entry["data_offsets"]
        buf = torch.empty(min(end - begin, step * ((end - begin) // shape[0] if shape[0] else 0)), dtype=torch.uint8)
        # One buffer for every block: each block is consumed before the next read overwrites it.
        return ((i, read_safetensors_tensor(self._file, self._base, self.path, name, entry,
                                            rows=(i, min(i + step, shape[0])), out=buf))
                for i in range(0, shape[0], step))

    def close(self) -> None:
        """Close the file and drop the tensors kept from a whole-checkpoint read."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._kept = None
