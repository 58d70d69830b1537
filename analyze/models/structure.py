"""Probe points found by a model's structure, never by module names (§3, §5, §6, §12):

* blocks: the children of each ``nn.ModuleList`` whose children are all of one class and each
  hold an FFN down-projection (the transformer layer stack, whatever it is called);
* the FFN down-projection of a block: its linear map (``nn.Linear`` or transformers' ``Conv1D``)
  with the widest input that is wider than its output; its input is the post-activation FFN
  hidden state (§5), gated or not;
* attention logits and probabilities: the input and output of every softmax over the last axis
  of a (B, H, L, L) tensor during the forward pass (`SoftmaxTap`), in call order = layer order.
  Hugging Face models must run eager attention for this (they are built so).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["linear_dims", "Blocks", "find_blocks", "SoftmaxTap", "activation_kind"]


def linear_dims(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear map: nn.Linear (weight out x in) or Conv1D (weight in x out, ``nf``)."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    w = getattr(m, "weight", None)
    nf = getattr(m, "nf", None)
    if type(m).__name__ == "Conv1D" and isinstance(nf, int) and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), nf
    return None


def _down_projection(block: nn.Module) -> tuple[str, nn.Module] | None:
    best: tuple[int, str, nn.Module] | None = None
    for name, m in block.named_modules():
        dims = linear_dims(m)
        if dims is None or dims[0] <= dims[1]:
            continue
        if best is None or dims[0] >= best[0]:
            best = (dims[0], name, m)
    return None if best is None else (best[1], best[2])


@dataclass(frozen=True)
class Blocks:
    """The layer stack: (layer index, block name, block, down-projection name, down-projection)."""

    items: tuple[tuple[int, str, nn.Module, str | None, nn.Module | None], ...]


def find_blocks(model: nn.Module) -> Blocks:
    """Transformer blocks in forward order, each with its FFN down-projection (None if it has none)."""
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if any(name.startswith(c + ".") for c, _ in chosen):
            continue  # a list inside a block (heads, experts)
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not any(True for _ in m[0].parameters()):
            continue
        if all(_down_projection(c) is not None for c in m):
            chosen.extend((f"{name}.{i}" if name else str(i), c) for i, c in enumerate(m))
    items = []
    for i, (bname, b) in enumerate(chosen):
        dp = _down_projection(b)
        items.append((i, bname, b, None if dp is None else f"{bname}.{dp[0]}", None if dp is None else dp[1]))
    return Blocks(tuple(items))


def activation_kind(module: nn.Module | None, hint: str = "") -> str:
    """gelu / relu / silu / tanh / ... from an activation module's class (else the config's hint)."""
    name = (type(module).__name__ if module is not None else "").lower()
    for key, kind in (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("relu", "relu"), ("tanh", "tanh")):
        if key in name:
            return kind
    h = hint.lower()
    for key, kind in (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("relu", "relu"), ("tanh", "tanh")):
        if key in h:
            return kind
    return name or h or "unknown"


_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class SoftmaxTap(TorchFunctionMode):
    """Calls ``on_attention(i, logits, probs)`` for the i-th softmax over the key axis of a
    (B, H, L, L) tensor in one forward pass; every other call passes through untouched."""

    def __init__(self, seq_len: int, on_attention: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.on_attention = on_attention
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _SOFTMAX and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if x.dim() == 4 and dim in (-1, 3) and x.shape[-1] == x.shape[-2] == self.seq_len:
                self.on_attention(self.count, x, out)
                self.count += 1
        return out
