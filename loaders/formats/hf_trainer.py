"""Hugging Face Trainer runs: an output folder with ``checkpoint-N/`` or a ``trainer_state.json``.

``log_history`` entries become Run tables: ``loss`` (a window mean over
``logging_steps`` raw steps, marked in ``run.window_averaged`` so the spike detector reports
its reduced sensitivity, §9), ``grad_norm``, ``learning_rate`` -> ``lr``; every
``eval_loss`` / ``eval_<name>_loss`` becomes one validation series. Transformers writes the
file with ``json.dumps(indent=2)``, so ``NaN`` / ``Infinity`` tokens occur and are accepted.
Pickled side files in checkpoint folders are never opened (bad-inputs.md A6).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from loaders.checkpoint_files import skipped_side_files
from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import read_json
from loaders.longtables import Triples, build_run, classify_train_key, is_val_loss_key, to_float
from loaders.run import CheckpointRef, Run

__all__ = ["MAX_STATE_BYTES", "checkpoint_dirs", "is_trainer_state", "read_hf", "read_trainer_state"]

MAX_STATE_BYTES = 1 << 30
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_META_KEYS = ("global_step", "max_steps", "logging_steps", "eval_steps", "save_steps", "epoch",
              "num_train_epochs", "train_batch_size", "best_metric", "best_model_checkpoint",
              "best_global_step", "total_flos")
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_dirs(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``checkpoint-N`` sub-folders sorted numerically (not as strings: 900 < 1000)."""
    out = []
    for name in os.listdir(folder):
        m = _CKPT_RE.match(name)
        if m and (Path(folder) / name).is_dir() and not (Path(folder) / name).is_symlink():
            out.append((int(m.group(1)), Path(folder) / name))
    return sorted(out)


def _parse_state(path: Path, root: Path | None) -> dict[str, Any]:
    obj = read_json(path, root, max_bytes=MAX_STATE_BYTES)
    if not isinstance(obj, dict) or not isinstance(obj.get("log_history"), list):
        raise TrainauditError(path, "not a trainer_state.json (no log_history list)")
    return obj


def is_trainer_state(obj: Any) -> bool:
    """A parsed JSON object shaped like Transformers' TrainerState."""
    return isinstance(obj, dict) and isinstance(obj.get("log_history"), list)


def _collect(state: dict[str, Any], path: Path, warnings: DataWarnings) -> tuple[Triples, Triples, dict[str, Any]]:
    train, evals, extra = Triples(), Triples(), Triples()
    no_step = 0
    ignored: set[str] = set()
    for entry in state["log_history"]:
        if not isinstance(entry, dict):
            no_step += 1
            continue
        step = entry.get("step")
        if step is None:
            no_step += 1
            ignored.update(k for k in entry if k != "epoch")
            continue
        is_eval = any(is_val_loss_key(k) for k in entry)
        is_summary = "train_runtime" in entry or "train_loss" in entry and "loss" not in entry
        for k, v in entry.items():
            if k in ("step", "epoch"):
                continue
            if is_val_loss_key(k):
                evals.add(step, k, v)
                continue
            if is_summary or any(k.endswith(s) for s in _NOT_METRICS) or k in ("total_flos", "remaining_time"):
                continue
            series = classify_train_key(k) if not is_eval else None
            if series is not None and k != "train_loss":
                train.add(step, series, v)
            elif to_float(v) is not None:
                extra.add(step, k, v)
        if "epoch" in entry and not is_eval and not is_summary:
            extra.add(step, "epoch", entry["epoch"])
    meta = {k: state[k] for k in _META_KEYS if k in state}
    if no_step:
        what = f" ({', '.join(sorted(ignored)[:4])}{', ...' if len(ignored) > 4 else ''})" if ignored else ""
        msg = f"{no_step} log_history entr{'ies' if no_step > 1 else 'y'} without a step ignored{what}"
        if ignored and all(k.startswith(("predict_", "test_")) for k in ignored):
            meta["notes"] = [msg + ": test-set predictions, not training history"]
        else:
            warnings.add(path, msg)
    meta["extra_scalars"] = extra.frame("value", path, DataWarnings())
    return train, evals, meta


def _logging_steps(state: dict[str, Any], train: Triples) -> int | None:
    ls = state.get("logging_steps")
    if isinstance(ls, int) and not isinstance(ls, bool) and ls > 0:
        return ls
    steps = np.unique(train.steps_of("loss"))
    if len(steps) >= 2:
        return int(np.median(np.diff(steps)))  # older Transformers did not store logging_steps
    return None


def read_trainer_state(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None,
                       warnings: DataWarnings | None = None, run_path: str | os.PathLike[str] | None = None,
                       checkpoints: list[CheckpointRef] | None = None) -> Run:
    """One ``trainer_state.json`` -> ``Run`` (source_format "hf")."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    state = _parse_state(p, Path(root) if root is not None else None)
    train, evals, meta = _collect(state, p, warnings)
    meta["trainer_state"] = str(p)
    ls = _logging_steps(state, train)
    window = {"loss": ls} if ls is not None and ls > 1 else {}
    notes = list(meta.pop("notes", []))
    if window:
        notes.append(f"training loss is a mean over {ls} steps (Hugging Face logging_steps)")
    rp = Path(run_path) if run_path is not None else p
    return build_run(rp, "hf", train=train, evals=evals, warnings=warnings, meta=meta,
                     checkpoints=checkpoints, data_path=p, window_averaged=window, notes=notes)


def _has_weights(d: Path) -> bool:
    return any((d / w).exists() for w in _WEIGHTS)


def read_hf(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """An HF output folder (``checkpoint-N/`` + final weights), one checkpoint folder, or a
    ``trainer_state.json`` file. The newest readable ``trainer_state.json`` is used; a truncated
    newest one falls back to the previous one with a warning (row D18), and with none readable
    the checkpoints are still returned."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    if p.is_file():
        return read_trainer_state(p, warnings=warnings)
    ckpts: list[CheckpointRef] = []
    dirs = checkpoint_dirs(p)
    if not dirs and _CKPT_RE.match(p.name) and _has_weights(p):
        dirs = [(int(_CKPT_RE.match(p.name).group(1)), p)]  # type: ignore[union-attr]
    skipped: list[str] = []
    for step, d in dirs:
        if _has_weights(d):
            ckpts.append(CheckpointRef(step, d, "hf-dir"))
        else:
            warnings.add(d, "no weights in checkpoint folder (looked for model.safetensors, pytorch_model.bin)")
        skipped.extend(f"{d.name}/{n}" for n in skipped_side_files(d))
    if dirs and dirs[0][1] != p:
        skipped.extend(skipped_side_files(p))  # trainer.save_model() writes training_args.bin at the top
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.add(p, f"skipped {shown} (pickled object{'s' if len(skipped) > 1 else ''}, not needed)")
    candidates = [d / "trainer_state.json" for _, d in reversed(dirs)]
    if p / "trainer_state.json" not in candidates:
        candidates.insert(0, p / "trainer_state.json")
    candidates = [c for c in candidates if c.exists() or c.is_symlink()]
    final_step = None
    errors: list[str] = []
    run: Run | None = None
    for c in candidates:
        try:
            run = read_trainer_state(c, root=p, warnings=warnings, run_path=p)
            break
        except TrainauditError as e:
            errors.append(str(e))
            warnings.add(c, f"{e.problem}; trying an older trainer_state.json")
    if run is None:
        if not ckpts and not _has_weights(p):
            if errors:
                raise TrainauditError(p, f"no readable trainer_state.json ({errors[0]})")
            raise TrainauditError(p, "no trainer_state.json and no checkpoint-N folders")
        run = build_run(p, "hf", train=Triples(), evals=Triples(), warnings=warnings,
                        notes=["no readable trainer_state.json: loss curves unavailable"])
    else:
        final_step = run.meta.get("global_step")
    if _has_weights(p) and p not in [c.path for c in ckpts]:
        step = final_step if isinstance(final_step, int) else (ckpts[-1].step + 1 if ckpts else 0)
        if step not in {c.step for c in ckpts}:
            ckpts.append(CheckpointRef(step, p, "hf-dir"))
    run.checkpoints = sorted(ckpts, key=lambda c: c.step)
    return run
