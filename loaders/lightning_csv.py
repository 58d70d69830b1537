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
import os
import re
from pathlib import Path
from typing import Any

from loaders.checkpoints import step_from_name
from loaders.errors import DataWarnings, TrainauditError
from loaders.longtables import Triples, build_run, classify_train_key, is_val_loss_key, to_float
from loaders.run import CheckpointRef, Run
from loaders.safeio import iter_line_batches, read_bounded

__all__ = ["STEP_KEYS", "find_metrics_csv", "read_hparams", "read_lightning", "read_metrics_csv"]

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


def read_metrics_csv(path: str | os.PathLike[str], warnings: DataWarnings, *, root: str | os.PathLike[str] | None = None,
                     source_format: str = "lightning", run_path: str | os.PathLike[str] | None = None,
                     meta: dict[str, Any] | None = None, checkpoints: list[CheckpointRef] | None = None) -> Run:
    """A wide CSV log (Lightning ``metrics.csv`` or a plain ``step,loss,...`` CSV) -> ``Run``."""
    p = Path(path)
    rows: list[tuple[int, list[str], list[str]]] = []   # (line number, fields, header) in file order
    header: list[str] | None = None
    repeated = 0
    ragged = 0
    for start, lines in iter_line_batches(p, warnings, root=root):
        for i, fields in enumerate(csv.reader(lines)):
            lineno = start + i
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
            rows.append((lineno, fields, header))
    if header is None:
        raise TrainauditError(p, "empty CSV (no header line)")
    if repeated:
        warnings.add(p, f"{repeated} repeated header line{'s' if repeated > 1 else ''} dropped")
    if ragged > _MAX_RAGGED_WARNINGS:
        warnings.add(p, f"{ragged - _MAX_RAGGED_WARNINGS} more ragged rows skipped")
    records: list[tuple[int, dict[str, str]]] = []
    cols: list[str] = []
    headers = {id(hdr): hdr for _, _, hdr in rows} or {id(header): header}
    for hdr in headers.values():
        cols.extend(h for h in hdr if h not in cols)
    for lineno, vals, hdr in rows:
        records.append((lineno, {h: v for h, v in zip(hdr, vals, strict=True) if v != ""}))
    return _records_to_run(p, records, cols, warnings, source_format=source_format,
                           run_path=run_path, meta=meta, checkpoints=checkpoints)


def _records_to_run(p: Path, records: list[tuple[int, dict[str, Any]]], cols: list[str], warnings: DataWarnings, *,
                    source_format: str, run_path: str | os.PathLike[str] | None, meta: dict[str, Any] | None,
                    checkpoints: list[CheckpointRef] | None) -> Run:
    """Sparse wide records (line, {column: value}) -> Run, with the Lightning row rules."""
    meta = dict(meta or {})
    notes: list[str] = []
    step_col = _step_key(cols)
    loss_col = _pick_train_loss(cols)
    val_cols = _val_columns(cols)
    other_train = {c: classify_train_key(c) for c in cols if c != loss_col and c != step_col}
    other_train = {c: s for c, s in other_train.items() if s in ("grad_norm", "lr")}
    test_cols = [c for c in cols if c.lower().startswith(("test", "predict"))]
    if test_cols:
        notes.append(f"test metrics not used as training or validation: {', '.join(test_cols)}")
    if loss_col is not None and loss_col.endswith("_epoch"):
        notes.append(f"training loss is logged per epoch only ({loss_col})")
    if step_col is None:
        if "epoch" in cols:
            notes.append("no step column: the epoch number is used as the step")
        else:
            notes.append("no step column: the row number is used as the step")
    train_names = [c for c in [loss_col, *other_train] if c is not None]
    train_like = [c for c in cols if c.lower().startswith("train") or c in train_names]

    def step_of(i: int, rec: dict[str, Any]) -> Any:
        if step_col is not None:
            return rec.get(step_col)
        if "epoch" in rec:
            return rec["epoch"]
        return i

    last_train = max((i for i, (_, r) in enumerate(records) if any(c in r for c in train_like)), default=-1)
    last_epoch = to_float(records[last_train][1].get("epoch")) if last_train >= 0 else None
    train, evals, extra = Triples(), Triples(), Triples()
    seen_val_steps: set[Any] = set()
    late = 0
    for i, (_lineno, rec) in enumerate(records):
        step = step_of(i, rec)
        if loss_col is not None and loss_col in rec:
            train.add(step, "loss", rec[loss_col])
        for c, s in other_train.items():
            if c in rec:
                train.add(step, s, rec[c])
        vals = [(c, s) for c, s in val_cols.items() if c in rec]
        if vals:
            st = to_float(step)
            ep = to_float(rec.get("epoch"))
            after_fit = i > last_train >= 0 and (
                (ep is not None and last_epoch is not None and ep > last_epoch) or st in seen_val_steps
                or any(c in rec for c in test_cols))
            if after_fit:
                late += 1
            else:
                for c, s in vals:
                    evals.add(step, s, rec[c])
                seen_val_steps.add(st)
        for c, v in rec.items():
            if c in (step_col, loss_col, "epoch") or c in other_train or c in val_cols or c in test_cols:
                continue
            extra.add(step, c, v)
    if late:
        warnings.add(p, f"{late} validation row{'s' if late > 1 else ''} logged after training "
                        f"(a later validate/test call) ignored")
    if loss_col is None:
        notes.append("no training-loss column found (looked for: " + ", ".join(_TRAIN_LOSS_ORDER[:6]) + ", ...)")
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
    ckpts: list[CheckpointRef] = []
    cdir = folder / "checkpoints"
    if cdir.is_dir():
        for n in sorted(os.listdir(cdir)):
            if n.endswith((".ckpt", ".pt", ".pth", ".safetensors")):
                s = step_from_name(n)
                if s is None:
                    warnings.add(cdir / n, "checkpoint step unknown (no step in the name); skipped")
                    continue
                ckpts.append(CheckpointRef(s, cdir / n, "safetensors" if n.endswith(".safetensors") else "torch"))
    run_path = p
    return read_metrics_csv(csv_path, warnings, root=root, source_format="lightning", run_path=run_path,
                            meta=meta, checkpoints=ckpts)
