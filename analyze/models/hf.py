"""Hugging Face transformers models rebuilt from ``config.json`` alone: the transformers class the
config names, built with ``_from_config`` and eager attention (so attention probabilities are
computed), never ``trust_remote_code``. Weights come later from our safe reader.

Needs the ``[hf]`` extra; without it (or for a config that needs the model's own code) the caller
gets a `ModelUnavailable` reason to show instead of the panels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from analyze.models.base import ModelUnavailable, RebuiltModel
from loaders.errors import TrainauditError
from loaders.safeio import read_bounded

__all__ = ["build_hf", "read_config"]

INSTALL = "pip install 'trainaudit[hf]' (transformers and tokenizers)"


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict (TrainauditError when unreadable)."""
    path = folder / "config.json"
    try:
        cfg = json.loads(read_bounded(path, max_bytes=16 << 20).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TrainauditError(path, f"not a readable JSON config ({exc})") from None
    if not isinstance(cfg, dict):
        raise TrainauditError(path, "config.json is not a JSON object")
    return cfg


def _model_class(cfg: dict[str, Any], path: Path) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    model_type = cfg.get("model_type")
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) \
                and cls.__module__.startswith("transformers."):
            return cls
    if archs and cfg.get("auto_map"):
        raise ModelUnavailable(f"{path}/config.json names {archs[0]}, a model class with its own code (auto_map); "
                               "trainaudit never runs a checkpoint's code, so the model panels are weight-only")
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None:
        what = f"architecture {archs[0]!r}" if archs else f"model_type {model_type!r}"
        raise ModelUnavailable(f"{path}/config.json: {what} is not a model class of the installed transformers "
                               f"{transformers.__version__}; weight-only")
    return cls


def build_hf(folder: Path) -> RebuiltModel:
    """The transformers model a Hugging Face folder's config.json names, with random weights."""
    cfg_dict = read_config(folder)
    try:
        import transformers  # noqa: F401
        from transformers import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ModelUnavailable(f"rebuilding the Hugging Face model needs transformers: {INSTALL}") from None
    model_type = cfg_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelUnavailable(f"{folder}/config.json: model_type {model_type!r} is not known to the installed "
                               "transformers (custom code is never run); weight-only")
    cls = _model_class(cfg_dict, folder)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config advice (token ids, deprecated keys) is not the user's concern here
    try:
        config = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise ModelUnavailable(f"{folder}/config.json: {cls.__name__} cannot be built from it "
                               f"({' '.join(str(exc).split())[:200]})") from None
    finally:
        hf_logging.set_verbosity(level)
    model.eval()
    is_lm = cls.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    causal = is_lm or bool(getattr(config, "is_decoder", False))
    ctx = next((getattr(config, k) for k in ("n_positions", "max_position_embeddings")
                if isinstance(getattr(config, k, None), int)), None)
    act = next((str(getattr(config, k)) for k in ("hidden_act", "activation_function", "hidden_activation")
                if isinstance(getattr(config, k, None), str)), "")

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask.to(torch.long))
        return out.logits if is_lm else out[0]

    return RebuiltModel(module=model, kind="hf", description=f"transformers {cls.__name__} ({model_type})",
                        is_lm=is_lm, causal=causal, context=ctx, forward=forward, activation_hint=act)
