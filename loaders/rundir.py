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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from loaders import runformat as fmt
from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import iter_line_batches, iter_line_blocks, parse_json_line, read_json
from loaders.run import CheckpointRef, ModelSpec, Run, empty_table
from loaders.safeio import is_temp_name, open_regular
from loaders.steps import check_steps, coerce_step, resolve_rewinds, rewind_groups, warn_bad_steps

MAX_META_BYTES = 16 << 20
_CKPT_RE = re.compile(r"^step_(\d+)\.safetensors$")


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a folder holding our ``run.json``: a JSON object with ``format_version``.

    The one test of "this is a trainaudit run folder" (``load_run``, ``open_run``'s detection,
    ``trainaudit compare``). A damaged ``run.json`` that still names ``format_version`` counts:
    its reader then says what is wrong. A ``run.json`` of another tool does not.
    """
    meta = Path(path) / fmt.META_FILE
    if not meta.is_file():
        return False
    try:
        with open_regular(meta) as f:
            head = f.read(1 << 16)
    except TrainauditError:
        return False
    try:
        obj = json.loads(head.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return b'"format_version"' in head
    return isinstance(obj, dict) and "format_version" in obj


def _log_blocks(path: Path, root: Path, warnings: DataWarnings) -> Iterator[tuple[int, bytes]]:
    """``iter_line_blocks`` of one log; a log we may not open is skipped with a warning (the
    rest of the run stays readable)."""
    try:
        yield from iter_line_blocks(path, warnings, root=root)
    except TrainauditError as exc:
        warnings.add(path, exc.problem)


def _float(v: str) -> float:
    v = v.strip()
    return math.nan if v in ("", "nan", "NaN") else float(v)


def _parse_csv_chunk(body: bytes, columns: tuple[str, ...], numeric: tuple[str, ...],
                     path: Path, first_line: int, warnings: DataWarnings) -> pd.DataFrame:
    """Parse consecutive CSV lines (no final newline) with the C parser, per line on bad rows.

    Steps stay exact: int64 when every step of the chunk is one, else the text, which
    ``loaders.steps.check_steps`` reads or drops (saying why); the other numbers are float64.
    """
    n_lines = body.count(b"\n") + 1 - (body + b"\n").count(b"\n\n")  # non-blank lines
    for step_dtype in ("int64", "object"):
        dtypes = {c: step_dtype if c == "step" else "float64" for c in numeric}
        try:
            df = pd.read_csv(io.BytesIO(body), header=None, names=list(columns), engine="c",
                             dtype=dtypes, keep_default_na=False,
                             na_values=["nan", "NaN", ""], skip_blank_lines=True)
        except (ValueError, OverflowError, pd.errors.ParserError):
            continue
        if len(df) == n_lines:
            return df
        break
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
            rows.append(tuple(_float(v) if c in numeric and c != "step" else v for c, v in zip(columns, fields)))
        except (ValueError, csv.Error, StopIteration):
            bad += 1
            if bad <= 20:
                warnings.add(path, "malformed row skipped", line=first_line + i)
    if bad > 20:
        warnings.add(path, f"{bad - 20} more malformed rows skipped")
    return pd.DataFrame(rows, columns=list(columns)).astype({c: "float64" for c in numeric if c != "step"})


def _csv_body(path: Path, columns: tuple[str, ...], first_line: int, body: bytes) -> tuple[int, bytes]:
    """The rows of a block: the header line (line 1) checked against `columns` and removed."""
    if first_line != 1:
        return first_line, body
    header, _, body = body.partition(b"\n")
    got = tuple(header.decode("utf-8", errors="replace").strip().split(","))
    if got != columns:
        raise TrainauditError(path, f"unexpected header {','.join(got)!r}, expected {','.join(columns)!r}")
    return 2, body


def read_csv_log(path: Path, root: Path, columns: tuple[str, ...], numeric: tuple[str, ...],
                 warnings: DataWarnings) -> pd.DataFrame:
    """Read one of our CSV logs (header + rows) in bounded chunks."""
    parts = []
    for first_line, block in _log_blocks(path, root, warnings):
        first_line, body = _csv_body(path, columns, first_line, block)
        if body:
            parts.append(_parse_csv_chunk(body, columns, numeric, path, first_line, warnings))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="float64" if c in numeric else "object") for c in columns})
    return pd.concat(parts, ignore_index=True)


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
    bad_steps: Counter[str] = Counter()
    for first_line, block in _log_blocks(path, run_dir, warnings):
        first_line, body = _csv_body(path, fmt.TRAIN_COLUMNS, first_line, block)
        if not body:
            continue
        if out is None:  # size the columns from the first chunk's bytes per line
            per_line = max(1.0, len(body) / (body.count(b"\n") + 1))
            out = _Columns(dtypes, int(size / per_line * 1.02) + 16)
        df = _parse_csv_chunk(body, fmt.TRAIN_COLUMNS, fmt.TRAIN_COLUMNS, path, first_line, warnings)
        step, ok, reasons = check_steps(df["step"].to_numpy())
        bad_steps.update(reasons)
        if not ok.all():
            df, step = df[ok], step[ok]
        cols = {c: df[c].to_numpy() for c in dtypes if c != "step"}
        cols["step"] = step
        out.append(cols)
    warn_bad_steps(dict(bad_steps), path, warnings)
    if out is None:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    df = out.frame()
    (keep,) = rewind_groups([df["step"].to_numpy()], path, warnings)
    return df if keep is None else df[keep].reset_index(drop=True)


def _read_class_log(run_dir: Path, warnings: DataWarnings) -> pd.DataFrame:
    path = run_dir / fmt.CLASS_FILE
    if not path.exists():
        return empty_table(fmt.CLASS_COLUMNS)
    df = read_csv_log(path, run_dir, fmt.CLASS_COLUMNS, ("step", "count", "loss_sum", "loss_m2"), warnings)
    df = resolve_rewinds(df.assign(cls=df["cls"].astype(str)), path, warnings, by="cls")  # one series per class
    return df.assign(count=df["count"].fillna(0).astype("int64"))


def _read_grad_norms(run_dir: Path, warnings: DataWarnings) -> pd.DataFrame:
    """grad_norms.csv (step, tensor, grad_norm): the logger's per-tensor gradient norms (§11).

    A resumed run keeps the latest timeline per tensor; a non-finite norm is kept (it is what
    the gradient was) and rows without a tensor name are dropped with a warning.
    """
    path = run_dir / fmt.GRAD_NORMS_FILE
    if not path.exists():
        return empty_table(fmt.GRAD_NORM_COLUMNS)
    df = read_csv_log(path, run_dir, fmt.GRAD_NORM_COLUMNS, ("step", "grad_norm"), warnings)
    df = df.assign(tensor=df["tensor"].astype(str))
    nameless = (df["tensor"].str.len() == 0) | df["tensor"].isna()
    if nameless.any():
        warnings.add(path, f"{int(nameless.sum())} row(s) without a tensor name skipped")
        df = df[~nameless]
    df = resolve_rewinds(df.reset_index(drop=True), path, warnings, by="tensor")  # coerces steps too
    return df.assign(grad_norm=df["grad_norm"].astype("float64"))[list(fmt.GRAD_NORM_COLUMNS)]


def _read_jsonl(path: Path, root: Path, warnings: DataWarnings) -> list[tuple[int, dict]]:
    out: list[tuple[int, dict]] = []
    if not path.exists():
        return out
    try:
        for first_line, lines in iter_line_batches(path, warnings, root=root):
            for i, line in enumerate(lines, first_line):
                rec = parse_json_line(line, warnings, path, i)
                if rec is not None:
                    out.append((i, rec))
    except TrainauditError as exc:  # a log we may not open is skipped; the rest of the run stays
        warnings.add(path, exc.problem)
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
        step, why = coerce_step(rec.get("step"))
        if step is None:
            warnings.add(path, f"record without a valid step skipped (step={rec.get('step')!r}: {why})", line=line)
            continue
        split = str(rec.get("split", "val"))
        skipped = _num(rec.get("n_nonfinite"))
        if math.isfinite(skipped) and skipped > 0:  # left out of the evaluation's class states (§8)
            warnings.add(path, f"evaluation at step {step} ({split}): {int(skipped)} example loss(es) were NaN or "
                               "infinite and left out of the per-class losses", line=line)
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
        ev = resolve_rewinds(ev, path, warnings, by="series")
        ev = ev.sort_values(["series", "step"], kind="stable").reset_index(drop=True)
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
            elif is_temp_name(p.name):
                warnings.add(p, "unfinished checkpoint temp file (process killed while saving); ignored")
    return sorted(refs, key=lambda r: r.step)


def read_run_dir(path: str | os.PathLike[str]) -> Run:
    """Load our run directory: metadata, logs, evaluation log and checkpoint list."""
    run_dir = Path(path)
    meta_path = run_dir / fmt.META_FILE
    warnings = DataWarnings()
    meta = read_json(meta_path, run_dir, max_bytes=MAX_META_BYTES)
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
    grad_norms = _read_grad_norms(run_dir, warnings)
    notes = []
    if len(train) and train["loss"].dtype == np.float32:
        notes.append(f"{fmt.TRAIN_FILE}: {len(train):,} rows held as float32 to bound memory (large log); "
                     "wall_time not loaded")
    n_nonfinite, nonfinite_steps = 0, []
    for _, ev in _read_jsonl(run_dir / fmt.EVENTS_FILE, run_dir, warnings):
        if ev.get("event") == "resume":
            notes.append(f"the run was resumed at step {ev.get('step')}")
        elif ev.get("event") == "nonfinite_class_losses":  # the logger left these out of the states (§8)
            n = _num(ev.get("n"))
            n_nonfinite += int(n) if math.isfinite(n) else 0
            steps = ev.get("steps")
            nonfinite_steps += list(steps) if isinstance(steps, dict) else []
    if n_nonfinite:
        first = ", ".join(map(str, nonfinite_steps[:5])) + (" ..." if len(nonfinite_steps) > 5 else "")
        warnings.add(run_dir / fmt.EVENTS_FILE, f"{n_nonfinite} training example loss(es) were NaN or infinite "
                                                f"and left out of the per-class losses (steps {first})")
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
        grad_norms=grad_norms,
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
