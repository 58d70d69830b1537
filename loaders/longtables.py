"""Shared plumbing of the foreign-format loaders: values to floats, records to long Run tables.

Every foreign reader collects ``(step, series, value)`` triples in file order and hands them to
``build_run``; the rewind policy, dtypes, sort order and the preferred validation series
(issue 5: ``eval_loss``, else ``val_loss``, ``eval/loss``, else the first in sorted order) are
decided here once.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings
from loaders.run import EVAL_COLUMNS, SCALAR_COLUMNS, CheckpointRef, Run, empty_table
from loaders.safeio import resolve_rewinds

__all__ = ["PREFERRED_VAL", "Triples", "build_run", "preferred_val_series", "to_float",
           "classify_train_key", "is_val_loss_key", "run_name"]

# File names that say nothing about the run: the folder names it instead.
_GENERIC_NAMES = ("metrics", "trainer_state", "ckpt", "model", "pytorch_model", "main", "log", "train",
                  "losses", "events", "run", "checkpoint", "last", "best")

PREFERRED_VAL = ("eval_loss", "val_loss", "eval/loss", "val/loss", "val", "validation_loss", "valid_loss")

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


def preferred_val_series(names: list[str] | set[str] | tuple[str, ...]) -> str | None:
    """The validation series the overfitting verdict uses (issue 5)."""
    names = list(names)
    for p in PREFERRED_VAL:
        if p in names:
            return p
    return sorted(names)[0] if names else None


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


class Triples:
    """Collector of ``(step, series, value)`` rows in file order, plus counts of skipped cells."""

    __slots__ = ("steps", "series", "values", "bad")

    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.series: list[str] = []
        self.values: list[float] = []
        self.bad: dict[str, int] = {}

    def add(self, step: Any, series: str, value: Any) -> None:
        f = to_float(value)
        if f is None:
            if value is not None and value != "":
                self.bad[series] = self.bad.get(series, 0) + 1
            return
        self.steps.append(step)
        self.series.append(series)
        self.values.append(f)

    def frame(self, value_col: str, path: str | os.PathLike[str], warnings: DataWarnings) -> pd.DataFrame:
        """Long table with int64 steps after the rewind policy (per series)."""
        for s, n in sorted(self.bad.items()):
            warnings.add(path, f"{n} non-numeric value{'s' if n > 1 else ''} of {s} skipped")
        cols = ("step", "series", value_col)
        if not self.steps:
            return empty_table(cols)
        steps = np.asarray(self.steps, dtype=object) if any(
            not isinstance(x, (int, np.integer)) for x in self.steps) else np.asarray(self.steps)
        df = pd.DataFrame({"step": steps, "series": pd.Series(self.series, dtype=object),
                           value_col: np.asarray(self.values, dtype=np.float64)})
        df = resolve_rewinds(df, path, warnings, by="series")
        df["step"] = df["step"].astype("int64")
        df["series"] = df["series"].astype(object)
        return df.sort_values(["series", "step"], kind="stable").reset_index(drop=True)[list(cols)]


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
              scalars=scalars[list(SCALAR_COLUMNS)], evals=ev[list(EVAL_COLUMNS)],
              checkpoints=sorted(checkpoints or [], key=lambda c: c.step),
              window_averaged=dict(window_averaged or {}), warnings=warnings, notes=list(notes or []))
    return run
