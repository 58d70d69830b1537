"""Read a trainaudit run directory (format v1, docs/run-format.md) into a Run.

Logs are read with bounded memory and tolerate what a killed or resumed process leaves
behind: a torn or NUL-padded last line is skipped with a warning naming file and line, a
corrupt row is skipped with its line number, and steps that go back (a resumed run) keep
the latest timeline with the rewind reported.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from loaders import runformat as fmt
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef, ModelSpec, Run, empty_table
from loaders.safeio import open_regular

CHUNK_BYTES = 1 << 20          # bytes parsed per pandas call: bounds peak memory
MAX_LINE = 1 << 20             # a longer line is skipped (1 MiB)
MAX_META_BYTES = 16 << 20
_CKPT_RE = re.compile(r"^step_(\d+)\.safetensors$")


def is_run_dir(path: Path) -> bool:
    """True when `path` is a folder with our run.json."""
    return path.is_dir() and (path / fmt.META_FILE).is_file()


def _open_regular(path: Path, root: Path) -> tuple[io.BufferedReader, int]:
    """Open a regular file inside `root` (no symlink escapes, FIFOs, devices) with its size
    snapshot: a writer may still be appending, we read only what was there at open."""
    f = open_regular(path, root)
    return f, f.snapshot_size  # type: ignore[attr-defined]


def iter_line_chunks(path: Path, root: Path, warnings: DataWarnings) -> Iterator[tuple[int, bytes]]:
    """Yield (first_line_number, bytes of whole lines) in ~CHUNK_BYTES pieces.

    Reads at most the size seen at open (a writer may still be appending); strips a BOM,
    turns CRLF into LF, drops a NUL-padded or torn final line and over-long lines, each with a
    warning. Memory stays O(CHUNK_BYTES + MAX_LINE).
    """
    try:
        f, size = _open_regular(path, root)
    except TrainauditError as exc:  # a log we may not read is skipped; the rest of the run stays
        warnings.add(path, exc.problem)
        return
    line_no = 1
    carry = b""
    skipping = False  # inside an over-long line
    with f:
        remaining = size
        first = True
        while remaining > 0:
            block = f.read(min(CHUNK_BYTES, remaining))
            if not block:
                break
            remaining -= len(block)
            if first:
                block = block.removeprefix(b"\xef\xbb\xbf")
                first = False
            data = carry + block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                if len(carry) > MAX_LINE:
                    if not skipping:
                        warnings.add(path, f"line exceeds {MAX_LINE >> 20} MiB, skipped", line=line_no)
                    skipping, carry = True, b""
                continue
            body, carry = data[: cut + 1], data[cut + 1:]
            if skipping:  # drop the rest of the over-long line
                nl = body.find(b"\n")
                body = body[nl + 1:]
                line_no += 1
                skipping = False
            if body:
                if b"\r" in body:
                    body = body.replace(b"\r\n", b"\n")
                yield line_no, body
                line_no += body.count(b"\n")
        tail = carry.rstrip(b"\x00")
        if len(tail) < len(carry):
            warnings.add(path, "NUL bytes at the end of the file ignored", line=line_no)
        if tail.strip() and not skipping:
            warnings.add(path, "incomplete final line ignored", line=line_no)


def _float(v: str) -> float:
    v = v.strip()
    return math.nan if v in ("", "nan", "NaN") else float(v)


def _parse_csv_chunk(body: bytes, columns: tuple[str, ...], numeric: tuple[str, ...],
                     path: Path, first_line: int, warnings: DataWarnings) -> pd.DataFrame:
    """Parse whole CSV lines; fast path with the C parser, per-line fallback on bad rows."""
    try:
        df = pd.read_csv(io.BytesIO(body), header=None, names=list(columns), engine="c",
                         dtype={c: "float64" for c in numeric}, keep_default_na=False,
                         na_values=["nan", "NaN", ""], skip_blank_lines=True)
        if len(df) == body.count(b"\n") - body.count(b"\n\n"):
            return df
    except (ValueError, pd.errors.ParserError):
        pass
    rows, bad = [], 0
    text = body.decode("utf-8", errors="replace").split("\n")
    for i, line in enumerate(text):
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line]))
            if tuple(fields) == columns:      # a repeated header is not worth a warning
                continue
            if len(fields) != len(columns):
                raise ValueError
            rows.append(tuple(_float(v) if c in numeric else v for c, v in zip(columns, fields)))
        except (ValueError, csv.Error, StopIteration):
            bad += 1
            if bad <= 20:
                warnings.add(path, "malformed row skipped", line=first_line + i)
    if bad > 20:
        warnings.add(path, f"{bad - 20} more malformed rows skipped")
    return pd.DataFrame(rows, columns=list(columns)).astype({c: "float64" for c in numeric})


def read_csv_log(path: Path, root: Path, columns: tuple[str, ...], numeric: tuple[str, ...],
                 warnings: DataWarnings) -> pd.DataFrame:
    """Read one of our CSV logs (header + rows) in bounded chunks."""
    parts = []
    for first_line, body in iter_line_chunks(path, root, warnings):
        if first_line == 1:
            header, _, body = body.partition(b"\n")
            got = tuple(header.decode("utf-8", errors="replace").strip().split(","))
            if got != columns:
                raise TrainauditError(path, f"unexpected header {','.join(got)!r}, expected {','.join(columns)!r}")
            first_line = 2
        if body:
            parts.append(_parse_csv_chunk(body, columns, numeric, path, first_line, warnings))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in numeric else "object") for c in columns})
    return pd.concat(parts, ignore_index=True)


def keep_latest_timeline(steps: np.ndarray, *, equal_restarts: bool) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Rows to keep when logged steps go back (a resumed run): the later timeline wins.

    A row is kept unless a later segment restarts at or before its step. Returns the keep
    mask and the rewinds as (resume_step, overlap_from, overlap_to).
    """
    n = len(steps)
    if n == 0:
        return np.ones(0, bool), []
    back = steps[1:] <= steps[:-1] if equal_restarts else steps[1:] < steps[:-1]
    if not back.any():
        return np.ones(n, bool), []
    seg = np.concatenate([[0], np.cumsum(back)])
    starts = np.flatnonzero(np.concatenate([[True], back]))
    seg_min = np.minimum.reduceat(steps, starts)
    later_min = np.minimum.accumulate(seg_min[::-1])[::-1]            # min over segments >= s
    later_min = np.concatenate([later_min[1:], [np.iinfo(np.int64).max]])  # strictly later
    keep = steps < later_min[seg]
    rewinds = []
    for s in range(1, len(starts)):
        prev_max = int(steps[: starts[s]].max())
        rewinds.append((int(steps[starts[s]]), int(steps[starts[s]]), prev_max))
    return keep, rewinds


def _steps_to_int(df: pd.DataFrame, path: Path, warnings: DataWarnings) -> pd.DataFrame:
    step = df["step"].to_numpy(dtype="float64")
    ok = np.isfinite(step) & (step == np.round(step)) & (step >= 0) & (step < 2.0**62)
    if not ok.all():
        warnings.add(path, f"{int((~ok).sum())} rows with a negative, fractional or out-of-range step skipped")
        df = df[ok]
    return df.assign(step=df["step"].to_numpy().astype("int64"))


def _apply_rewinds(df: pd.DataFrame, path: Path, warnings: DataWarnings, *, equal_restarts: bool) -> pd.DataFrame:
    keep, rewinds = keep_latest_timeline(df["step"].to_numpy(), equal_restarts=equal_restarts)
    for resume, lo, hi in rewinds:
        overlap = f"overlap {lo}-{hi}" if hi >= lo else "no overlap"
        warnings.add(path, f"resume at step {resume} ({overlap}); the later timeline is kept")
    return df[keep].reset_index(drop=True) if not keep.all() else df


COMPACT_BYTES = 64 << 20  # train.csv larger than this (~1.3M rows) is held compactly


class _Columns:
    """Preallocated, growable numpy columns: chunks are copied in once, never concatenated."""

    def __init__(self, dtypes: dict[str, str], capacity: int) -> None:
        self.dtypes = dtypes
        self.arrays = {c: np.empty(max(capacity, 1024), dtype=t) for c, t in dtypes.items()}
        self.n = 0

    def append(self, cols: dict[str, np.ndarray]) -> None:
        k = len(next(iter(cols.values())))
        if self.n + k > len(self.arrays["step"]):
            grow = max(self.n + k, int(len(self.arrays["step"]) * 1.25))
            self.arrays = {c: np.resize(a, grow) for c, a in self.arrays.items()}
        for c, a in self.arrays.items():
            if c == "step" and a.dtype == np.int32 and k and cols[c].max() >= 2**31:
                a = self.arrays[c] = a.astype(np.int64)
            a[self.n: self.n + k] = cols[c]
        self.n += k

    def frame(self) -> pd.DataFrame:
        # Series first: a plain dict of arrays would be consolidated (copied) into 2-D blocks.
        return pd.DataFrame({c: pd.Series(a[: self.n], copy=False) for c, a in self.arrays.items()}, copy=False)


def read_train_log(run_dir: Path, warnings: DataWarnings, *, compact: bool | None = None) -> pd.DataFrame:
    """train.csv as a wide frame: step (int64), loss, grad_norm, lr, wall_time (float64).

    Logs over COMPACT_BYTES (or with compact=True) are held in 4 bytes a value - int32 steps
    (int64 when needed), float32 loss / grad_norm / lr, no wall_time - so a 10-million-line
    log fits in ~160 MB; read_run_dir adds a note saying so.
    """
    path = run_dir / fmt.TRAIN_FILE
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else "float64") for c in fmt.TRAIN_COLUMNS})
    size = os.stat(path).st_size
    compact = size > COMPACT_BYTES if compact is None else compact
    dtypes = ({"step": "int32", "loss": "float32", "grad_norm": "float32", "lr": "float32"} if compact
              else {"step": "int64", "loss": "float64", "grad_norm": "float64", "lr": "float64", "wall_time": "float64"})
    out: _Columns | None = None
    bad_steps = 0
    for first_line, body in iter_line_chunks(path, run_dir, warnings):
        if first_line == 1:
            header, _, body = body.partition(b"\n")
            got = tuple(header.decode("utf-8", errors="replace").strip().split(","))
            if got != fmt.TRAIN_COLUMNS:
                raise TrainauditError(path, f"unexpected header {','.join(got)!r}, expected {','.join(fmt.TRAIN_COLUMNS)!r}")
            first_line = 2
        if not body:
            continue
        if out is None:  # size the columns from the first chunk's bytes per line
            per_line = max(1.0, len(body) / max(1, body.count(b"\n")))
            out = _Columns(dtypes, int(size / per_line * 1.02) + 16)
        df = _parse_csv_chunk(body, fmt.TRAIN_COLUMNS, fmt.TRAIN_COLUMNS, path, first_line, warnings)
        step = df["step"].to_numpy(dtype="float64")
        ok = np.isfinite(step) & (step == np.round(step)) & (step >= 0) & (step < 2.0**62)
        if not ok.all():
            bad_steps += int((~ok).sum())
            df, step = df[ok], step[ok]
        cols = {c: df[c].to_numpy() for c in dtypes if c != "step"}
        cols["step"] = step.astype(np.int64)
        out.append(cols)
    if bad_steps:
        warnings.add(path, f"{bad_steps} rows with a negative, fractional or out-of-range step skipped")
    if out is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    df = out.frame()
    return _apply_rewinds(df, path, warnings, equal_restarts=True)


def _read_class_log(run_dir: Path, warnings: DataWarnings) -> pd.DataFrame:
    path = run_dir / fmt.CLASS_FILE
    if not path.exists():
        return empty_table(fmt.CLASS_COLUMNS)
    df = read_csv_log(path, run_dir, fmt.CLASS_COLUMNS, ("step", "count", "loss_sum", "loss_m2"), warnings)
    df = _steps_to_int(df, path, warnings)
    df = _apply_rewinds(df, path, warnings, equal_restarts=False)
    return df.assign(cls=df["cls"].astype(str), count=df["count"].fillna(0).astype("int64"))


def _read_jsonl(path: Path, root: Path, warnings: DataWarnings) -> list[tuple[int, dict]]:
    out: list[tuple[int, dict]] = []
    if not path.exists():
        return out
    for first_line, body in iter_line_chunks(path, root, warnings):
        for i, line in enumerate(body.decode("utf-8", errors="replace").split("\n")):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                warnings.add(path, "malformed JSON record skipped", line=first_line + i)
                continue
            if isinstance(rec, dict):
                out.append((first_line + i, rec))
            else:
                warnings.add(path, "record is not a JSON object; skipped", line=first_line + i)
    return out


def _num(x: object) -> float:
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _read_eval_log(run_dir: Path, warnings: DataWarnings) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = run_dir / fmt.EVAL_FILE
    evals, classes = [], []
    for line, rec in _read_jsonl(path, run_dir, warnings):
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            warnings.add(path, f"record without a valid step skipped (step={step!r})", line=line)
            continue
        split = str(rec.get("split", "val"))
        evals.append({"step": step, "series": split, "loss": _num(rec.get("loss"))})
        cls = rec.get("classes") or {}
        if isinstance(cls, dict):
            for name, v in cls.items():
                if isinstance(v, dict):
                    classes.append({"step": step, "series": split, "cls": str(name),
                                    "count": int(_num(v.get("count")) if math.isfinite(_num(v.get("count"))) else 0),
                                    "loss_sum": _num(v.get("loss_sum")), "loss_m2": _num(v.get("loss_m2"))})
    ev = pd.DataFrame(evals) if evals else empty_table(("step", "series", "loss"))
    if evals:
        parts = []
        for _, g in ev.groupby("series", sort=True):
            keep, rewinds = keep_latest_timeline(g["step"].to_numpy(), equal_restarts=True)
            for resume, lo, hi in rewinds:
                warnings.add(path, f"resume at step {resume} (overlap {lo}-{hi}); the later evaluations are kept")
            parts.append(g[keep])
        kept_index = pd.concat(parts).index
        ev = ev.loc[kept_index].sort_values(["series", "step"], kind="stable").reset_index(drop=True)
        if classes:
            cl = pd.DataFrame(classes)
            cl = cl.drop_duplicates(["step", "series", "cls"], keep="last")
            cl = cl.merge(ev[["step", "series"]], on=["step", "series"])
            return ev, cl.reset_index(drop=True)
    return ev, empty_table(("step", "series", "cls", "count", "loss_sum", "loss_m2"))


def list_checkpoints(run_dir: Path, warnings: DataWarnings) -> list[CheckpointRef]:
    folder = run_dir / fmt.CHECKPOINT_DIR
    refs = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                refs.append(CheckpointRef(int(m.group(1)), p, "safetensors"))
            elif p.name.startswith(".") and ".tmp-" in p.name:
                warnings.add(p, "unfinished checkpoint temp file (process killed while saving); ignored")
    return sorted(refs, key=lambda r: r.step)


def read_run_dir(path: str | os.PathLike[str]) -> Run:
    """Load our run directory: metadata, logs, evaluation log and checkpoint list."""
    run_dir = Path(path)
    meta_path = run_dir / fmt.META_FILE
    warnings = DataWarnings()
    try:
        f, size = _open_regular(meta_path, run_dir)
        with f:
            if size > MAX_META_BYTES:
                raise TrainauditError(meta_path, "metadata file too large")
            meta = json.loads(f.read(size).decode("utf-8-sig"))
    except FileNotFoundError:
        raise TrainauditError(run_dir, f"no {fmt.META_FILE} (not a trainaudit run directory)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainauditError(meta_path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TrainauditError(meta_path, "metadata is not a JSON object")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise TrainauditError(meta_path, f"missing or invalid format_version {version!r}")
    if version > fmt.FORMAT_VERSION:
        raise TrainauditError(meta_path, f"format_version {version} is newer than this trainaudit reads "
                                         f"({fmt.FORMAT_VERSION}); upgrade trainaudit")
    train = read_train_log(run_dir, warnings)
    class_losses = _read_class_log(run_dir, warnings)
    evals, eval_classes = _read_eval_log(run_dir, warnings)
    notes = []
    if len(train) and train["loss"].dtype == np.float32:
        notes.append(f"{fmt.TRAIN_FILE}: {len(train):,} rows held as float32 to bound memory (large log); "
                     "wall_time not loaded")
    for _, ev in _read_jsonl(run_dir / fmt.EVENTS_FILE, run_dir, warnings):
        if ev.get("event") == "resume":
            notes.append(f"the run was resumed at step {ev.get('step')}")
    model_meta = meta.get("model")
    model = None
    if isinstance(model_meta, dict) and isinstance(model_meta.get("name"), str):
        model = ModelSpec(model_meta["name"], dict(model_meta.get("config") or {}))
    eval_set = run_dir / fmt.EVAL_SET_FILE
    return Run(
        path=run_dir,
        name=str(meta.get("run_name") or run_dir.name),
        source_format="trainaudit",
        meta=meta,
        train=train,
        evals=evals,
        class_losses=class_losses,
        eval_class_losses=eval_classes,
        checkpoints=list_checkpoints(run_dir, warnings),
        class_names=[str(c) for c in meta.get("class_names") or []],
        model=model,
        eval_set_path=eval_set if eval_set.is_file() else None,
        warnings=warnings,
        notes=notes,
    )


def load_run(path: str | os.PathLike[str], *, format: str | None = None) -> Run:  # noqa: A002
    """Load any supported run: our run directory directly, other formats by detection."""
    p = Path(path)
    if not p.exists():
        raise TrainauditError(p, "no such file or directory")
    if format in (None, "trainaudit") and is_run_dir(p):
        return read_run_dir(p)
    if format == "trainaudit":
        raise TrainauditError(p, f"not a trainaudit run directory (no {fmt.META_FILE})")
    from loaders.detect import open_run

    return open_run(p, format=format)
