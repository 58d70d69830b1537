"""PyTorch Lightning ``CSVLogger`` output (``metrics.csv``) and other wide, sparse CSV loss logs.

Lightning writes one wide row per ``log`` call, so training and validation values sit on
separate sparse rows, ``self.log(..., on_step=True, on_epoch=True)`` gives ``*_step`` and
``*_epoch`` columns, and a ``trainer.validate()`` / ``trainer.test()`` after ``fit`` appends
rows that are not training history. This reader (bad-inputs.md D17):

* prefers the per-step training series (``train_loss_step`` over ``train_loss`` over
  ``train_loss_epoch``);
* drops repeated header lines, warns about ragged rows with their line numbers and keeps the
  rest;
* never reads ``test_*`` columns as training or validation, and drops validation rows logged
  after the last training row by a later ``validate`` call (epoch past the last training epoch
  or no new step);
* reads ``hparams.yaml`` with ``yaml.safe_load`` only, when PyYAML is importable.
"""
from __future__ import annotations

import csv
import math
import os
import re
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from loaders.checkpoint_layout import checkpoints_beside
from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import iter_line_batches
from loaders.longtables import Triples, WideLog, build_run, classify_train_key, is_val_loss_key, to_float
from loaders.run import CheckpointRef, Run
from loaders.safeio import read_bounded

__all__ = ["STEP_KEYS", "find_metrics_csv", "read_hparams", "read_lightning", "read_metrics_csv", "wide_to_run"]

STEP_KEYS = ("step", "global_step", "trainer/global_step", "train/global_step", "_step", "iter",
             "iteration", "it", "steps", "num_steps", "update", "batch")
_TRAIN_LOSS_ORDER = ("train_loss_step", "train/loss_step", "loss_step", "train_loss", "train/loss", "loss",
                     "training_loss", "trl", "loss/train", "train_loss_epoch", "train/loss_epoch", "loss_epoch")
_MAX_RAGGED_WARNINGS = 20
_VERSION_RE = re.compile(r"^version_(\d+)$")


def _pick_train_loss(cols: list[str]) -> str | None:
    lower = {c.lower(): c for c in cols}
    for name in _TRAIN_LOSS_ORDER:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def _val_columns(cols: list[str]) -> dict[str, str]:
    """Validation-loss column -> series name. ``val_loss_epoch`` beats ``val_loss_step``."""
    out: dict[str, str] = {}
    for c in cols:
        if not is_val_loss_key(c):
            continue
        base = re.sub(r"_(epoch|step)$", "", c)
        if c.endswith("_step") and any(x in cols for x in (base, base + "_epoch")):
            continue
        if c.endswith("_epoch") and base in cols:
            continue
        out[c] = base
    return out


def _step_key(cols: list[str]) -> str | None:
    lower = {c.lower(): c for c in cols}
    for k in STEP_KEYS:
        if k in lower:
            return lower[k]
    return None


def _is_header(fields: list[str]) -> bool:
    return bool(fields) and all(to_float(f) is None for f in fields if f != "") and any(
        f.strip().lower() in ("step", "epoch") or f.strip().lower() in STEP_KEYS for f in fields)


def _csv_rows(lines: list[str], start: int) -> list[tuple[int, list[str] | None]]:
    """Parse one batch of lines, one CSV row per line (a multi-line quoted field is malformed)."""
    try:
        rows = list(csv.reader(lines, strict=True))
        if len(rows) == len(lines):
            return list(enumerate(rows, start))  # type: ignore[arg-type]
    except csv.Error:
        pass
    out: list[tuple[int, list[str] | None]] = []
    for i, line in enumerate(lines):
        try:
            r = list(csv.reader([line], strict=True))
        except csv.Error:
            out.append((start + i, None))
            continue
        out.append((start + i, r[0] if len(r) == 1 else (None if r else [])))
    return out


def read_metrics_csv(path: str | os.PathLike[str], warnings: DataWarnings, *,
                     root: str | os.PathLike[str] | None = None,
                     source_format: str = "lightning", run_path: str | os.PathLike[str] | None = None,
                     meta: dict[str, Any] | None = None, checkpoints: list[CheckpointRef] | None = None) -> Run:
    """A wide CSV log (Lightning ``metrics.csv`` or a plain ``step,loss,...`` CSV) -> ``Run``."""
    p = Path(path)
    log = WideLog(STEP_KEYS, p)
    header: list[str] | None = None
    repeated = 0
    ragged = 0
    for start, lines in iter_line_batches(p, warnings, root=root):
        for lineno, fields in _csv_rows(lines, start):
            if fields is None:
                warnings.add(p, "malformed CSV row (stray quote or carriage return), skipped", line=lineno)
                continue
            if not fields or all(not f.strip() for f in fields):
                continue
            fields = [f.strip() for f in fields]
            if header is None:
                header = fields
                continue
            if fields == header:
                repeated += 1
                continue
            if _is_header(fields):
                warnings.add(p, "a different header line; columns switched", line=lineno)
                header = fields
                continue
            if len(fields) != len(header):
                ragged += 1
                if ragged <= _MAX_RAGGED_WARNINGS:
                    warnings.add(p, f"ragged row ({len(fields)} fields, header has {len(header)}), skipped",
                                 line=lineno)
                continue
            log.add(dict(zip(header, fields, strict=True)))
    if header is None:
        raise TrainauditError(p, "empty CSV (no header line)")
    if repeated:
        warnings.add(p, f"{repeated} repeated header line{'s' if repeated > 1 else ''} dropped")
    if ragged > _MAX_RAGGED_WARNINGS:
        warnings.add(p, f"{ragged - _MAX_RAGGED_WARNINGS} more ragged rows skipped")
    for h in header:
        log.cols.setdefault(h, (array("i"), array("d"), array("q")))  # columns with no value yet
    return wide_to_run(p, log, warnings, source_format=source_format, run_path=run_path, meta=meta,
                       checkpoints=checkpoints)


def wide_to_run(p: Path, log: WideLog, warnings: DataWarnings, *, source_format: str,
                run_path: str | os.PathLike[str] | None = None, meta: dict[str, Any] | None = None,
                checkpoints: list[CheckpointRef] | None = None) -> Run:
    """Sparse wide records -> Run, with the Lightning row rules (see the module docstring).
    Consumes ``log`` (its columns are released once copied)."""
    meta = dict(meta or {})
    notes: list[str] = []
    cols = log.columns()
    step_col = _step_key(cols)
    loss_col = _pick_train_loss(cols)
    val_cols = _val_columns(cols)
    other_train = {c: classify_train_key(c) for c in cols if c != loss_col and c != step_col}
    other_train = {c: s for c, s in other_train.items() if s in ("grad_norm", "lr")}
    test_cols = [c for c in cols if c.lower().startswith(("test", "predict"))]
    epoch_col = next((c for c in cols if c.lower() == "epoch"), None)
    if test_cols:
        notes.append(f"test metrics not used as training or validation: {', '.join(test_cols)}")
    if loss_col is not None and loss_col.endswith("_epoch"):
        notes.append(f"training loss is logged per epoch only ({loss_col})")
    if step_col is None:
        notes.append("no step column: the epoch number is used as the step" if epoch_col is not None
                     else "no step column: the row number is used as the step")
    train_names = [c for c in [loss_col, *other_train] if c is not None]
    train_like = [c for c in cols if c.lower().startswith("train") or c in train_names]
    last_train = max((int(r[-1]) for c in train_like if len(r := log.present(c))), default=-1)
    epochs = log.dense(epoch_col) if epoch_col is not None else None
    last_epoch = float(epochs[last_train]) if epochs is not None and last_train >= 0 else math.nan
    step_only = step_col is not None and step_col not in (epoch_col, *train_like)  # read for the steps alone
    if step_only:
        log.drop(step_col, keep_ints=True)  # steps are read from the exact integers alone
    steps, valid = log.row_steps(step_col if step_col is not None else epoch_col, p, warnings)
    if step_only:
        log.drop(step_col)  # now in `steps`

    train, evals, extra = Triples(), Triples(), Triples()

    def put(t: Triples, col: str, series: str, keep_rows: np.ndarray | None = None) -> None:
        rows, vals = log.rows(col), log.values(col)
        ok = valid[rows]
        if keep_rows is not None:
            ok &= keep_rows[rows]
        if ok.all():  # no masked copies; `vals` is a view that keeps the column's buffer alive
            t.extend(steps[rows], series, vals)
        else:
            t.extend(steps[rows[ok]], series, vals[ok])
        if log.n_bad(col):
            t.bad[series] += log.n_bad(col)
        log.drop(col)  # each column is copied out once: free it before the next one is

    if loss_col is not None:
        put(train, loss_col, "loss")
    for c, s in other_train.items():
        put(train, c, s)
    # Validation rows: those after the last training row come from a later validate()/test() call
    # when the epoch is past training, the step was already evaluated, or test metrics share the row.
    val_rows = np.unique(np.concatenate([log.present(c) for c in val_cols] or [np.empty(0, np.int64)]))
    accepted = np.zeros(log.n, dtype=bool)
    early = val_rows[val_rows <= last_train] if last_train >= 0 else val_rows
    accepted[early] = True
    seen = set(steps[early[valid[early]]].tolist())
    test_rows = np.zeros(log.n, dtype=bool)
    for c in test_cols:
        test_rows[log.present(c)] = True
    late = 0
    for r in val_rows[val_rows > last_train] if last_train >= 0 else []:
        past_epoch = epochs is not None and epochs[r] > last_epoch
        if past_epoch or (valid[r] and int(steps[r]) in seen) or test_rows[r]:
            late += 1
            continue
        accepted[r] = True
        if valid[r]:
            seen.add(int(steps[r]))
    for c, s in val_cols.items():
        put(evals, c, s, keep_rows=accepted)
    if late:  # an ordinary fit-then-validate/test workflow, not a problem in the file: a note
        notes.append(f"{late} validation row{'s' if late > 1 else ''} logged after training "
                     f"(a later validate/test call) not used as validation history")
    for c in cols:
        if c in (step_col, loss_col, epoch_col) or c in other_train or c in val_cols or c in test_cols:
            continue
        put(extra, c, c)
    if loss_col is None:
        notes.append("no training-loss column found (looked for: " + ", ".join(_TRAIN_LOSS_ORDER[:6]) + ", ...)")
    log.release()  # every cell was copied into the triples: free the columns before the tables are built
    del steps, valid, accepted, test_rows  # per-row arrays (9 bytes a row and more): not needed past here
    meta["extra_scalars"] = extra.frame("value", p, DataWarnings())
    meta["train_loss_column"] = loss_col
    meta["metrics_file"] = str(p)
    rp = Path(run_path) if run_path is not None else p
    return build_run(rp, source_format, train=train, evals=evals, warnings=warnings, meta=meta,
                     checkpoints=checkpoints, data_path=p, notes=notes)


def read_hparams(path: Path, warnings: DataWarnings, root: Path | None = None) -> dict[str, Any] | None:
    """``hparams.yaml`` through ``yaml.safe_load`` (row A9); None if absent, unsafe or no PyYAML."""
    try:
        import yaml
    except ImportError:
        return None
    try:
        raw = read_bounded(path, root, max_bytes=16 << 20)
    except TrainauditError as e:
        warnings.add(path, f"{e.problem}; ignored")
        return None
    try:
        obj = yaml.safe_load(raw.decode("utf-8-sig", errors="replace"))
    except yaml.constructor.ConstructorError:
        warnings.add(path, "unsafe YAML tag ignored (file not used)")
        return None
    except yaml.YAMLError as e:
        warnings.add(path, f"not valid YAML ({type(e).__name__}); ignored")
        return None
    return obj if isinstance(obj, dict) else None


def find_metrics_csv(folder: Path) -> Path | None:
    """``metrics.csv`` in the folder, else in the newest ``version_N/`` (also under ``lightning_logs/``)."""
    if (folder / "metrics.csv").is_file():
        return folder / "metrics.csv"
    for base in (folder, folder / "lightning_logs"):
        if not base.is_dir():
            continue
        versions = sorted((int(m.group(1)), base / n) for n in os.listdir(base)
                          if (m := _VERSION_RE.match(n)) and (base / n / "metrics.csv").is_file())
        if versions:
            return versions[-1][1] / "metrics.csv"
    return None


def read_lightning(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """A Lightning ``metrics.csv`` file or a folder holding one (``version_N/`` picked newest)."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    csv_path = p if p.is_file() else find_metrics_csv(p)
    if csv_path is None:
        raise TrainauditError(p, "no metrics.csv (looked in the folder, version_N/, lightning_logs/version_N/)")
    folder = csv_path.parent
    root = p if p.is_dir() else None
    meta: dict[str, Any] = {}
    if p.is_dir() and csv_path.parent != p:
        others = sorted(x.name for x in csv_path.parent.parent.iterdir()
                        if _VERSION_RE.match(x.name) and x != csv_path.parent)
        if others:
            warnings.add(p, f"several Lightning versions; reading {csv_path.parent.name} (newest), "
                            f"not {', '.join(others)}")
    hp = folder / "hparams.yaml"
    if hp.exists():
        h = read_hparams(hp, warnings, root)
        if h is not None:
            meta["hparams"] = h
    skipped: list[str] = []
    ckpts = checkpoints_beside([folder, p] if p.is_dir() else [folder], root=root if root is not None else folder,
                               warnings=warnings, skipped=skipped)
    run_path = p
    run = read_metrics_csv(csv_path, warnings, root=root, source_format="lightning", run_path=run_path,
                           meta=meta, checkpoints=ckpts)
    run.not_analysed = skipped
    return run
