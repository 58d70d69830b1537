"""What every rebuilt model gives the probe, and the weight loading all of them share.

A `RebuiltModel` wraps an ``nn.Module`` with a uniform ``forward(ids, attention_mask)`` (logits for
a language model, the last hidden state for an encoder) and the facts the probe needs (LM or not,
causal or not, context length). `load_weights` matches a checkpoint's tensor names to the module's
by the one name prefix that aligns most of them (``transformer.`` dropped by a reader, ``bert.``
added by a task head, ...), so no architecture needs a name list.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RebuiltModel", "ModelUnavailable", "align_names", "load_weights"]


class ModelUnavailable(Exception):
    """The model cannot be rebuilt safely; the message is the reason the panels show."""


@dataclass
class RebuiltModel:
    module: nn.Module
    kind: str                     # builtin | factory | hf | nanogpt
    description: str              # shown in notes, e.g. "transformers BertModel (bert)"
    is_lm: bool                   # next-token logits: loss, log Z, per-class loss, tau, rho
    causal: bool                  # causal attention (else every real key is visible)
    context: int | None           # longest sequence the model takes
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, bool mask) -> logits / hidden
    activation_hint: str = ""     # the config's FFN nonlinearity, when the modules do not show it


def align_names(model_keys: list[str], ckpt_keys: list[str]) -> dict[str, str]:
    """Checkpoint name -> model name, under the single prefix change (strip one, add one) that
    matches the most names; names that match under none are left out."""
    own = set(model_keys)
    cands: Counter[tuple[str, str]] = Counter({("", ""): 0})
    sample = ckpt_keys[:64]
    for c in sample:
        parts = c.split(".")
        for i in range(1, len(parts)):  # strip a leading part of the checkpoint name
            if ".".join(parts[i:]) in own:
                cands[(".".join(parts[:i]) + ".", "")] += 1
        for k in model_keys:            # add a leading part
            if k.endswith("." + c):
                cands[("", k[: len(k) - len(c)])] += 1

    def apply(strip: str, add: str) -> dict[str, str]:
        out = {}
        for c in ckpt_keys:
            if c.startswith(strip):
                m = add + c[len(strip):]
                if m in own:
                    out[c] = m
        return out

    best: dict[str, str] = {}
    for (strip, add), _ in sorted(cands.items(), key=lambda kv: (-kv[1], kv[0] != ("", ""))):
        m = apply(strip, add)
        if len(m) > len(best):
            best = m
    return best


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a checkpoint's tensors into the module; returns the problems that make it unusable
    (a parameter the checkpoint lacks, a shape that differs). Tied parameters load once."""
    own = module.state_dict(keep_vars=True)
    mapping = align_names(list(own), list(state))
    loaded = set(mapping.values())
    groups: dict[int, list[str]] = {}
    for k, v in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(v), []).append(k)
    missing = [names[0] for names in groups.values() if not any(n in loaded for n in names)]
    if missing:
        return [f"checkpoint lacks {len(missing)} of the model's {len(groups)} parameter tensors, e.g. "
                f"{missing[0]!r} (the model's layout differs from the checkpoint's)"]
    for c, k in mapping.items():
        if tuple(state[c].shape) != tuple(own[k].shape):
            return [f"tensor {c!r} has shape {tuple(state[c].shape)} in the checkpoint but {tuple(own[k].shape)} "
                    "in the model"]
    with torch.no_grad():
        for c, k in mapping.items():
            own[k].data.copy_(state[c].to(own[k].dtype))
    return []
