"""The in-memory run every loader produces: metadata, long tables and checkpoint references.

Every reader (our run directory, Hugging Face Trainer, Lightning, TensorBoard, nanoGPT, llm.c,
plain loss logs, bare checkpoints) turns its source into this one shape, so the analysis
never needs to know where a run came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings

# Column vocabularies of the Run tables (long / tidy: one row per step x key).
SCALAR_COLUMNS = ("step", "series", "value")          # training series: loss, grad_norm, lr, wall_time
EVAL_COLUMNS = ("step", "series", "loss")             # one row per evaluation x validation series
CLASS_LOSS_COLUMNS = ("step", "cls", "count", "loss_sum", "loss_m2")
EVAL_CLASS_LOSS_COLUMNS = ("step", "series", "cls", "count", "loss_sum", "loss_m2")
GRAD_NORM_COLUMNS = ("step", "tensor", "grad_norm")    # per-tensor training gradient norms (§11)


def empty_table(columns: tuple[str, ...]) -> pd.DataFrame:
    """An empty frame with the right columns and dtypes (step int64, names str, rest float64)."""
    dtypes = {c: ("int64" if c in ("step", "count") else "object" if c in ("series", "cls", "tensor") else "float64")
              for c in columns}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """One checkpoint on disk. ``kind``: safetensors | torch | hf-dir | sharded-safetensors."""

    step: int
    path: Path
    kind: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A built-in model named by the run (never a path to code) and its config."""

    name: str
    config: dict[str, Any]


@dataclass
class Run:
    """A loaded training run. Tables are long; steps are int64; losses in nats.

    scalars:            step, series, value     (series: loss, grad_norm, lr, wall_time, ...)
    evals:              step, series, loss      (series: the validation set's name, e.g. "val")
    class_losses:       step, cls, count, loss_sum, loss_m2   (training; Welford state per step)
    eval_class_losses:  step, series, cls, count, loss_sum, loss_m2
    grad_norms:         step, tensor, grad_norm   (per-tensor ||G||_F logged in training, §11)
    """

    path: Path
    name: str
    source_format: str
    meta: dict[str, Any] = field(default_factory=dict)
    # Training series, long (step, series, value). Big logs are kept wide instead (`train`:
    # step + one column per series, 3-5x less memory) and `scalars` is derived on first use.
    scalars: pd.DataFrame | None = None
    train: pd.DataFrame | None = None
    evals: pd.DataFrame = field(default_factory=lambda: empty_table(EVAL_COLUMNS))
    class_losses: pd.DataFrame = field(default_factory=lambda: empty_table(CLASS_LOSS_COLUMNS))
    eval_class_losses: pd.DataFrame = field(default_factory=lambda: empty_table(EVAL_CLASS_LOSS_COLUMNS))
    grad_norms: pd.DataFrame = field(default_factory=lambda: empty_table(GRAD_NORM_COLUMNS))
    checkpoints: list[CheckpointRef] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    model: ModelSpec | None = None
    eval_set_path: Path | None = None
    # series name -> number of raw steps each logged value averages (HF Trainer `loss`).
    window_averaged: dict[str, int] = field(default_factory=dict)
    warnings: DataWarnings = field(default_factory=DataWarnings)
    notes: list[str] = field(default_factory=list)
    # Files the run's library always writes that hold no weights or curves (optimizer, scheduler,
    # RNG state, training args): listed in the report as not analysed, never data warnings.
    not_analysed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if object.__getattribute__(self, "scalars") is None and self.train is None:
            self.scalars = empty_table(SCALAR_COLUMNS)

    def __getattribute__(self, name: str) -> Any:
        if name == "scalars" and object.__getattribute__(self, "scalars") is None:
            wide = object.__getattribute__(self, "train")
            long = wide.melt(id_vars="step", var_name="series", value_name="value")
            long = long[long["value"].notna() | (long["series"] == "loss")].reset_index(drop=True)
            object.__setattr__(self, "scalars", long)
        return object.__getattribute__(self, name)

    def series_names(self) -> list[str]:
        """Names of the training series present (loss first when there is one)."""
        if self.train is not None:
            names = [c for c in self.train.columns if c != "step" and self.train[c].notna().any()]
        else:
            col = self.scalars["series"]
            if isinstance(col.dtype, pd.CategoricalDtype):  # categories with a row, not 10M strings
                codes = col.cat.codes.to_numpy()
                used = np.bincount(codes[codes >= 0], minlength=len(col.cat.categories)) > 0
                names = [str(c) for c, u in zip(col.cat.categories, used) if u]
            else:
                names = [str(x) for x in pd.unique(col.astype(str))]
        return sorted(names, key=lambda n: (n != "loss", n))

    def series(self, name: str) -> pd.DataFrame:
        """One training series as a (step, value) frame sorted by step (empty when absent)."""
        if self.train is not None and name in self.train.columns:
            # No copies unless needed: a 10M-row log must not double in memory here.
            s = pd.DataFrame({"step": self.train["step"], "value": self.train[name]}, copy=False)
            if name != "loss" and s["value"].isna().any():
                s = s[s["value"].notna()]
        else:
            s = self._block(name)
        if not s["step"].is_monotonic_increasing:
            s = s.sort_values("step", kind="stable")
        return s.reset_index(drop=True)

    def series_blocks(self) -> dict[str, tuple[int, int]] | None:
        """Row range [start, end) of each series in the long table when its rows are grouped by a
        categorical series column in category order (as the loaders write it): a series is then a
        slice of the table, not a copy. None for any other layout (or a wide run)."""
        if object.__getattribute__(self, "train") is not None:
            return None
        col = self.scalars["series"]
        if not isinstance(col.dtype, pd.CategoricalDtype):
            return None
        codes = col.cat.codes.to_numpy()
        if codes.size and (codes[0] < 0 or bool((codes[1:] < codes[:-1]).any())):
            return None
        bounds = np.searchsorted(codes, np.arange(len(col.cat.categories) + 1)).tolist()
        return {str(c): (bounds[i], bounds[i + 1]) for i, c in enumerate(col.cat.categories)}

    def _block(self, name: str) -> pd.DataFrame:
        """(step, value) rows of one series of the long table: a slice when `series_blocks` allows."""
        sc = self.scalars
        blocks = self.series_blocks()
        if blocks is None:
            return sc[sc["series"] == name][["step", "value"]]
        a, b = blocks.get(name, (0, 0))
        return pd.DataFrame({"step": sc["step"].iloc[a:b], "value": sc["value"].iloc[a:b]}, copy=False)

    @property
    def steps_logged(self) -> int:
        """Number of distinct training steps with any scalar logged."""
        steps = (self.train if self.train is not None else self.scalars)["step"]
        values = steps.to_numpy()
        if len(values) < 2 or bool((values[1:] > values[:-1]).all()):  # the usual case: no hash table
            return len(values)
        return int(steps.nunique())
