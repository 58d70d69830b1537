"""MiniGPT: a ~103k-parameter decoder-only transformer (nanoGPT-style, pre-norm, tied head).

Unlike nanoGPT it computes attention probabilities explicitly and routes them, the masked
pre-softmax scores and the FFN hidden activation through named identity/activation modules,
so forward hooks can read them (§5, §6, §12):

    model.blocks[i].attn.scores   (B, H, L, L) masked logits (-inf above the diagonal)
    model.blocks[i].attn.probs    (B, H, L, L) softmax probabilities
    model.blocks[i].mlp.act       (B, L, d_ff) GELU output
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class MiniGPTConfig:
    vocab_size: int = 32
    context: int = 48      # block size L
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_ff: int = 256
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MiniGPTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MiniGPTConfig) -> None:
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.scores = nn.Identity()   # hook point: masked pre-softmax logits
        self.probs = nn.Identity()    # hook point: attention probabilities
        self.drop = nn.Dropout(cfg.dropout)
        causal = torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool))
        self.register_buffer("causal", causal.view(1, 1, cfg.context, cfg.context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, L, hs)
        k = k.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, L, hs)
        v = v.view(B, L, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, L, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])          # (B, H, L, L)
        att = self.scores(att.masked_fill(~self.causal[:, :, :L, :L], float("-inf")))
        att = self.probs(F.softmax(att, dim=-1))
        y = self.drop(att) @ v                                            # (B, H, L, hs)
        y = y.transpose(1, 2).contiguous().view(B, L, C)                  # (B, L, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: MiniGPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.act = nn.GELU()          # hook point: FFN hidden activation (B, L, d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: MiniGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MiniGPT(nn.Module):
    def __init__(self, cfg: MiniGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying (as in nanoGPT)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, L = idx.shape
        pos = torch.arange(L, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))   # (B, L, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))                  # (B, L, V)

    def num_parameters(self) -> int:
        """Parameters counted once (the tied head shares the embedding)."""
        return sum(p.numel() for p in self.parameters())


BUILTIN_MODELS = ("minigpt",)


def build_model(name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build a built-in model by name. Only names in BUILTIN_MODELS are accepted: a run's
    files can name a model but never point at code."""
    if name == "minigpt":
        return MiniGPT(MiniGPTConfig.from_dict(config))
    raise KeyError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
