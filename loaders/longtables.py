"""Shared plumbing of the foreign-format loaders: values to floats, records to long Run tables.

Every foreign reader collects ``(step, series, value)`` triples in file order and hands them to
``build_run``; the rewind policy, dtypes and sort order are decided here once, and so is the
validation series the overfitting verdict uses (`preferred_val_series`, also the analysis's
choice for every run format).

Over 400 lines on purpose: ``Triples`` and ``WideLog`` are the two column stores every foreign
reader fills, kept beside the one place (``build_run``) that turns them into tables.
"""
from __future__ import annotations

import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import FlatBlock
from loaders.run import CLASS_LOSS_COLUMNS, EVAL_CLASS_LOSS_COLUMNS, CheckpointRef, Run
from loaders.steps import STEP_REASONS, coerce_step, rewind_groups

__all__ = ["PREFERRED_VAL", "TRAIN_EVAL_SERIES", "Triples", "WideLog", "build_run", "preferred_val_series",
           "to_float", "classify_train_key", "is_val_loss_key", "run_name", "empty_frame"]

_INT64_MAX = 2**63 - 1

# File names that say nothing about the run: the folder names it instead.
_GENERIC_NAMES = ("metrics", "trainer_state", "ckpt", "model", "pytorch_model", "main", "log", "train",
                  "losses", "events", "run", "checkpoint", "last", "best")

# The validation series of the overfitting verdict (§10), most preferred first.
PREFERRED_VAL = ("eval_loss", "val_loss", "eval/loss", "val/loss", "val", "validation_loss", "valid_loss")
# Eval-mode losses on a training subset: the train side of §10, never a validation series.
TRAIN_EVAL_SERIES = ("train", "train_eval", "eval_train")

# Canonical training series and the names other tools give them.
TRAIN_ALIASES: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "train_loss", "train/loss", "train_loss_step", "train/loss_step", "loss_step",
             "training_loss", "loss/train", "Loss/train", "trl", "train_loss_epoch", "train/epoch_loss",
             "epoch_loss"),
    "grad_norm": ("grad_norm", "train/grad_norm", "norm", "grad_norm_total", "gradient_norm",
                  "grad_2.0_norm_total", "train/gradient_norm", "grad-norm"),
    "lr": ("lr", "learning_rate", "train/learning_rate", "train/lr", "lr-Adam", "lr-AdamW", "lr-SGD",
           "learning-rate"),
}
_ALIAS_TO_SERIES = {a.lower(): s for s, names in TRAIN_ALIASES.items() for a in names}


_EMPTY: dict[tuple[str, ...], pd.DataFrame] = {}


def empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    """``loaders.run.empty_table`` (same dtypes): a copy of one cached empty frame per column set,
    5x cheaper than building it (every loaded run needs several; the parser fuzz tests, thousands)."""
    tmpl = _EMPTY.get(columns)
    if tmpl is None:
        tmpl = _EMPTY[columns] = pd.DataFrame({c: np.empty(0, dtype=np.int64 if c in ("step", "count") else
                                                            object if c in ("series", "cls") else np.float64)
                                               for c in columns})
    return tmpl.copy()


def classify_train_key(key: str) -> str | None:
    """Canonical series (loss | grad_norm | lr) for a training column or tag name, else None."""
    k = key.strip()
    s = _ALIAS_TO_SERIES.get(k.lower())
    if s is not None:
        return s
    if k.lower().startswith(("lr-", "lr/")):
        return "lr"
    return None


def is_val_loss_key(key: str) -> bool:
    """True for validation-loss names: eval_loss, eval_<name>_loss, val_loss, eval/loss, val/loss ..."""
    k = key.lower()
    if "loss" not in k or k.startswith(("test", "predict", "train")):
        return False
    head = k.replace("/", "_").split("_", 1)[0]
    return head in ("eval", "val", "valid", "validation", "dev")


def run_name(path: str | os.PathLike[str]) -> str:
    """A readable run name: the folder's name, or a file's stem unless it is generic."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or str(p)
    stem = p.name.split(".")[0]
    if (stem.lower() in _GENERIC_NAMES or p.name.startswith("events.out.tfevents")) and p.parent.name:
        return p.resolve().parent.name
    return p.stem


def preferred_val_series(names: Iterable[str]) -> str | None:
    """The validation series the overfitting verdict uses (§10), among a run's evaluation series:
    the first of PREFERRED_VAL present, else the first in sorted order; never a TRAIN_EVAL_SERIES.
    The one chooser: loaders record it, the analysis and the report use it."""
    candidates = sorted({str(n) for n in names} - set(TRAIN_EVAL_SERIES))
    for p in PREFERRED_VAL:
        if p in candidates:
            return p
    return candidates[0] if candidates else None


def to_float(v: Any) -> float | None:
    """A logged value as float: numbers, numeric strings ("nan", "1e-3"); None for anything else."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        try:
            return float(v)
        except OverflowError:
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str):
        s = v.strip()
        if not s:
            return None
        try:
            return float(s)
        except ValueError:
            return None
    return None


def _fast_float(value: Any) -> float | None:
    t = type(value)
    if t is float:
        return value  # type: ignore[no-any-return]
    if t is str:
        try:
            return float(value)
        except ValueError:
            return None
    return to_float(value)


def _warn_steps(reasons: Counter[str], path: str | os.PathLike[str], warnings: DataWarnings) -> None:
    for why in ("non-numeric", "non-integer", "out of range", "negative"):
        n = reasons.get(why, 0)
        if n:
            warnings.add(path, f"{n} row{'s' if n > 1 else ''} {STEP_REASONS[why]}")


class Triples:
    """Collector of ``(step, series, value)`` rows in file order (compact arrays, ~20 bytes a row).

    ``add`` takes one raw value at a time (numbers or numeric strings; anything else is counted
    and reported); ``extend`` takes whole numpy columns with valid int64 steps. Do not mix the
    two for one series: file order within a series is what the rewind policy reads.
    """

    __slots__ = ("_steps", "_codes", "_values", "_chunks", "names", "bad", "bad_steps")

    def __init__(self) -> None:
        self._steps = array("q")
        self._codes = array("l")
        self._values = array("d")
        self._chunks: list[tuple[np.ndarray, int, np.ndarray]] = []   # (steps, series code, values)
        self.names: dict[str, int] = {}
        self.bad: Counter[str] = Counter()
        self.bad_steps: Counter[str] = Counter()

    def _code(self, series: str) -> int:
        c = self.names.get(series)
        if c is None:
            c = self.names[series] = len(self.names)
        return c

    def add(self, step: Any, series: str, value: Any) -> None:
        f = _fast_float(value)
        if f is None:
            if value is not None and not (isinstance(value, str) and not value.strip()):
                self.bad[series] += 1
            return
        if type(step) is not int or step < 0 or step > _INT64_MAX:
            s, why = coerce_step(step)
            if why is not None:
                self.bad_steps[why] += 1
                return
            step = s
        self._steps.append(step)
        self._codes.append(self._code(series))
        self._values.append(f)

    def extend(self, steps: np.ndarray, series: str, values: np.ndarray) -> None:
        if len(steps):
            self._chunks.append((np.asarray(steps, dtype=np.int64), self._code(series),
                                 np.asarray(values, dtype=np.float64)))

    def __len__(self) -> int:
        return len(self._steps) + sum(len(c[0]) for c in self._chunks)

    def _series(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one series in file order (a view when it is one ``extend`` chunk)."""
        parts = [(s, v) for s, c, v in self._chunks if c == code]
        if len(self._steps):
            codes = np.frombuffer(self._codes, dtype=np.dtype(f"i{self._codes.itemsize}"))
            mine = np.flatnonzero(codes == code)
            if len(mine):
                parts.insert(0, (np.frombuffer(self._steps, dtype=np.int64)[mine],
                                 np.frombuffer(self._values, dtype=np.float64)[mine]))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def steps_of(self, series: str) -> np.ndarray:
        """Steps logged for one series, in file order."""
        if series not in self.names:
            return np.empty(0, dtype=np.int64)
        return self._series(self.names[series])[0]

    def frame(self, value_col: str, path: str | os.PathLike[str], warnings: DataWarnings) -> pd.DataFrame:
        """Long table with int64 steps after the rewind policy (per series), sorted by series, step;
        `series` is categorical (a small code a row, not a pointer to a string).

        Built one series at a time into preallocated columns: peak memory is the output plus one
        series (a 10M-value log must not hold several concatenated copies)."""
        for s, n in sorted(self.bad.items()):
            warnings.add(path, f"{n} non-numeric value{'s' if n > 1 else ''} of {s} skipped")
        _warn_steps(self.bad_steps, path, warnings)
        cols = ("step", "series", value_col)
        total = len(self)
        if total == 0:
            return empty_frame(cols)
        order = sorted(self.names, key=str)
        series = [self._series(self.names[name]) for name in order]
        keeps = rewind_groups([s for s, _ in series], path, warnings)
        out_steps = np.empty(total, dtype=np.int64)
        out_values = np.empty(total, dtype=np.float64)
        out_codes = np.empty(total, dtype=np.int32)
        n = 0
        names: list[str] = []  # categories in `order`; a series with no row left still gets one
        for name, (steps, values), keep in zip(order, series, keeps, strict=True):
            if keep is not None:  # kept rows of a rewound series are increasing: no sort needed
                steps, values = steps[keep], values[keep]
            k = len(steps)
            out_steps[n:n + k] = steps
            out_values[n:n + k] = values
            out_codes[n:n + k] = len(names)
            names.append(name)
            n += k
        del series
        # Series first, then one frame without copies (a dict of arrays would be copied).
        return pd.DataFrame({"step": pd.Series(out_steps[:n], copy=False),
                             "series": pd.Series(pd.Categorical.from_codes(out_codes[:n], categories=names),
                                                 copy=False),
                             value_col: pd.Series(out_values[:n], copy=False)}, copy=False)


class WideLog:
    """Sparse wide records (CSV rows, JSON objects) stored column-wise in file order.

    Per column: the rows with a numeric cell and their values (``array``s, 12 bytes a cell: row
    numbers are int32, so a log holds at most ``MAX_RECORDS`` records), the rows with a
    non-numeric cell; step-like columns keep exact integers too (a float would round steps
    above 2^53). Memory grows with the numeric cells, not with the text.
    """

    MAX_RECORDS = 2**31 - 1

    def __init__(self, step_like: tuple[str, ...], path: str | os.PathLike[str] = "log") -> None:
        self.path = path  # named by the one error this class raises
        self.n = 0
        self.step_like = frozenset(x.lower() for x in step_like)
        self.cols: dict[str, tuple[array, array, array]] = {}     # name -> (rows, values, bad rows)
        self.ints: dict[str, tuple[array, array, dict[int, Any]]] = {}  # name -> (rows, ints, odd raw)
        self._slots: dict[str, tuple[array, array, array, tuple[array, array, dict[int, Any]] | None]] = {}

    def _slot(self, k: str) -> tuple[array, array, array, tuple[array, array, dict[int, Any]] | None]:
        col = self.cols.setdefault(k, (array("i"), array("d"), array("q")))
        ic = self.ints.setdefault(k, (array("i"), array("q"), {})) if k.lower() in self.step_like else None
        slot = self._slots[k] = (*col, ic)
        return slot

    def add(self, rec: dict[str, Any]) -> None:
        """Append one record ({column: raw value}); empty cells (None, "") are absent."""
        r = self.n
        if r >= self.MAX_RECORDS:
            raise TrainauditError(self.path, f"more than {self.MAX_RECORDS:,} records")
        self.n += 1
        slots = self._slots
        for k, v in rec.items():
            slot = slots.get(k) or self._slot(k)
            t = type(v)
            if t is float:
                f: float | None = v
            elif t is int:
                try:
                    f = float(v)
                except OverflowError:
                    f = math.inf if v > 0 else -math.inf
            elif t is str:
                if not v:
                    continue
                try:
                    f = float(v)
                except ValueError:
                    f = None
            elif v is None:
                continue
            else:
                f = to_float(v)
            if f is None:
                slot[2].append(r)
            else:
                slot[0].append(r)
                slot[1].append(f)
            ic = slot[3]
            if ic is not None:
                ic[0].append(r)
                if t is int and 0 <= v <= _INT64_MAX:
                    ic[1].append(v)
                elif t is str and v.isdigit() and len(v) < 19:
                    ic[1].append(int(v))
                else:
                    ic[1].append(-1)
                    ic[2][r] = v

    def add_block(self, block: FlatBlock) -> None:
        """Append the records of one ``loaders.lines.parse_flat_json_block`` block: the same
        cells ``add`` would store for each of its records (into the same arrays, so file order
        holds across blocks and single records), without a Python call per record."""
        r0 = self.n
        if r0 + block.n > self.MAX_RECORDS:
            raise TrainauditError(self.path, f"more than {self.MAX_RECORDS:,} records")
        self.n += block.n
        for k, (lines, at) in block.keys.items():
            slot = self._slots.get(k) or self._slot(k)
            rows = (lines + r0).astype(np.int32).tobytes()
            f = block.values[at]
            slot[0].frombytes(rows)
            slot[1].frombytes(f.tobytes())
            ic = slot[3]
            if ic is None:
                continue
            exact = (f >= 0) & (f < 2.0**53) & (np.floor(f) == f)  # coerce_step gives int(f), as for an int
            ints = np.where(exact, f, -1).astype(np.int64)
            for i in np.flatnonzero(~exact).tolist():   # the rest as add() keeps them
                v = block.raw[int(at[i])]
                if type(v) is int and 0 <= v <= _INT64_MAX:
                    ints[i] = v
                else:
                    ic[2][r0 + int(lines[i])] = v
            ic[0].frombytes(rows)
            ic[1].frombytes(ints.tobytes())

    def columns(self) -> list[str]:
        return list(self.cols)

    def drop(self, col: str, *, keep_ints: bool = False) -> None:
        """Free one column's cells once they are copied out (a 10M-line log holds 16 bytes a cell);
        `keep_ints`: only its float cells (a step column's exact integers are still to be read)."""
        for store in (self.cols, self._slots) if keep_ints else (self.cols, self.ints, self._slots):
            store.pop(col, None)

    def release(self) -> None:
        """Drop the stored cells (their copies live on in the Run's tables): peak memory."""
        self.cols, self.ints, self._slots = {}, {}, {}

    def rows(self, col: str) -> np.ndarray:
        """Rows with a numeric cell in ``col``."""
        return np.frombuffer(self.cols[col][0], dtype=np.int32) if len(self.cols[col][0]) else np.empty(0, np.int32)

    def values(self, col: str) -> np.ndarray:
        return np.frombuffer(self.cols[col][1], dtype=np.float64) if len(self.cols[col][1]) else np.empty(0)

    def present(self, col: str) -> np.ndarray:
        """Rows with any non-empty cell in ``col`` (numeric or not), sorted."""
        bad = self.cols[col][2]
        r = self.rows(col)
        return np.union1d(r, np.asarray(bad, dtype=np.int64)) if len(bad) else r

    def n_bad(self, col: str) -> int:
        return len(self.cols[col][2])

    def dense(self, col: str) -> np.ndarray:
        """Per-row float value of ``col`` (NaN where absent)."""
        out = np.full(self.n, np.nan)
        if col in self.cols:
            out[self.rows(col)] = self.values(col)
        return out

    def row_steps(self, col: str | None, path: str | os.PathLike[str],
                  warnings: DataWarnings) -> tuple[np.ndarray, np.ndarray]:
        """Per-row int64 step and validity from ``col`` (exact ints), or the row number when None.

        Missing or bad steps are counted into one warning per kind (bad-inputs.md D5, D8).
        """
        if col is None:
            return np.arange(self.n, dtype=np.int64), np.ones(self.n, dtype=bool)
        steps = np.zeros(self.n, dtype=np.int64)
        valid = np.zeros(self.n, dtype=bool)
        reasons: Counter[str] = Counter()
        if col in self.ints:
            rows_a, ints_a, odd = self.ints[col]
            rows = np.frombuffer(rows_a, dtype=np.int32) if len(rows_a) else np.empty(0, np.int32)
            ints = np.frombuffer(ints_a, dtype=np.int64) if len(ints_a) else np.empty(0, np.int64)
            ok = ints >= 0
            if ok.all():  # the usual case: no masked copies of two 8-byte-a-row arrays
                steps[rows] = ints
                valid[rows] = True
            else:
                steps[rows[ok]] = ints[ok]
                valid[rows[ok]] = True
            for r, v in odd.items():
                s, why = coerce_step(v)
                if why is None:
                    steps[r], valid[r] = s, True
                else:
                    reasons[why] += 1
        else:  # a column that is not step-like by name (e.g. epoch): integral floats only
            vals = self.dense(col)
            whole = np.isfinite(vals) & (vals >= 0) & (vals < 2.0**63) & (np.floor(vals) == vals)
            steps[whole] = vals[whole].astype(np.int64)
            valid = whole
            reasons["non-integer"] += int((np.isfinite(vals) & ~whole & (vals >= 0)).sum())
            reasons["negative"] += int((vals < 0).sum())
        missing = int((~valid).sum()) - sum(reasons.values())
        if missing:
            reasons["non-numeric"] += missing
        _warn_steps(reasons, path, warnings)
        return steps, valid


def build_run(path: str | os.PathLike[str], source_format: str, *, train: Triples, evals: Triples,
              warnings: DataWarnings, name: str | None = None, meta: dict[str, Any] | None = None,
              checkpoints: list[CheckpointRef] | None = None, data_path: str | os.PathLike[str] | None = None,
              window_averaged: dict[str, int] | None = None, notes: list[str] | None = None) -> Run:
    """Assemble a ``Run`` from collected triples; sets ``meta["val_series_preferred"]``."""
    p = Path(path)
    where = data_path if data_path is not None else p
    scalars = train.frame("value", where, warnings)
    ev = evals.frame("loss", where, warnings)
    meta = dict(meta or {})
    val_names = sorted(set(ev["series"])) if not ev.empty else []
    meta["val_series_preferred"] = preferred_val_series(val_names)
    meta.setdefault("val_series", val_names)
    run = Run(path=p, name=name or run_name(p), source_format=source_format, meta=meta,
              scalars=scalars, evals=ev, class_losses=empty_frame(CLASS_LOSS_COLUMNS),
              eval_class_losses=empty_frame(EVAL_CLASS_LOSS_COLUMNS),
              checkpoints=sorted(checkpoints or [], key=lambda c: c.step),
              window_averaged=dict(window_averaged or {}), warnings=warnings, notes=list(notes or []))
    return run
