"""Models rebuilt for the forward-pass panels without running anyone's code.

* our built-in models, by the name the run records (`analyze.demo.model`);
* a user's own factory, given explicitly as ``--model module:function``;
* Hugging Face transformers folders: the class ``config.json`` names (`analyze.models.hf`);
* nanoGPT ``ckpt.pt``: ``model_args`` -> nanoGPT's layout built here (`analyze.models.nanogpt`).

Anything else stays weight-only, with the reason shown. `find_model` says which applies to a
checkpoint; `rebuild` builds it; `text_encoder` finds the checkpoint's own tokenizer.
"""
from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyze.models.base import ModelUnavailable, RebuiltModel, align_names, load_weights
from loaders.errors import TrainauditError

__all__ = ["ModelSource", "RebuiltModel", "ModelUnavailable", "find_model", "rebuild", "text_encoder",
           "align_names", "load_weights", "resolve_model_factory"]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where the model to probe comes from. ``kind``: builtin | factory | hf | nanogpt | "" (none:
    ``reason`` says why). Plain strings only: it travels to worker processes inside the probe spec."""

    kind: str
    path: str = ""               # hf: the folder with config.json; nanogpt: the ckpt.pt
    name: str = ""               # builtin: model name; factory: module:function
    config_json: str = "{}"      # builtin / factory: the run's model config
    dataset: str = ""            # nanogpt: config["dataset"] (where meta.pkl lives)
    reason: str = ""


def resolve_model_factory(spec: str) -> Callable[..., Any]:
    """`module:function` given explicitly by the user (the only way user code is imported)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise TrainauditError(None, f"--model must be module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise TrainauditError(None, f"--model {spec}: cannot import ({exc})") from None
    if not callable(fn):
        raise TrainauditError(None, f"--model {spec}: not callable")
    return fn


def _nanogpt_args(path: Path) -> tuple[dict[str, Any], str] | None:
    """(model_args, dataset) of a nanoGPT ckpt.pt, read with weights_only=True; None otherwise."""
    from loaders.torch_files import load_torch_object

    obj = load_torch_object(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model_args"), Mapping):
        return None
    cfg = obj.get("config")
    dataset = str(cfg.get("dataset", "")) if isinstance(cfg, Mapping) else ""
    return dict(obj["model_args"]), dataset


def find_model(checkpoint: Path | None, *, builtin: tuple[str, Mapping[str, Any]] | None = None,
               factory: str | None = None) -> ModelSource:
    """Which model the probe rebuilds for a run whose latest checkpoint is ``checkpoint``: the
    explicit factory, the built-in model the run names, a Hugging Face folder, a nanoGPT
    ckpt.pt - or none, with the reason."""
    if factory:
        cfg = json.dumps(dict(builtin[1]) if builtin else {}, sort_keys=True, default=str)
        return ModelSource("factory", name=factory, config_json=cfg)
    from analyze.demo.model import BUILTIN_MODELS

    if builtin is not None and (builtin[0] in BUILTIN_MODELS or checkpoint is None):
        return ModelSource("builtin", name=builtin[0], config_json=json.dumps(dict(builtin[1]), sort_keys=True,
                                                                             default=str))
    if checkpoint is None:
        return ModelSource("", reason="the run has no checkpoints")
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (folder / "config.json").is_file() and (checkpoint.is_dir() or checkpoint.suffix in (".safetensors", ".bin")):
        return ModelSource("hf", path=str(folder))
    if checkpoint.is_file() and checkpoint.suffix in (".pt", ".pth", ".ckpt"):
        try:
            found = _nanogpt_args(checkpoint)
        except TrainauditError as exc:
            return ModelSource("", reason=f"the checkpoint cannot be read ({exc})")
        if found is not None:
            need = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if found[0].get(k) is None]
            if need:
                return ModelSource("", reason=(f"{checkpoint.name}: model_args lack {', '.join(need)}, so this is not "
                                               "nanoGPT's GPT and cannot be rebuilt without running its code: "
                                               "weight-only (pass --model module:function to give one)"))
            return ModelSource("nanogpt", path=str(checkpoint), config_json=json.dumps(found[0], default=str),
                               dataset=found[1])
    return ModelSource("", reason=(
        "the checkpoint is neither a Hugging Face model folder (config.json) nor a nanoGPT ckpt.pt "
        "(model_args), and the run names no built-in model, so the model cannot be rebuilt without running "
        "its code: weight-only (pass --model module:function to give one)"))


def rebuild(src: ModelSource) -> RebuiltModel:
    """Build the model a `ModelSource` describes, with random weights (raises ModelUnavailable)."""
    import torch
    from torch import nn

    if src.kind == "hf":
        from analyze.models.hf import build_hf

        return build_hf(Path(src.path))
    if src.kind == "nanogpt":
        from analyze.models.nanogpt import NanoGPT, NanoGPTConfig

        try:
            cfg = NanoGPTConfig.from_model_args(json.loads(src.config_json))
        except (TypeError, ValueError) as exc:
            raise ModelUnavailable(f"{src.path}: model_args do not describe a nanoGPT GPT ({exc})") from None
        model = NanoGPT(cfg).eval()
        return RebuiltModel(model, "nanogpt", f"nanoGPT GPT ({cfg.n_layer} layers, d={cfg.n_embd})", True, True,
                            cfg.block_size, lambda ids, mask: model(ids), "gelu")
    config = json.loads(src.config_json)
    if src.kind == "factory":
        fn = resolve_model_factory(src.name)
        try:
            takes_arg = len(inspect.signature(fn).parameters) > 0
        except (TypeError, ValueError):
            takes_arg = True
        model = fn(dict(config)) if takes_arg else fn()
        if not isinstance(model, nn.Module):
            raise TrainauditError(None, f"--model {src.name}: returned {type(model).__name__}, not a torch nn.Module")
    elif src.kind == "builtin":
        from analyze.demo.model import BUILTIN_MODELS, build_model

        if src.name not in BUILTIN_MODELS:
            raise ModelUnavailable(f"the run names model {src.name!r}, which is not a built-in model "
                                   f"({', '.join(BUILTIN_MODELS)}); pass --model module:function to enable the "
                                   "activation panels")
        try:
            model = build_model(src.name, config)
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelUnavailable(f"the built-in model {src.name!r} cannot be built from the run's config "
                                   f"({exc})") from None
    else:
        raise ModelUnavailable(src.reason or "no model to rebuild")
    model.eval()
    ctx = getattr(getattr(model, "cfg", None), "context", None)

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids)

    return RebuiltModel(model, src.kind, f"{src.kind} model {src.name}", True, True,
                        ctx if isinstance(ctx, int) else None, forward)


def text_encoder(src: ModelSource, search: list[Path]) -> Any:
    """The checkpoint's own tokenizer as a `loaders.evaldata.TextEncoder` (raises TrainauditError
    saying what to pass when there is none). ``search``: folders to look in besides the model's
    (the eval file's, the run's)."""
    from loaders.evaldata import char_encoder, gpt2_tokenizer_file, json_encoder

    if src.kind == "hf":
        folder = Path(src.path)
        for d in (folder, folder.parent, *search):
            if (d / "tokenizer.json").is_file():
                return json_encoder(d / "tokenizer.json")
        raise TrainauditError(folder, "no tokenizer.json beside the checkpoint or in the run, so text cannot be "
                                      "tokenised: save the tokenizer with the model or pass a token file")
    if src.kind == "nanogpt":
        ckpt = Path(src.path)
        roots = [*search, ckpt.parent, ckpt.parent.parent, Path.cwd()]
        metas = [d / "meta.pkl" for d in search]
        if src.dataset:
            metas += [r / "data" / src.dataset / "meta.pkl" for r in roots]
        for m in metas:
            if m.is_file():
                return char_encoder(m)
        tok = gpt2_tokenizer_file([*search, ckpt.parent])
        if tok is not None:
            return json_encoder(tok)
        where = f"data/{src.dataset}/meta.pkl" if src.dataset else "meta.pkl"
        raise TrainauditError(ckpt, f"no {where} found, so this nanoGPT run uses GPT-2 BPE, whose vocabulary is not "
                                    "available offline: pass --eval-data a token file (val.bin) or put GPT-2's "
                                    "tokenizer.json beside the text file")
    raise TrainauditError(None, f"a text evaluation file needs the checkpoint's tokenizer, which a {src.kind or 'weight-only'} "
                                "model does not have: pass a token file (.bin) or eval_set.safetensors")
