"""Torch checkpoint files loaded safely, and the state dict found inside what they hold.

``torch.load`` is only ever called with ``weights_only=True`` (never retried without it).
Globals the weights-only unpickler does not know are listed statically first
(``torch.serialization.get_unsafe_globals_in_checkpoint``, or ``pickletools`` for a legacy
pickle). Code-execution gadgets (``os``, ``subprocess``, ``builtins``, ``functools``, ``runpy``
...) refuse the file. Any other unknown class (``argparse.Namespace``, numpy RNG state, a
config object) is mapped to an inert ``Placeholder`` that accepts and discards its arguments, so
the tensors beside it are still reachable and a warning lists what was not loaded (row C3).
"""
from __future__ import annotations

import os
import pickle  # for its exception type only: nothing here unpickles without weights_only
import pickletools
import re
import warnings as _pywarnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.safeio import check_regular, open_regular
from loaders.safetensors_file import refuse_lfs

__all__ = ["CONTAINER_KEYS", "TORCH_SUFFIXES", "Placeholder", "find_state_dict", "load_torch_object"]

CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

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
    refuse_lfs(p)
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


def find_state_dict(obj: Any, p: Path) -> tuple[dict[str, Any], str]:
    """Tensors of a loaded checkpoint and where they were (row C4): a container key or "" (top)."""
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            v = obj.get(key)
            if isinstance(v, Mapping) and _has_tensor(v):
                direct = {k: t for k, t in v.items() if isinstance(k, str) and _is_tensor(t)}
                if direct:
                    return direct, key
                inner, sub = find_state_dict(v, p)
                return inner, f"{key}.{sub}" if sub else key
        flat = _flatten(obj)
        if flat:
            return flat, ""
    if _is_tensor(obj):
        return {"tensor": obj}, ""
    looked = ", ".join(CONTAINER_KEYS)
    raise TrainauditError(p, f"no tensors found (looked under: {looked}, top level)")
