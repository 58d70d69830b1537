"""nanoGPT runs: its ``ckpt.pt`` dictionaries (``model``, ``optimizer``, ``model_args``, ``iter_num``,
``best_val_loss``, ``config``), its training stdout saved to a file, and a working folder with both.

The stdout lines nanoGPT's ``train.py`` prints are read exactly (``NANOGPT_ITER``, ``NANOGPT_EVAL``)::

    iter 120: loss 2.4312, time 31.52ms, mfu 4.21%       -> training loss at step 120
    step 250: train loss 2.1034, val loss 2.1712         -> evaluation: series "train", "val"

Every other line (the config echo, "saving checkpoint to out", parameter counts) is ignored.
``iter`` losses are one iteration's loss, not a window mean. ``mfu`` is -100% until nanoGPT has
measured it (its first iterations): those values are left out. A resumed run's log restarts at
the checkpoint's ``iter_num``: the rewind policy of ``loaders.longtables`` keeps the newer points.

Checkpoints are loaded with ``torch.load(weights_only=True)`` only
(``loaders.torch_files.load_torch_object``): nanoGPT stores nothing but tensors, dicts, numbers
and strings, so nothing needs allowing. The checkpoint is at its ``iter_num``; ``run.model``
names the built-in nanoGPT model when ``model_args`` is nanoGPT's ``GPTConfig`` and the weights
have its layout. A working folder is found by its ``ckpt.pt`` (in the folder or in one ``out*/``
folder, nanoGPT's ``out_dir``) and its logs by their lines, whatever their names.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import iter_line_batches
from loaders.longtables import Triples, build_run
from loaders.run import CheckpointRef, ModelSpec, Run
from loaders.safeio import open_regular
from loaders.torch_files import load_torch_object

__all__ = ["NANOGPT_ARGS", "NANOGPT_EVAL", "NANOGPT_ITER", "find_nanogpt", "is_nanogpt_dict", "looks_like_nanogpt_log",
           "read_nanogpt", "read_nanogpt_log"]

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
NANOGPT_ITER = re.compile(rf"^iter (\d+): loss {_NUM}, time {_NUM}ms, mfu {_NUM}%\s*$", re.I)
NANOGPT_EVAL = re.compile(rf"^step (\d+): train loss {_NUM}, val loss {_NUM}\s*$", re.I)
_LOG_SUFFIXES = (".log", ".txt", ".out", ".stdout")
_PEEK = 256 << 10

NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
_NANOGPT_KEYS = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight")


def is_nanogpt_dict(obj: Any) -> bool:
    """A training-checkpoint dict in nanoGPT's shape: a ``model`` state dict and ``model_args``."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)
            and isinstance(obj.get("model_args"), Mapping))


def _plain(v: Any, depth: int = 0) -> Any:
    """JSON-friendly copy of metadata (0-d tensors to floats, placeholders dropped)."""
    import torch

    if isinstance(v, torch.Tensor):
        return float(v.item()) if v.numel() == 1 else f"<tensor {tuple(v.shape)}>"
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, Mapping) and depth < 4:
        return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and depth < 4:
        return [_plain(x, depth + 1) for x in v]
    return repr(v)[:80]


def _read_ckpt(f: Path, root: Path | None, warnings: DataWarnings) -> tuple[CheckpointRef, dict[str, Any],
                                                                           ModelSpec | None, list[str]]:
    """One ``ckpt.pt``: its checkpoint at ``iter_num``, metadata, built-in model and notes."""
    obj = load_torch_object(f, root=root, warnings=warnings)
    if not is_nanogpt_dict(obj):
        keys = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, Mapping) else type(obj).__name__
        raise TrainauditError(f, f"not a nanoGPT checkpoint (no model and model_args; has {keys})")
    model_args = _plain(obj["model_args"])
    step = obj.get("iter_num", obj.get("step", obj.get("global_step")))
    notes: list[str] = []
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        warnings.add(f, "checkpoint has no iter_num: step 0 assumed")
        step = 0
    meta: dict[str, Any] = {"model_args": model_args, "iter_num": step}
    for k in ("best_val_loss", "config"):
        if k in obj:
            meta[k] = _plain(obj[k])
    names = [k[len("_orig_mod."):] if isinstance(k, str) and k.startswith("_orig_mod.") else k for k in obj["model"]]
    model = None
    if all(a in model_args for a in NANOGPT_ARGS) and all(k in names for k in _NANOGPT_KEYS):
        model = ModelSpec("nanogpt", model_args)
    else:
        missing = [a for a in NANOGPT_ARGS if a not in model_args]
        notes.append("model_args are not nanoGPT's GPTConfig" +
                     (f" (missing {', '.join(missing)})" if missing else " (different weight layout)") +
                     ": no built-in model to rebuild; weight panels only")
    del obj
    return CheckpointRef(int(step), f, "torch"), meta, model, notes


def read_nanogpt(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """A nanoGPT ``ckpt.pt``, a stdout log, or a working folder (``ckpt.pt`` or ``out*/ckpt.pt``
    and the logs found by ``find_nanogpt``) -> ``Run``."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    root = p if p.is_dir() else None
    if p.is_dir():
        ckpt, logs = find_nanogpt(p)
        if ckpt is None and not logs:
            raise TrainauditError(p, "no ckpt.pt (in the folder or one out*/ folder) and no nanoGPT log")
    elif p.name.lower().endswith((".pt", ".pth", ".bin", ".ckpt")):
        ckpt, logs = p, []
    else:
        ckpt, logs = None, [p]
    notes: list[str] = []
    meta: dict[str, Any] = {}
    ckpts: list[CheckpointRef] = []
    model = None
    if ckpt is not None:
        ref, meta, model, notes = _read_ckpt(ckpt, root, warnings)
        ckpts.append(ref)
    if not logs and isinstance(meta.get("best_val_loss"), float):
        notes.append(f"best validation loss {meta['best_val_loss']:.4g} (stored in the checkpoint; no curve)")
    if not logs and ckpt is not None:
        run = build_run(p, "nanogpt", train=Triples(), evals=Triples(), warnings=warnings, meta=meta,
                        checkpoints=ckpts, notes=notes)
    else:
        run = read_nanogpt_log(logs, root=root, warnings=warnings, run_path=p, meta=meta, checkpoints=ckpts,
                               notes=notes)
    run.model = model
    return run


def looks_like_nanogpt_log(lines: list[str]) -> bool:
    """True when some of these lines are nanoGPT ``iter N: loss ...`` or ``step N: train loss ...``."""
    return any(NANOGPT_ITER.match(ln.strip()) or NANOGPT_EVAL.match(ln.strip()) for ln in lines)


def _is_log(f: Path, root: Path | None) -> bool:
    try:
        with open_regular(f, root) as fh:
            head = fh.read(_PEEK)
    except TrainauditError:
        return False
    if b"\x00" in head:
        return False
    return looks_like_nanogpt_log(head.decode("utf-8", "replace").splitlines())


def _collect_log(f: Path, root: Path | None, warnings: DataWarnings, train: Triples, evals: Triples,
                 extra: Triples) -> int:
    """Adds one log's points; returns the number of nanoGPT lines read."""
    n = 0
    for _start, lines in iter_line_batches(f, warnings, root=root):
        for line in lines:
            if not line.startswith(("iter ", "step ", "Iter ", "Step ")):
                continue
            ln = line.strip()
            m = NANOGPT_ITER.match(ln)
            if m:
                step = int(m.group(1))
                train.add(step, "loss", m.group(2))
                extra.add(step, "iter_time_ms", m.group(3))
                if float(m.group(4)) != -100.0:
                    extra.add(step, "mfu_percent", m.group(4))
                n += 1
                continue
            m = NANOGPT_EVAL.match(ln)
            if m:
                step = int(m.group(1))
                evals.add(step, "train", m.group(2))
                evals.add(step, "val", m.group(3))
                n += 1
    return n


def find_nanogpt(folder: Path) -> tuple[Path | None, list[Path]]:
    """A nanoGPT working folder's ``ckpt.pt`` (in it, or in its one ``out*/`` folder) and its
    stdout logs (in it or beside the checkpoint, recognised by their lines)."""
    ckpt: Path | None = folder / "ckpt.pt" if (folder / "ckpt.pt").is_file() else None
    if ckpt is None:
        outs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.is_symlink()
                      and d.name.lower().startswith("out") and (d / "ckpt.pt").is_file())
        if len(outs) == 1:
            ckpt = outs[0] / "ckpt.pt"
    where = [folder] + ([ckpt.parent] if ckpt is not None and ckpt.parent != folder else [])
    logs = [d / n for d in where for n in sorted(os.listdir(d))
            if n.lower().endswith(_LOG_SUFFIXES) and (d / n).is_file() and _is_log(d / n, folder)]
    return ckpt, logs


def read_nanogpt_log(paths: list[Path], *, root: Path | None, warnings: DataWarnings,
                     run_path: Path, meta: dict[str, Any] | None = None,
                     checkpoints: list[CheckpointRef] | None = None, notes: list[str] | None = None) -> Run:
    """nanoGPT stdout logs (several: read in order, a restart rewinds) -> ``Run``."""
    train, evals, extra = Triples(), Triples(), Triples()
    for f in paths:
        if _collect_log(f, root, warnings, train, evals, extra) == 0:
            warnings.add(f, "no nanoGPT lines (iter N: loss X, time Yms, mfu Z% / step N: train loss X, val loss Y)")
    meta = dict(meta or {})
    meta["logs"] = [str(f) for f in paths]
    meta["extra_scalars"] = extra.frame("value", paths[0] if paths else run_path, DataWarnings())
    return build_run(run_path, "nanogpt", train=train, evals=evals, warnings=warnings, meta=meta,
                     checkpoints=checkpoints, data_path=paths[0] if len(paths) == 1 else None, notes=notes)
