"""TensorBoard event files (optional extra ``[tensorboard]``): every scalar record, CRC-checked.

TensorBoard's own ``EventAccumulator`` keeps a reservoir sample by default and stops silently at
a corrupt record. This reader walks the TFRecord framing itself (uint64 length, masked CRC-32C
of the length, payload, masked CRC-32C of the payload) and decodes each payload with
TensorBoard's ``event_pb2`` protobuf, so (bad-inputs.md D15, D16):

* every record is read (no sampling);
* a torn tail keeps all complete records and warns; a payload that fails its CRC stops the
  file with ``"record k at offset X fails CRC; N bytes unread"``;
* a corrupt length (e.g. 2^60) is checked against the bytes left before anything is allocated;
* several event files of one resumed run are merged in time order by the rewind policy.
"""
from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loaders.checkpoint_layout import checkpoints_beside
from loaders.errors import DataWarnings, TrainauditError
from loaders.longtables import TRAIN_ALIASES, Triples, build_run, classify_train_key, is_val_loss_key
from loaders.run import Run
from loaders.safeio import open_regular

__all__ = ["crc32c", "find_event_files", "iter_records", "masked_crc32c", "read_event_scalars", "read_tensorboard"]

INSTALL_HINT = "reading TensorBoard files needs the tensorboard package: pip install trainaudit[tensorboard]"
_SPLIT_DIRS = {"train": "train", "training": "train", "validation": "validation", "val": "val",
               "eval": "eval", "valid": "valid"}


def _make_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def _crc32c_py(data: bytes) -> int:
    crc = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # a C implementation when one is installed; the pure-Python table otherwise
    from crc32c import crc32c as _crc_fast  # type: ignore[import-not-found]
except ImportError:
    try:
        from google_crc32c import value as _crc_fast  # type: ignore[import-not-found]
    except ImportError:
        _crc_fast = None


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    return _crc_fast(data) if _crc_fast is not None else _crc32c_py(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC TFRecord stores: rotate right by 15 and add a constant."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_NP_TABLE = None
_VECTOR_MAX_LEN = 512   # records up to this length are CRC-checked in vectorised batches
_VECTOR_MIN_COUNT = 8   # ... when at least this many share a length


def _masked_crc_batch(mat: Any) -> Any:
    """Masked CRC-32C of each row of a (k, n) uint8 matrix, one numpy step per byte column."""
    import numpy as np

    global _NP_TABLE
    if _NP_TABLE is None:
        _NP_TABLE = np.asarray(_TABLE, dtype=np.uint32)
    crc = np.full(mat.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for j in range(mat.shape[1]):
        crc = _NP_TABLE[(crc ^ mat[:, j]) & 0xFF] ^ (crc >> np.uint32(8))
    x = crc ^ np.uint32(0xFFFFFFFF)
    return ((x >> np.uint32(15)) | (x << np.uint32(17))) + np.uint32(0xA282EAD8)  # wraps mod 2^32


def _first_bad(buf: Any, offs: Any, lens: Any) -> tuple[int | None, bool]:
    """Index of the first record whose length CRC or payload CRC fails (and whether it was the
    length), checking same-length records together."""
    import numpy as np

    k = len(offs)
    if k == 0:
        return None, False
    heads = buf[(offs[:, None] + np.arange(8)).ravel()].reshape(k, 8)
    stored = buf[(offs[:, None] + 8 + np.arange(4)).ravel()].reshape(k, 4).copy().view("<u4").ravel()
    bad_len = np.flatnonzero(_masked_crc_batch(heads) != stored)
    first_len = int(bad_len[0]) if len(bad_len) else k
    bad_data = k
    ends = offs + 12 + lens
    stored_d = buf[(ends[:, None] + np.arange(4)).ravel()].reshape(k, 4).copy().view("<u4").ravel()
    for n in np.unique(lens[:first_len]):
        idx = np.flatnonzero(lens[:first_len] == n)
        if n <= _VECTOR_MAX_LEN and len(idx) >= _VECTOR_MIN_COUNT:
            mat = buf[((offs[idx] + 12)[:, None] + np.arange(n)).ravel()].reshape(len(idx), int(n))
            bad = idx[_masked_crc_batch(mat) != stored_d[idx]]
        else:
            bad = [i for i in idx if masked_crc32c(bytes(buf[offs[i] + 12:offs[i] + 12 + n])) != stored_d[i]]
        if len(bad):
            bad_data = min(bad_data, int(bad[0]))
    first = min(first_len, bad_data)
    return (None, False) if first == k else (first, first == first_len)


def iter_records(path: str | os.PathLike[str], warnings: DataWarnings, *,
                 root: str | os.PathLike[str] | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Yield ``(record index, offset, payload)`` of a TFRecord file up to the first bad record.

    The framing is walked first (lengths checked against the bytes left, so a corrupt length
    allocates nothing), then every CRC is verified, same-length records in numpy batches; only
    records before the first failure are yielded, and the failure is warned about.
    """
    import mmap

    import numpy as np

    p = Path(path)
    with open_regular(p, root) as f:
        size = f.snapshot_size  # type: ignore[attr-defined]
        if size == 0:
            return
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            offs_l: list[int] = []
            lens_l: list[int] = []
            off = 0
            stop: str | None = None
            unpack = struct.unpack_from
            while off < size:
                if size - off < 12:
                    stop = f"record {len(offs_l)} at offset {off} incomplete (torn tail); {size - off} bytes unread"
                    break
                (n,) = unpack("<Q", mm, off)
                if n + 16 > size - off:
                    if masked_crc32c(mm[off:off + 8]) != unpack("<I", mm, off + 8)[0]:
                        stop = (f"record {len(offs_l)} at offset {off} fails CRC (length field); "
                                f"{size - off} bytes unread")
                    else:
                        stop = (f"record {len(offs_l)} at offset {off} incomplete (length {n} exceeds the "
                                f"{size - off - 12} bytes left); {size - off} bytes unread")
                    break
                offs_l.append(off)
                lens_l.append(n)
                off += 16 + n
            buf = np.frombuffer(mm, dtype=np.uint8)
            try:
                bad, in_length = _first_bad(buf, np.asarray(offs_l, dtype=np.int64),
                                            np.asarray(lens_l, dtype=np.int64))
            finally:
                del buf  # release the buffer export, or the mmap cannot close
            for k in range(len(offs_l) if bad is None else bad):
                o, n = offs_l[k], lens_l[k]
                yield k, o, mm[o + 12:o + 12 + n]
            if bad is not None:
                o = offs_l[bad]
                what = "fails CRC (length field)" if in_length else "fails CRC"
                warnings.add(p, f"record {bad} at offset {o} {what}; {size - o} bytes unread")
            elif stop is not None:
                warnings.add(p, stop)


def _event_pb2(path: str | os.PathLike[str] | None = None) -> Any:
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        raise TrainauditError(path, INSTALL_HINT) from None
    return event_pb2


def _tensor_scalar(v: Any) -> float | None:
    """A scalar stored as a TensorProto (TF2 summaries): its single value, else None."""
    t = v.tensor
    if len(t.tensor_shape.dim) != 0 and not (len(t.tensor_shape.dim) == 1 and t.tensor_shape.dim[0].size == 1):
        return None
    for field in ("float_val", "double_val", "half_val", "int_val", "int64_val"):
        vals = getattr(t, field)
        if len(vals):
            return float(vals[0])
    if t.tensor_content:
        import numpy as np
        dt = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}.get(t.dtype)
        if dt is not None and len(t.tensor_content) == np.dtype(dt).itemsize:
            return float(np.frombuffer(t.tensor_content, dtype=dt)[0])
    return None


def read_event_scalars(path: str | os.PathLike[str], warnings: DataWarnings, *,
                       root: str | os.PathLike[str] | None = None, tag_prefix: str = "") -> list[tuple[int, str, float, float]]:
    """All scalar values of one event file: ``(step, tag, value, wall_time)`` in file order."""
    event_pb2 = _event_pb2(path)
    from google.protobuf.message import DecodeError

    out: list[tuple[int, str, float, float]] = []
    bad = 0
    for k, off, data in iter_records(path, warnings, root=root):
        try:
            ev = event_pb2.Event.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            bad += 1
            if bad <= 5:
                warnings.add(path, f"record {k} at offset {off} is not an Event; skipped")
            continue
        if not ev.HasField("summary"):
            continue
        for v in ev.summary.value:
            kind = v.WhichOneof("value")
            if kind == "simple_value":
                val: float | None = v.simple_value
            elif kind == "tensor" and v.metadata.plugin_data.plugin_name in ("scalars", ""):
                val = _tensor_scalar(v)
            else:
                val = None
            if val is not None:
                out.append((ev.step, tag_prefix + v.tag, val, ev.wall_time))
    if bad > 5:
        warnings.add(path, f"{bad - 5} more records that are not Events skipped")
    return out


_TS_RE = re.compile(r"tfevents\.(\d+)")
_VERSION_RE = re.compile(r"^version_(\d+)$")


def _file_order(p: Path) -> tuple[int, list[tuple[int, str]]]:
    """Creation timestamp in the name, then a natural sort (writer counter .9 before .10)."""
    m = _TS_RE.search(p.name)
    natural = [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", p.name) if t]
    return (int(m.group(1)) if m else 0, natural)


def find_event_files(folder: str | os.PathLike[str], max_depth: int = 3) -> list[Path]:
    """Event files (names containing ``tfevents``) in a folder and its sub-folders (no symlinked dirs)."""
    out: list[Path] = []
    base = Path(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        depth = len(Path(dirpath).relative_to(base).parts)
        dirnames[:] = sorted(d for d in dirnames if depth < max_depth and not (Path(dirpath) / d).is_symlink())
        out.extend(Path(dirpath) / n for n in filenames if "tfevents" in n)
    return out


def _pick_tags(tags: list[str]) -> dict[str, str]:
    """tag -> canonical training series, one tag per series by alias priority."""
    chosen: dict[str, str] = {}
    for series, aliases in TRAIN_ALIASES.items():
        order = {a.lower(): i for i, a in enumerate(aliases)}
        cands = [t for t in tags if classify_train_key(t) == series]
        if cands:
            best = min(cands, key=lambda t: (order.get(t.lower(), len(order)), t))
            chosen[best] = series
    return chosen


def read_tensorboard(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """One event file, or a folder of them (one resumed run: merged in time order) -> ``Run``, with
    the checkpoints in a ``checkpoints/`` folder beside the event files or in the run folder
    (Lightning's ``version_N/checkpoints/``, a writer's ``logs/`` beside ``checkpoints/``)."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    _event_pb2(p)
    files = [p] if p.is_file() else find_event_files(p)
    if not files:
        raise TrainauditError(p, "no TensorBoard event files (names containing 'tfevents')")
    root = p if p.is_dir() else None
    files = _newest_version(p, files, warnings)
    rows: list[tuple[int, str, float, float]] = []
    for f in sorted(files, key=_file_order):
        prefix = ""
        if root is not None and f.parent != p and f.parent.name.lower() in _SPLIT_DIRS:
            prefix = _SPLIT_DIRS[f.parent.name.lower()] + "/"  # Keras: train/ and validation/ sub-folders
        try:
            rows.extend(read_event_scalars(f, warnings, root=root, tag_prefix=prefix))
        except TrainauditError as e:
            if e.problem == INSTALL_HINT:
                raise
            warnings.add(f, e.problem)
    tags = sorted({t for _, t, _, _ in rows})
    chosen = _pick_tags(tags)
    train, evals, extra = Triples(), Triples(), Triples()
    for step, tag, val, _wall in rows:
        if tag in chosen:
            train.add(step, chosen[tag], val)
        elif is_val_loss_key(tag):
            evals.add(step, tag, val)
        else:
            extra.add(step, tag, val)
    meta: dict[str, Any] = {"event_files": [str(f) for f in sorted(files, key=_file_order)],
                            "tags": tags, "train_tags": {v: k for k, v in chosen.items()}}
    meta["extra_scalars"] = extra.frame("value", p, DataWarnings())
    notes = []
    window: dict[str, int] = {}
    loss_tag = next((t for t, s in chosen.items() if s == "loss"), None)
    if loss_tag == "train/loss" and "train/epoch" in tags and "train/learning_rate" in tags:
        # Written by the Hugging Face Trainer's TensorBoard callback: `loss` is a window mean
        # over logging_steps steps, which is the spacing of the logged points (§9).
        steps = sorted({s for s, t, _, _ in rows if t == loss_tag})
        if len(steps) >= 2:
            import numpy as np
            ls = int(np.median(np.diff(steps)))
            if ls > 1:
                window["loss"] = ls
                notes.append(f"training loss is a mean over {ls} steps (Hugging Face logging_steps, from the "
                             f"spacing of the logged points)")
    if "loss" not in chosen.values():
        notes.append("no training-loss tag found (looked for: " + ", ".join(TRAIN_ALIASES["loss"][:6]) + ", ...)")
    base = p if p.is_dir() else p.parent
    near: list[Path] = []
    for f in files:
        near.extend(q for q in (f.parent, *f.parent.parents) if q == base or base in q.parents)
    skipped: list[str] = []
    ckpts = checkpoints_beside(list(dict.fromkeys(near)), root=base, warnings=warnings, skipped=skipped)
    run = build_run(p, "tensorboard", train=train, evals=evals, warnings=warnings, meta=meta,
                    notes=notes, window_averaged=window, checkpoints=ckpts)
    run.not_analysed = skipped
    return run


def _newest_version(p: Path, files: list[Path], warnings: DataWarnings) -> list[Path]:
    """Lightning's TensorBoardLogger writes one ``version_N/`` per ``fit``: like its CSV logs, only
    the newest is read (with a warning naming the others)."""
    versions: dict[int, list[Path]] = {}
    for f in files:
        m = _VERSION_RE.match(f.parent.name)
        versions.setdefault(int(m.group(1)) if m else -1, []).append(f)
    if len(versions) < 2 or -1 in versions:
        return files
    newest = max(versions)
    others = ", ".join(f"version_{v}" for v in sorted(versions) if v != newest)
    warnings.add(p, f"several Lightning versions; reading version_{newest} (newest), not {others}")
    return versions[newest]
