"""A loaded run kept in the report's cache folder, so a second report on an unchanged big log does
not parse its text again.

Parsing a 2M-line JSONL log costs seconds; reading its columns back from `.npy` files costs
milliseconds. An entry is `<cache>/run-<key>.json` (the Run's fields, and per table its columns:
numbers and booleans as `.npy` files, text columns as their distinct values plus int32 codes)
next to `run-<key>-<table>-<column>.npy` files. The key covers everything the load depends on:
the run path, the size and mtime_ns of every file under it (a report folder inside the run is
skipped: writing the report must not invalidate the entry), the `--format` override and the
source of this package (a changed reader reads again). The JSON is written last and atomically,
so a half-written entry is never read. Nothing is unpickled (`np.load(allow_pickle=False)`), and
a run whose fields this format cannot hold exactly is simply not cached.

Only runs with at least `MIN_ROWS` training rows are cached: below that, parsing is as fast as
reading an entry back.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings
from loaders.run import CheckpointRef, ModelSpec, Run
from loaders.safeio import write_atomic

__all__ = ["MIN_ROWS", "run_cache_key", "load_cached_run", "store_run", "cached_loader"]

MIN_ROWS = 100_000
_TABLES = ("scalars", "train", "evals", "class_losses", "eval_class_losses", "grad_norms")
_FORMAT = 1
_SOURCE_DIGEST: str | None = None


class _NotCacheable(Exception):
    """A value this format cannot hold exactly: the run is not cached."""


def _source_digest() -> str:
    """Digest of this package's source: a changed reader invalidates every entry."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def run_cache_key(run_path: str | os.PathLike[str], fmt: str | None, skip: str | os.PathLike[str] | None = None) -> str:
    """Key of a run as it is on disk now (see the module docstring); `skip` is a folder left out."""
    p = Path(run_path).resolve()
    skip_dir = Path(skip).resolve() if skip is not None else None
    parts = [str(p), str(fmt), _source_digest(), str(_FORMAT)]
    try:
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames if skip_dir is None or (here / d).resolve() != skip_dir)
                for name in sorted(filenames):
                    st = (here / name).stat()
                    parts.append(f"{(here / name).relative_to(p)}|{st.st_size}|{st.st_mtime_ns}")
        else:
            st = p.stat()
            parts.append(f"{st.st_size}|{st.st_mtime_ns}")
    except OSError as exc:  # unreadable now: a key that never matches; the loader says why
        parts.append(f"error:{exc}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _training_rows(run: Run) -> int:
    wide = object.__getattribute__(run, "train")
    return len(wide) if wide is not None else len(object.__getattribute__(run, "scalars"))


# ----------------------------------------------------------------------------- writing


def _encode(value: Any, frames: dict[str, pd.DataFrame]) -> Any:
    """A field value as JSON; frames are stored beside it and named by reference."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, pd.DataFrame):
        name = f"meta{len(frames)}"
        frames[name] = value
        return {"__frame__": name}
    if isinstance(value, list):
        return [_encode(v, frames) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, frames) for k, v in value.items()}}
    raise _NotCacheable(type(value).__name__)


def _frame_doc(df: pd.DataFrame, stem: Path, name: str) -> dict[str, Any]:
    """Write each column of `df` as `.npy` and describe the frame."""
    cols = []
    for i, col in enumerate(df.columns):
        if not isinstance(col, str):
            raise _NotCacheable("column name")
        s = df.iloc[:, i]
        file = f"{stem.name}-{name}-{i}.npy"
        if isinstance(s.dtype, np.dtype) and s.dtype.kind in "biuf":
            np.save(stem.parent / file, s.to_numpy(), allow_pickle=False)
            cols.append({"name": col, "kind": "array", "file": file})
            continue
        if isinstance(s.dtype, pd.CategoricalDtype):  # its own categories, in their order
            codes, values = s.cat.codes.to_numpy(), list(s.cat.categories)
        else:
            codes, uniques = pd.factorize(s, use_na_sentinel=True)
            values = list(uniques.astype(object))
        if not all(isinstance(v, str) for v in values):
            raise _NotCacheable(f"column {col}")
        np.save(stem.parent / file, codes.astype(np.int32), allow_pickle=False)
        cols.append({"name": col, "kind": "codes", "file": file, "values": values, "dtype": str(s.dtype)})
    return {"rows": len(df), "columns": cols}


def store_run(run: Run, key: str, folder: str | os.PathLike[str]) -> bool:
    """Keep `run` under `key` in `folder` when it is big enough and every field fits the format.
    Returns whether it was stored; a full or read-only disk only costs the next report time."""
    if _training_rows(run) < MIN_ROWS:
        return False
    folder = Path(folder)
    stem = folder / f"run-{key}"
    frames: dict[str, pd.DataFrame] = {}
    try:
        doc: dict[str, Any] = {
            "format": _FORMAT, "path": str(run.path), "name": run.name, "source_format": run.source_format,
            "meta": _encode(run.meta, frames),
            "checkpoints": [[int(c.step), str(c.path), c.kind] for c in run.checkpoints],
            "class_names": _encode(list(run.class_names), frames),
            "model": None if run.model is None else [run.model.name, _encode(run.model.config, frames)],
            "eval_set_path": None if run.eval_set_path is None else str(run.eval_set_path),
            "window_averaged": {str(k): int(v) for k, v in run.window_averaged.items()},
            "warnings": [str(w) for w in run.warnings], "notes": [str(n) for n in run.notes],
            "not_analysed": _encode(list(run.not_analysed), frames),
        }
        for t in _TABLES:
            df = object.__getattribute__(run, t)
            if df is not None and not (t == "scalars" and object.__getattribute__(run, "train") is not None):
                frames[t] = df
        folder.mkdir(parents=True, exist_ok=True)
        doc["frames"] = {name: _frame_doc(df, stem, name) for name, df in frames.items()}
        for old in folder.glob("run-*"):  # one entry per report folder: the newest
            if not old.name.startswith(stem.name):
                old.unlink(missing_ok=True)
        write_atomic(stem.with_suffix(".json"), json.dumps(doc), what="cache")
    except (_NotCacheable, OSError, ValueError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------- reading


def _frame(doc: dict[str, Any], folder: Path) -> pd.DataFrame:
    data = {}
    for c in doc["columns"]:
        arr = np.load(folder / c["file"], allow_pickle=False)
        if len(arr) != doc["rows"]:
            raise ValueError("column length")
        if c["kind"] == "codes":
            values = c["values"]
            if c["dtype"] == "category":
                arr = pd.Categorical.from_codes(arr, categories=values)
            else:
                obj = np.array([*values, None], dtype=object)[np.where(arr < 0, len(values), arr)]
                arr = pd.Series(obj, dtype=c["dtype"], copy=False)  # object stays object, not str
        data[c["name"]] = arr
    return pd.DataFrame(data, copy=False)


def _decode(value: Any, frames: dict[str, pd.DataFrame]) -> Any:
    if isinstance(value, list):
        return [_decode(v, frames) for v in value]
    if isinstance(value, dict):
        if "__frame__" in value:
            return frames[value["__frame__"]]
        if "__path__" in value:
            return Path(value["__path__"])
        if "__float__" in value:
            return float(value["__float__"])
        return {k: _decode(v, frames) for k, v in value["__dict__"].items()}
    return value


def load_cached_run(key: str, folder: str | os.PathLike[str]) -> Run | None:
    """The run stored under `key`, or None when there is none (or it cannot be read back)."""
    folder = Path(folder)
    path = folder / f"run-{key}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != _FORMAT:
            return None
        frames = {name: _frame(f, folder) for name, f in doc["frames"].items()}
        warnings = DataWarnings()
        warnings.extend(doc["warnings"])
        model = doc["model"]
        run = Run(
            path=Path(doc["path"]), name=doc["name"], source_format=doc["source_format"],
            meta=_decode(doc["meta"], frames),
            scalars=frames.get("scalars"), train=frames.get("train"),
            checkpoints=[CheckpointRef(int(s), Path(p), k) for s, p, k in doc["checkpoints"]],
            class_names=_decode(doc["class_names"], frames),
            model=None if model is None else ModelSpec(model[0], _decode(model[1], frames)),
            eval_set_path=None if doc["eval_set_path"] is None else Path(doc["eval_set_path"]),
            window_averaged=dict(doc["window_averaged"]), warnings=warnings, notes=list(doc["notes"]),
            not_analysed=_decode(doc["not_analysed"], frames),
        )
        for t in ("evals", "class_losses", "eval_class_losses", "grad_norms"):
            if t in frames:
                setattr(run, t, frames[t])
        return run
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def cached_loader(load: Callable[[], Run], run_path: str | os.PathLike[str], fmt: str | None,
                  folder: str | os.PathLike[str] | None, skip: str | os.PathLike[str] | None = None) -> Run:
    """`load()` unless `folder` holds this run unchanged; a fresh big run is stored there."""
    if folder is None:
        return load()
    key = run_cache_key(run_path, fmt, skip)
    run = load_cached_run(key, folder)
    if run is None:
        run = load()
        store_run(run, key, folder)
    return run
