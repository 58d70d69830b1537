"""Checkpoint readers: safetensors, PyTorch state dicts, Hugging Face folders, sharded weights.

Untrusted files are the norm here (issue 6, bad-inputs.md groups A-C), so:

* safetensors headers are validated by ``check_safetensors_header`` before the safetensors
  library sees the file, so every error names the file and the tensor;
* ``torch.load`` is only ever called with ``weights_only=True`` (never retried without it).
  Globals the weights-only unpickler does not know are listed statically first
  (``torch.serialization.get_unsafe_globals_in_checkpoint``). Code-execution gadgets
  (``os``, ``subprocess``, ``builtins``, ``functools``, ``runpy`` ...) refuse the file. Any other
  unknown class (``argparse.Namespace``, numpy RNG state, a config object) is mapped to an inert
  ``Placeholder`` that accepts and discards its arguments, so the tensors beside it are still
  reachable and a warning lists what was not loaded (row C3);
* tensors are visited one at a time (``safe_open(...).get_tensor``, ``torch.load(mmap=True)``);
* Hugging Face side files that are plain pickles (``training_args.bin``, ``optimizer.pt``,
  ``rng_state.pth``, ``scheduler.pt``) are never opened.
"""
from __future__ import annotations

import json
import os
import pickle  # for its exception type only: nothing here unpickles without weights_only
import pickletools
import re
import struct
import warnings as _pywarnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef
from loaders.safeio import check_regular, open_regular, read_bounded

__all__ = [
    "CONTAINER_KEYS",
    "HF_SIDE_FILES",
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
    "skipped_side_files",
    "step_from_name",
    "step_metadata",
]

MAX_HEADER = 100_000_000            # safetensors' own limit on the JSON header (bytes)
MAX_INDEX = 64 << 20                # a sharded index JSON larger than this is refused
CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module")
PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Hugging Face Trainer pickles in checkpoint-N/ that hold no weights: never unpickled.
HF_SIDE_FILES = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt",
                 "scaler.pt", "rng_state.pth")
_HF_SIDE_RE = re.compile(r"^(rng_state(_\d+)?\.pth|optimizer(_\d+)?\.(pt|bin)|scheduler\.pt|scaler\.pt|"
                         r"training_args\.bin)$")
_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")

# safetensors dtype -> (bits per element, torch dtype name)
ST_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"), "F8_E8M0": (8, "float8_e8m0fnu"), "I16": (16, "int16"),
    "U16": (16, "uint16"), "F16": (16, "float16"), "BF16": (16, "bfloat16"), "I32": (32, "int32"),
    "U32": (32, "uint32"), "F32": (32, "float32"), "C64": (64, "complex64"), "F64": (64, "float64"),
    "I64": (64, "int64"), "U64": (64, "uint64"), "F4": (4, "float4_e2m1fn_x2"),
    "F6_E2M3": (6, "float6_e2m3"), "F6_E3M2": (6, "float6_e3m2"),
}

# Module roots whose globals in a pickle mean "this file tries to run code": refuse the file.
_GADGET_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "builtins", "__builtin__", "runpy", "functools", "importlib",
    "sys", "shutil", "pty", "socket", "code", "codeop", "ctypes", "pickle", "_pickle", "marshal",
    "webbrowser", "operator", "pdb", "platform", "multiprocessing", "asyncio", "types", "inspect",
    "io", "_io", "tempfile", "signal", "threading", "_thread", "urllib", "http", "ftplib", "smtplib",
    "commands", "popen2", "dill", "cloudpickle", "timeit", "trace", "cProfile", "profile", "bdb",
    "_posixsubprocess", "ensurepip", "pip", "setuptools", "distutils", "zipimport", "imp", "site",
    "_operator", "_functools", "copyreg", "_codecs", "codecs", "gc", "weakref",
})
# Callables that act on the world whatever module they come from (pathlib.Path.write_text, numpy.load).
_GADGET_NAMES = frozenset({
    "system", "popen", "exec", "execfile", "eval", "compile", "open", "write_text", "write_bytes", "unlink",
    "rmdir", "rmtree", "remove", "rename", "replace", "chmod", "chown", "symlink_to", "hardlink_to", "touch",
    "mkdir", "__import__", "getattr", "setattr", "delattr", "import_module", "load", "loads", "call",
    "check_call", "check_output", "run", "spawn", "fork", "kill", "startfile", "__reduce__", "__reduce_ex__",
})


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


class Placeholder:
    """Inert stand-in for a pickled object of an unknown class: takes anything, does nothing."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<not loaded>"


# --------------------------------------------------------------------------- small helpers

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


def _refuse_lfs(path: Path) -> None:
    if is_lfs_pointer(path):
        raise TrainauditError(path, "Git LFS pointer file, not the weights (run `git lfs pull`)")


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
    """``CheckpointRef.kind`` for a path: safetensors | sharded-safetensors | hf-dir | torch."""
    p = Path(path)
    if p.is_dir():
        return "hf-dir"
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


# --------------------------------------------------------------------------- safetensors

class _NoDupObject:
    """``object_pairs_hook`` refusing duplicate names."""

    def __init__(self) -> None:
        self.dup: str | None = None

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs) and self.dup is None:
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.dup = k
                    break
                seen.add(k)
        return d


def check_safetensors_header(path: str | os.PathLike[str],
                             root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Validate a safetensors file's header before the library touches it; return the header.

    Checks (bad-inputs.md B1-B11): size, header length bounds, UTF-8, JSON object, duplicate
    names, known dtype, non-negative shape, shape x dtype == byte span, offsets contiguous with
    no gap or overlap and covering the data exactly, metadata values are strings. Raises
    ``TrainauditError("<path>: <problem> (tensor <name>)")``. Only the header is read.
    """
    p = Path(path)
    _refuse_lfs(p)
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
    hook = _NoDupObject()
    try:
        header = json.loads(text, object_pairs_hook=hook)
    except (ValueError, RecursionError) as e:
        raise TrainauditError(p, f"not a safetensors file (header is not valid JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise TrainauditError(p, f"not a safetensors file (header is a JSON {type(header).__name__}, not an object)")
    if hook.dup is not None:
        raise TrainauditError(p, f"duplicate name in header (tensor {hook.dup})")
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


def _st_infos(header: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str, int]]:
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
    two GPT-2-small checkpoints); a read keeps the peak near the largest tensor (issue 7,
    target 5), and a row range lets a caller stream a tensor in blocks of a few MB. `out`: a
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


def _st_iter(p: Path, header: dict[str, Any], root: Path | None) -> Iterator[tuple[str, Any]]:
    """Tensors of a validated safetensors file, one at a time, in storage order."""
    from loaders.safeio import open_regular

    f = open_regular(p, root)
    with f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, _shape, _dtype, _begin in _st_infos(header):
            yield name, read_safetensors_tensor(f, 8 + n, p, name, header[name])


# --------------------------------------------------------------------------- torch.load

def _allowed_by_torch() -> set[str]:
    """Globals the weights-only unpickler accepts by default (private torch API; empty if it moves)."""
    try:
        from torch import _weights_only_unpickler as wou
        return set(wou._get_allowed_globals().keys())
    except Exception:  # noqa: BLE001 - only used to word messages and pick placeholders
        return set()


def _pickle_globals(path: Path) -> list[str]:
    """Globals named in a raw or legacy (non-zip) pickle, found statically with ``pickletools``.

    Nothing is executed; at most the first six pickles are scanned (legacy ``torch.save`` writes
    magic number, protocol, system info, the object, then storage keys, then raw bytes).
    """
    found: list[str] = []
    try:
        f = open_regular(path)
    except TrainauditError:
        return []
    with f:
        for _ in range(6):
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - the end of the pickles (raw storage bytes) or damage
                break
    allowed = _allowed_by_torch()
    out: list[str] = []
    for g in found:
        if g not in out and g not in allowed:
            out.append(g)
    return out


def _is_gadget(name: str) -> bool:
    """A global that only a file trying to run code would name (policy: refuse the whole file)."""
    return name.split(".", 1)[0] in _GADGET_MODULES or name.rsplit(".", 1)[-1] in _GADGET_NAMES


def _unsupported(names: list[str]) -> str:
    s = "s" if len(names) > 1 else ""
    return f"unsupported global{s} {', '.join(names)} (not loaded)"


def load_torch_object(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                      warnings: DataWarnings | None = None) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu", mmap=<zip format>)`` made safe.

    Raises ``TrainauditError`` for gadgets ("unsupported global posix.system (not loaded)"),
    truncated or corrupt files ("truncated or corrupt checkpoint"), LFS pointers. Unknown
    non-gadget classes become ``Placeholder`` objects, listed in one warning.
    """
    import torch

    p = Path(path)
    st = check_regular(p, root)
    if st.st_size == 0:
        raise TrainauditError(p, "truncated or corrupt checkpoint (empty file)")
    _refuse_lfs(p)
    with open_regular(p, root) as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise TrainauditError(p, "numpy array file, not a checkpoint (never loaded: object arrays would need pickle)")
    is_zip = magic[:4] == b"PK\x03\x04"
    if is_zip:
        try:
            unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        except Exception:  # noqa: BLE001 - a damaged archive
            raise TrainauditError(p, "truncated or corrupt checkpoint (zip archive unreadable)") from None
    else:
        unsafe = _pickle_globals(p)
    gadgets = [g for g in unsafe if _is_gadget(g)]
    if gadgets:
        raise TrainauditError(p, _unsupported(gadgets))
    stubs = [(Placeholder, g) for g in unsafe]
    try:
        with _pywarnings.catch_warnings():
            _pywarnings.simplefilter("ignore")
            with torch.serialization.safe_globals(stubs):
                obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        names = [m.group(1)] if m else unsafe
        if names:
            raise TrainauditError(p, _unsupported(names)) from None
        detail = next((ln.strip() for ln in msg.splitlines()
                       if ln.strip().startswith(("Unsupported", "Can only", "Trying"))),
                      "the weights-only unpickler refused it")
        raise TrainauditError(p, f"cannot load safely ({detail}); not loaded") from None
    except EOFError:
        raise TrainauditError(p, "truncated or corrupt checkpoint (unexpected end of file)") from None
    except Exception as e:  # noqa: BLE001 - any failure inside torch.load on an untrusted file means corrupt
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise TrainauditError(p, f"truncated or corrupt checkpoint ({type(e).__name__}: {first})") from None
    if unsafe and warnings is not None:
        warnings.add(p, f"objects of {', '.join(unsafe)} not loaded (placeholders; tensors read)")
    return obj


def _is_tensor(v: Any) -> bool:
    import torch
    return isinstance(v, torch.Tensor)


def _flatten(d: Mapping[str, Any], prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(k, str):
            continue
        if _is_tensor(v):
            out[prefix + k] = v
        elif isinstance(v, Mapping) and depth < 3:
            out.update(_flatten(v, f"{prefix}{k}.", depth + 1))
    return out


def _has_tensor(d: Any, depth: int = 0) -> bool:
    if not isinstance(d, Mapping):
        return False
    return any(_is_tensor(v) or (depth < 3 and _has_tensor(v, depth + 1)) for v in d.values())


def _find_state_dict(obj: Any, p: Path) -> tuple[dict[str, Any], str]:
    """Tensors of a loaded checkpoint and where they were (row C4): a container key or "" (top)."""
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            v = obj.get(key)
            if isinstance(v, Mapping) and _has_tensor(v):
                direct = {k: t for k, t in v.items() if isinstance(k, str) and _is_tensor(t)}
                if direct:
                    return direct, key
                inner, sub = _find_state_dict(v, p)
                return inner, f"{key}.{sub}" if sub else key
        flat = _flatten(obj)
        if flat:
            return flat, ""
    if _is_tensor(obj):
        return {"tensor": obj}, ""
    looked = ", ".join(CONTAINER_KEYS)
    raise TrainauditError(p, f"no tensors found (looked under: {looked}, top level)")


# --------------------------------------------------------------------------- names

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


# --------------------------------------------------------------------------- sources

@dataclass(frozen=True, slots=True)
class _Part:
    path: Path
    fmt: str  # "safetensors" | "torch"


@dataclass(slots=True)
class _Source:
    path: Path
    kind: str
    parts: list[_Part]
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


def _resolve(ref_or_path: CheckpointRef | str | os.PathLike[str], root: str | os.PathLike[str] | None) -> _Source:
    p = Path(ref_or_path.path if isinstance(ref_or_path, CheckpointRef) else ref_or_path)
    r = Path(root) if root is not None else None
    if p.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (p / name).exists() or (p / name).is_symlink():
                q = p / name
                break
        else:
            sts = sorted(x for x in os.listdir(p) if x.endswith(".safetensors"))
            if len(sts) == 1:
                q = p / sts[0]
            else:
                raise TrainauditError(p, f"no weights found (looked for: {', '.join(_HF_WEIGHT_FILES)})")
        src = _resolve(q, r if r is not None else _hub_root(p))
        return _Source(p, "hf-dir", src.parts, src.root, src.missing, src.index_names)
    if p.name.endswith(".index.json"):
        folder = p.parent
        shards, missing, names = _read_index(p, r if r is not None else folder)
        fmt = "safetensors" if p.name.endswith(".safetensors.index.json") else "torch"
        parts = [_Part(folder / s, "safetensors" if s.endswith(".safetensors") else "torch")
                 for s in shards if s not in missing]
        kind = "sharded-safetensors" if fmt == "safetensors" else "torch"
        return _Source(p, kind, parts, r if r is not None else folder, missing, names)
    if p.suffix == ".safetensors":
        return _Source(p, "safetensors", [_Part(p, "safetensors")], r)
    return _Source(p, "torch", [_Part(p, "torch")], r)


def _missing_error(src: _Source) -> TrainauditError:
    parts = [f"{what} shard{'s' if len(names) > 1 else ''} {', '.join(names)}"
             for what, names in (("missing", src.missing), ("unreadable", src.unreadable)) if names]
    return TrainauditError(src.path, f"{'; '.join(parts)} (the other shards were read)")


def _shard_header(src: _Source, part: _Part, warnings: DataWarnings | None, *, skip: bool) -> dict[str, Any] | None:
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


# --------------------------------------------------------------------------- public API

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
    src = _resolve(ref_or_path, root)
    if src.index_names is not None:
        rename, _ = _strip(src.index_names, src.path, warnings)
    else:
        rename = None
    for part in src.parts:
        if part.fmt == "safetensors":
            header = _shard_header(src, part, warnings, skip=partial)
            if header is None:
                continue
            names = [r[0] for r in _st_infos(header)]
            ren = rename if rename is not None else _strip(names, part.path, warnings)[0]
            for name, t in _st_iter(part.path, header, src.root):
                yield ren.get(name, name), t
        else:
            obj = load_torch_object(part.path, root=src.root, warnings=warnings)
            sd, _key = _find_state_dict(obj, part.path)
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
            raise _missing_error(src)
        if warnings is not None:
            warnings.add(src.path, str(_missing_error(src).problem))


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
    src = _resolve(ref_or_path, root)
    rename = _strip(src.index_names, src.path, warnings)[0] if src.index_names is not None else None
    infos: list[TensorInfo] = []
    tied: list[tuple[str, str]] = []
    n_params = 0
    container: str | None = None
    prefix = ""
    meta: dict[str, Any] = {}
    for part in src.parts:
        if part.fmt == "safetensors":
            header = _shard_header(src, part, warnings, skip=True)
            if header is None:
                continue
            meta.update(header.get("__metadata__") or {})
            rows = _st_infos(header)
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
        else:
            obj = load_torch_object(part.path, root=src.root, warnings=warnings)
            sd, container = _find_state_dict(obj, part.path)
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
        warnings.add(src.path, str(_missing_error(src).problem))
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
        src = _resolve(p, root)
        if not src.parts:
            return {}
        p = src.parts[0].path
        root = src.root
    if p.suffix == ".safetensors":
        return dict(check_safetensors_header(p, root).get("__metadata__") or {})
    obj = load_torch_object(p, root=root)
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
