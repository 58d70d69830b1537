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
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointCache", "CachedCheckpoint", "checkpoint_fingerprint"]


@dataclass(frozen=True, slots=True)
class CachedCheckpoint:
    """What one checkpoint contributed: table rows by table name and warm-start vectors."""

    rows: dict[str, list[dict[str, Any]]]
    vectors: dict[str, torch.Tensor]
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        jpath, vpath = self._paths(step, key)
        try:
            doc = json.loads(jpath.read_text(encoding="utf-8"))
            from safetensors.torch import load_file

            vectors = load_file(str(vpath)) if vpath.exists() else {}
            if doc.get("key") != key:
                raise ValueError("key mismatch")
            entry = CachedCheckpoint(rows={k: list(v) for k, v in doc["rows"].items()},
                                     vectors=dict(vectors), notes=[str(n) for n in doc.get("notes", [])],
                                     warnings=[str(w) for w in doc.get("warnings", [])],
                                     failed=str(doc.get("failed") or ""))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            self.misses += 1
            return None
        self.hits += 1
        return entry

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


def _default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)
