"""One safetensors file read safely: the header validated before any byte of data is trusted.

``check_safetensors_header`` checks what the safetensors library would otherwise trust
(bad-inputs.md B1-B11), so every error names the file and the tensor; ``read_safetensors_tensor``
reads one tensor (or a range of its rows) with pread(2), never mapping the whole file.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loaders.errors import TrainauditError
from loaders.lines import DuplicateKeys
from loaders.safeio import check_regular, open_regular

__all__ = ["MAX_HEADER", "ST_DTYPES", "check_safetensors_header", "is_lfs_pointer", "iter_safetensors",
           "read_safetensors_tensor", "refuse_lfs", "safetensors_entries"]

MAX_HEADER = 100_000_000            # safetensors' own limit on the JSON header (bytes)


# safetensors dtype -> (bits per element, torch dtype name)
ST_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"), "F8_E8M0": (8, "float8_e8m0fnu"), "I16": (16, "int16"),
    "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "bfloat16"), "I32": (32, "int32"),
    "U32": (32, "uint32"), "F32": (32, "float32"), "C64": (64, "complex64"), "F64": (64, "float64"),
    "I64": (64, "int64"), "U64": (64, "uint64"), "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, "float6_e2m3"), "F6_E3M2": (6, "float6_e3m2"),
}


def is_lfs_pointer(path: str | os.PathLike[str]) -> bool:
    """True when the file is a Git LFS pointer (the real file was never pulled)."""
    try:
        st = check_regular(path)
    except TrainauditError:
        return False
    if st.st_size > 1024:
        return False
    with open_regular(path) as f:
        head = f.read(64)
    return head.startswith(b"version https://git-lfs.github.com/spec/")


def refuse_lfs(path: Path) -> None:
    if is_lfs_pointer(path):
        raise TrainauditError(path, "Git LFS pointer file, not the weights (run `git lfs pull`)")


def check_safetensors_header(path: str | os.PathLike[str],
                             root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Validate a safetensors file's header before the library touches it; return the header.

    Checks (bad-inputs.md B1-B11): size, header length bounds, UTF-8, JSON object, duplicate
    names, known dtype, non-negative shape, shape x dtype == byte span, offsets contiguous with
    no gap or overlap and covering the data exactly, metadata values are strings. Raises
    ``TrainauditError("<path>: <problem> (tensor <name>)")``. Only the header is read.
    """
    p = Path(path)
    refuse_lfs(p)
    with open_regular(p, root) as f:
        size = f.snapshot_size  # type: ignore[attr-defined]
        if size < 8:
            raise TrainauditError(p, f"file too small to be safetensors ({size} bytes)")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise TrainauditError(p, f"not a safetensors file (header too large: {n} bytes)")
        if 8 + n > size:
            raise TrainauditError(p, f"header length {n} exceeds file size {size}")
        raw = f.read(n)
    if len(raw) != n:
        raise TrainauditError(p, "file shrank while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TrainauditError(p, "not a safetensors file (header is not UTF-8)") from None
    hook = DuplicateKeys()
    try:
        header = json.loads(text, object_pairs_hook=hook)
    except (ValueError, RecursionError) as e:
        raise TrainauditError(p, f"not a safetensors file (header is not valid JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise TrainauditError(p, f"not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
    if hook.dups:
        raise TrainauditError(p, f"duplicate name in header (tensor {hook.dups[0]})")
    meta = header.get("__metadata__", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise TrainauditError(p, "metadata is not a JSON object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise TrainauditError(p, f"metadata value for {k!r} is not a string")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise TrainauditError(p, f"invalid header entry (tensor {name})")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise TrainauditError(p, f"unknown dtype {dtype!r} (tensor {name})")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise TrainauditError(p, f"invalid shape {shape!r} (tensor {name})")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs) or
                offs[1] < offs[0]):
            raise TrainauditError(p, f"invalid offset for tensor {name}")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * ST_DTYPES[dtype][0]
        if bits % 8:
            raise TrainauditError(p, f"shape does not fill whole bytes (tensor {name})")
        if bits // 8 != offs[1] - offs[0]:
            raise TrainauditError(p, f"shape x dtype ({bits // 8} bytes) does not match the data span "
                                     f"({offs[1] - offs[0]} bytes) (tensor {name})")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin < expected:
            raise TrainauditError(p, f"invalid offset for tensor {name} (overlaps the previous tensor)")
        if begin > expected:
            raise TrainauditError(p, f"invalid offset for tensor {name} (gap of {begin - expected} bytes before it)")
        expected = end
    if expected > data_len:
        last = spans[-1][2]
        raise TrainauditError(p, f"data ends at byte {expected} but the file holds {data_len} "
                                 f"(truncated?) (tensor {last})")
    if expected < data_len:
        raise TrainauditError(p, f"incomplete metadata, file not fully covered "
                                 f"({data_len - expected} bytes after the last tensor)")
    return header


def safetensors_entries(header: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(name, shape, torch dtype, begin offset) in storage order."""
    rows = [(k, tuple(v["shape"]), ST_DTYPES[v["dtype"]][1], v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"]
    rows.sort(key=lambda r: r[3])
    return rows


def read_safetensors_tensor(f: Any, base: int, path: Path, name: str, entry: dict[str, Any],
                            rows: tuple[int, int] | None = None, out: Any = None) -> Any:
    """One tensor of a validated safetensors file, or rows ``[start, stop)`` of its first dimension.

    `f` is the open file, `base` the offset of the data section (8 + header length), `entry`
    the tensor's header entry. The bytes are read with pread(2) straight into an uninitialised
    tensor (no zero-filled staging buffer, no copy). Not `safe_open`: it maps the whole file, and
    every page touched stays in the process's resident set until the file is closed (+958 MB on
    two GPT-2-small checkpoints); a read keeps the peak near the largest tensor,
    and a row range lets a caller stream a tensor in blocks of a few MB. `out`: a
    1-D uint8 tensor of at least the tensor's size to read into (a recycled buffer costs no page
    faults); the result is then a view of it.
    """
    import torch

    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    dtype = getattr(torch, ST_DTYPES[entry["dtype"]][1], None)
    if dtype is None:
        raise TrainauditError(path, f"dtype {entry['dtype']} not supported by this torch (tensor {name})")
    if rows is not None:
        start, stop = rows
        if not shape or not 0 <= start <= stop <= shape[0] or (end - begin) % max(shape[0], 1):
            raise TrainauditError(path, f"cannot read rows {start}:{stop} of tensor {name} with shape {list(shape)}")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        begin, end, shape = begin + start * row_bytes, begin + stop * row_bytes, (stop - start, *shape[1:])
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    if out is not None and out.dtype == torch.uint8 and out.ndim == 1 and out.numel() >= end - begin:
        raw = out[: end - begin]
    else:
        raw = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(raw.numpy()).cast("B")
    fd, done = f.fileno(), 0
    while done < len(view):  # a single read may return less than asked (2 GiB cap, signals)
        got = os.preadv(fd, [view[done:]], base + begin + done)
        if got == 0:
            raise TrainauditError(path, f"truncated while reading tensor {name}")
        done += got
    return raw.view(dtype).reshape(shape)


def iter_safetensors(p: Path, header: dict[str, Any], root: Path | None) -> Iterator[tuple[str, Any]]:
    """Tensors of a validated safetensors file, one at a time, in storage order."""
    f = open_regular(p, root)
    with f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, _shape, _dtype, _begin in safetensors_entries(header):
            yield name, read_safetensors_tensor(f, 8 + n, p, name, header[name])
