"""nanoGPT ``ckpt.pt`` dictionaries (``model``, ``optimizer``, ``model_args``, ``iter_num``,
``best_val_loss``, ``config``) and similar single-file training checkpoints.

Loaded with ``torch.load(weights_only=True)`` only (``loaders.checkpoints.load_torch_object``):
nanoGPT stores nothing but tensors, dicts, numbers and strings, so nothing needs allowing.
The run has one checkpoint at ``iter_num``; ``run.model`` names the built-in nanoGPT model when
``model_args`` is nanoGPT's ``GPTConfig`` and the weights have its layout.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.longtables import Triples, build_run
from loaders.run import CheckpointRef, ModelSpec, Run
from loaders.torch_files import load_torch_object

__all__ = ["NANOGPT_ARGS", "is_nanogpt_dict", "read_nanogpt"]

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


def read_nanogpt(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """``ckpt.pt`` (or a folder holding it, e.g. nanoGPT's ``out/``) -> ``Run`` with one checkpoint."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    f = p / "ckpt.pt" if p.is_dir() else p
    if not f.is_file():
        raise TrainauditError(p, "no ckpt.pt")
    obj = load_torch_object(f, root=p if p.is_dir() else None, warnings=warnings)
    if not is_nanogpt_dict(obj):
        keys = ", ".join(sorted(str(k) for k in obj)[:8]) if isinstance(obj, Mapping) else type(obj).__name__
        raise TrainauditError(f, f"not a nanoGPT checkpoint (no model and model_args; has {keys})")
    model_args = _plain(obj["model_args"])
    step = obj.get("iter_num", obj.get("step", obj.get("global_step")))
    notes: list[str] = []
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        notes.append("checkpoint has no iter_num: step 0 assumed")
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
    if isinstance(meta.get("best_val_loss"), float):
        notes.append(f"best validation loss {meta['best_val_loss']:.4g} (stored in the checkpoint; no curve)")
    del obj
    run = build_run(p, "nanogpt", train=Triples(), evals=Triples(), warnings=warnings,
                    meta=meta,
                    checkpoints=[CheckpointRef(int(step), f, "torch")], notes=notes)
    run.model = model
    return run
