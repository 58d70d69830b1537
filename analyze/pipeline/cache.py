"""Per-checkpoint result cache in the report's output folder.

A checkpoint's rows (spectral, activations, dead units, attention, ...) and the warm-start
vectors it hands to the next checkpoint are stored under a key made of the checkpoint's
path, size and mtime_ns, the analysis config hash and the previous checkpoint's key (the
warm start chains checkpoints, so a changed earlier checkpoint invalidates the later ones).
A second report on an unchanged run recomputes nothing. A checkpoint that could not be read is
cached as failed (its warnings and the error), so it is not re-read either; it does not move the
chain (the next checkpoint's key uses the last readable one), exactly like the analysis itself.

Files: `<folder>/step_XXXXXXXX-<key>.safetensors` (vectors) and `.json` (rows), the JSON
written last, both atomically, so a half-written entry is never read.

Reading an entry imports no torch (the vectors come back as numpy arrays, `as_tensors` turns
them into tensors for a warm start), so a report served wholly from the cache starts fast.
`load_doc` / `store_doc` keep other results the same way (`<name>-<key>.json`: the pipeline's
per-class tables of the logs, computed with torch).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loaders.errors import TrainauditError
from loaders.safeio import write_atomic

if TYPE_CHECKING:  # torch only for writing an entry, or for a warm start from one (`as_tensors`)
    import torch

__all__ = ["CheckpointCache", "CachedCheckpoint", "checkpoint_fingerprint", "as_tensors", "json_text", "write_tables"]


@dataclass(frozen=True, slots=True)
class CachedCheckpoint:
    """What one checkpoint contributed: table rows by table name and warm-start vectors (numpy
    arrays; torch tensors for a dtype numpy lacks; `as_tensors` gives tensors either way)."""

    rows: dict[str, list[dict[str, Any]]]
    vectors: dict[str, np.ndarray | torch.Tensor]
    notes: list[str]
    warnings: list[str]
    failed: str = ""  # the checkpoint was unreadable: the error, and nothing else is stored


def checkpoint_fingerprint(path: Path) -> str:
    """Path, size and mtime_ns of a checkpoint file, or of every file in a checkpoint folder."""
    path = Path(path)
    parts: list[str] = []
    try:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    parts.append(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}")
        else:
            st = path.stat()
            parts.append(f"{st.st_size}|{st.st_mtime_ns}")
    except OSError as e:  # unreadable now: a key that never matches, the reader will say why
        parts.append(f"error:{e}")
    return f"{path.resolve()}::" + ";".join(parts)


def as_tensors(vectors: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cached warm-start vectors as torch tensors (the same dtype, shape and bits)."""
    import torch

    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in vectors.items()}


def _load_vectors(path: Path) -> dict[str, np.ndarray | torch.Tensor]:
    """The vectors file as numpy arrays: the same safetensors checks as its torch reader, without
    importing torch. A file numpy cannot hold (bfloat16) goes to the torch reader, whose answer
    (tensors, or the error) is then the one that counts."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception:  # noqa: BLE001 - the torch reader below decides, exactly as before
        from safetensors.torch import load_file as load_torch

        return dict(load_torch(str(path)))


def _write_atomic(path: Path, data: bytes) -> None:
    """``loaders.safeio.write_atomic``; its error is an ``OSError`` here, which every caller
    catches: a cache that cannot be written only costs time, never the analysis."""
    try:
        write_atomic(path, data, what="cache entry")
    except TrainauditError as exc:
        raise OSError(str(exc)) from None


class CheckpointCache:
    """Read and write cached per-checkpoint results; `folder=None` disables caching."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(checkpoint_path: Path, config_key: str, prev_key: str | None) -> str:
        text = "\n".join((checkpoint_fingerprint(checkpoint_path), config_key, prev_key or "-"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _paths(self, step: int, key: str) -> tuple[Path, Path]:
        assert self.folder is not None
        stem = f"step_{int(step):08d}-{key}"
        return self.folder / f"{stem}.json", self.folder / f"{stem}.safetensors"

    def load(self, step: int, key: str) -> CachedCheckpoint | None:
        """The cached entry, or None (missing, disabled or unreadable: then it is recomputed)."""
        if self.folder is None:
            return None
        from safetensors import SafetensorError  # a damaged vectors file (not an OSError)

        jpath, vpath = self._paths(step, key)
        try:
            doc = json.loads(jpath.read_text(encoding="utf-8"))
            vectors = _load_vectors(vpath) if vpath.exists() else {}
            if doc.get("key") != key:
                raise ValueError("key mismatch")
            entry = CachedCheckpoint(rows={k: list(v) for k, v in doc["rows"].items()},
                                     vectors=dict(vectors), notes=[str(n) for n in doc.get("notes", [])],
                                     warnings=[str(w) for w in doc.get("warnings", [])],
                                     failed=str(doc.get("failed") or ""))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def load_doc(self, name: str, key: str) -> Any | None:
        """A JSON entry `<name>-<key>.json` written by `store_doc`, or None (missing, disabled,
        unreadable). For results other than a checkpoint's (not counted as hits or misses)."""
        if self.folder is None:
            return None
        try:
            doc = json.loads((self.folder / f"{name}-{key}.json").read_text(encoding="utf-8"))
            return doc["value"] if doc.get("key") == key else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def store_doc(self, name: str, key: str, value: Any) -> None:
        """Write `value` (plain JSON: NaN and infinities allowed, floats exact) as `<name>-<key>.json`
        and drop the other `<name>-*.json` entries."""
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.folder / f"{name}-{key}.json",
                          json_text({"key": key, "value": value}).encode())
            for old in self.folder.glob(f"{name}-*.json"):
                if old.name != f"{name}-{key}.json":
                    old.unlink(missing_ok=True)
        except OSError:
            return  # only costs time, as in `store`

    def count_misses(self, n: int) -> None:
        """Count `n` checkpoints recomputed without a lookup (after the first miss the chain is new)."""
        self.misses += max(0, n)

    def store(self, step: int, key: str, rows: Mapping[str, list[dict[str, Any]]],
              vectors: Mapping[str, torch.Tensor], notes: list[str], warnings: list[str] = (),
              failed: str = "") -> None:
        """Write one entry (vectors, then the JSON that makes it visible) and drop stale ones."""
        if self.folder is None:
            return
        from safetensors.torch import save

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in vectors.items()}
        doc = {"key": key, "step": int(step), "rows": {k: list(v) for k, v in rows.items()}, "notes": list(notes),
               "warnings": list(warnings), "failed": failed}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            jpath, vpath = self._paths(step, key)
            _write_atomic(vpath, save(tensors))
            _write_atomic(jpath, json.dumps(doc, default=_default).encode())
            for old in self.folder.glob(f"step_{int(step):08d}-*"):
                if key not in old.name:
                    old.unlink(missing_ok=True)
        except OSError:
            # The cache only saves time: a full or read-only disk must not lose the analysis.
            # The report write that follows meets the same disk and says so in one line.
            return


TABLE_STAMPS = "tables.json"


def write_tables(tables: Mapping[str, Any], folder: Path, cache_dir: Path | None) -> list[str]:
    """Write each table as `<folder>/<name>.csv` unless the file there was written by this function
    from the same table (same digest of the table's native data - `reports.page.table_digest` -
    and the file's size and mtime_ns unchanged): a 2M-row log table costs seconds to format,
    milliseconds to hash. The stamps live in `<cache_dir>/tables.json`. Returns the names written."""
    from loaders.csvtable import write_csv_table
    from reports.page import table_digest

    stamps: dict[str, Any] = {}
    path = None if cache_dir is None else Path(cache_dir) / TABLE_STAMPS
    if path is not None:
        try:
            stamps = dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            stamps = {}
    written, fresh = [], {}
    for name, df in tables.items():
        target = Path(folder) / f"{name}.csv"
        digest = table_digest(df)
        old = stamps.get(name)
        try:
            st = target.stat()
            same = isinstance(old, list) and old == [digest, st.st_size, st.st_mtime_ns]
        except OSError:
            same = False
        if not same:
            write_csv_table(target, df, what="report")  # df.to_csv(index=False), formatted by column
            written.append(name)
            try:
                st = target.stat()
            except OSError:
                continue
        fresh[name] = [digest, st.st_size, st.st_mtime_ns]
    if path is not None and fresh != stamps:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(fresh).encode())
        except OSError:
            pass  # only costs time next run
    return written


def json_text(value: Any) -> str:
    """`value` as the cache writes it: JSON, numpy / torch scalars as numbers, floats exact."""
    return json.dumps(value, default=_default)


def _default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)
