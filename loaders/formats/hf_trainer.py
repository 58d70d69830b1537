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

from loaders.checkpoint_layout import dedupe, not_analysed, recorded_step, same_weights
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


def _final_step(p: Path, run: Run | None, ckpts: list[CheckpointRef], warnings: DataWarnings) -> int:
    """Step of the final ``save_model`` weights at the top of an output folder: the top
    ``trainer_state.json``'s ``global_step`` (``save_state``); else the newest checkpoint's step when
    the weights are the same; else the ``max_steps`` the run recorded (training ran to its end,
    which is when ``save_model`` is usually called); else one past the newest checkpoint, with a
    warning."""
    if run is not None and Path(run.meta.get("trainer_state", "")) == p / "trainer_state.json":
        gs = run.meta.get("global_step")
        if isinstance(gs, int) and not isinstance(gs, bool):
            return gs
    if ckpts and same_weights(CheckpointRef(ckpts[-1].step, p, "hf-dir"), ckpts[-1]):
        return ckpts[-1].step
    ms = run.meta.get("max_steps") if run is not None else None
    if isinstance(ms, int) and not isinstance(ms, bool) and ms > 0:
        run.notes.append(f"final weights in {p.name}/ taken as step {ms} (the run's max_steps; "  # type: ignore[union-attr]
                         f"no trainer_state.json beside them)")
        return ms
    step = ckpts[-1].step + 1 if ckpts else 0
    warnings.add(p, f"no recorded step for the final weights: step {step} assumed (file order)")
    return step


def read_hf(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """An HF output folder (``checkpoint-N/`` + final weights), one checkpoint folder, or a
    ``trainer_state.json`` file (with the checkpoint folder it sits in). The newest readable
    ``trainer_state.json`` is used; a truncated newest one falls back to the previous one with a
    warning (row D18), and with none readable the checkpoints are still returned. Each checkpoint
    is at the step it records (``loaders.checkpoint_layout``); the optimizer, scheduler, RNG and
    training-args files are listed in ``run.not_analysed``."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    given_state: Path | None = None
    if p.is_file():
        given_state = p
        p = p.parent
        if not (_has_weights(p) or checkpoint_dirs(p)):
            return read_trainer_state(given_state, warnings=warnings)
    ckpts: list[CheckpointRef] = []
    dirs = checkpoint_dirs(p)
    if not dirs and _CKPT_RE.match(p.name) and _has_weights(p):
        dirs = [(int(_CKPT_RE.match(p.name).group(1)), p)]  # type: ignore[union-attr]
    skipped: list[str] = []
    for n, d in dirs:
        if _has_weights(d):
            step, _ = recorded_step(d, root=p)
            ckpts.append(CheckpointRef(n if step is None else step, d, "hf-dir"))
        else:
            warnings.add(d, "no weights in checkpoint folder (looked for model.safetensors, pytorch_model.bin)")
        skipped.extend(not_analysed(d, f"{d.name}/" if d != p else ""))
    if not dirs or dirs[0][1] != p:
        skipped.extend(not_analysed(p))  # trainer.save_model() writes training_args.bin at the top
    candidates = [d / "trainer_state.json" for _, d in reversed(dirs)]
    if p / "trainer_state.json" not in candidates:
        candidates.insert(0, p / "trainer_state.json")
    if given_state is not None:
        candidates = [given_state]
    candidates = [c for c in candidates if c.exists() or c.is_symlink()]
    errors: list[str] = []
    run: Run | None = None
    for c in candidates:
        try:
            run = read_trainer_state(c, root=p, warnings=warnings, run_path=p)
            break
        except TrainauditError as e:
            if given_state is not None:
                raise  # the file the user named must be readable
            errors.append(str(e))
            warnings.add(c, f"{e.problem}; trying an older trainer_state.json")
    if run is None:
        if not ckpts and not _has_weights(p):
            if errors:
                raise TrainauditError(p, f"no readable trainer_state.json ({errors[0]})")
            raise TrainauditError(p, "no trainer_state.json and no checkpoint-N folders")
        run = build_run(p, "hf", train=Triples(), evals=Triples(), warnings=warnings,
                        notes=["no readable trainer_state.json: loss curves unavailable"])
    ckpts = dedupe(ckpts, warnings)
    if _has_weights(p) and p not in [c.path for c in ckpts]:
        ckpts.append(CheckpointRef(_final_step(p, run, ckpts, warnings), p, "hf-dir"))
    run.checkpoints = dedupe(ckpts, warnings)
    run.not_analysed = skipped
    return run
