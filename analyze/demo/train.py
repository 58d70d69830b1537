"""Train MiniGPT on the verb corpus with the RunLogger: the built-in demo run.

Shows the logger as a user would write it: a handful of calls inside a plain PyTorch loop.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from analyze.demo import corpus
from analyze.demo.model import MiniGPT, MiniGPTConfig
from loaders.logger import RunLogger


@dataclass(frozen=True)
class DemoSettings:
    steps: int = 2000
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    eval_every: int = 50
    checkpoint_every: int = 100
    flush_every: int = 50


def masked_losses(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted loss over target tokens (§7) and per-example mean target loss (§8)."""
    tok = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L)
    m = target_mask.to(tok.dtype)
    per_example = (tok * m).sum(1) / m.sum(1).clamp_min(1.0)                   # (B,)
    return (tok * m).sum() / m.sum().clamp_min(1.0), per_example


def lr_at(step: int, s: DemoSettings) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.inference_mode()
def evaluate(model: MiniGPT, data: corpus.EncodedSet) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    loss, per_example = masked_losses(model(data.input_ids), data.targets, data.target_mask)
    model.train(was_training)
    return loss, per_example


def train_demo(out: str | Path, settings: DemoSettings = DemoSettings(),
               progress: Callable[[int, int, float], None] | None = None) -> Path:
    """Train the demo and write its run directory; returns the run path."""
    torch.manual_seed(settings.seed)
    vocab = corpus.vocabulary()
    train = corpus.encode(corpus.build_examples("train"), vocab)
    val = corpus.encode(corpus.build_examples("val"), vocab)
    cfg = MiniGPTConfig(vocab_size=len(vocab), context=corpus.CONTEXT)
    model = MiniGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batches = corpus.batches(train, settings.batch_size, settings.seed)
    out = Path(out)
    with RunLogger(out, config={**settings.__dict__, "vocab": "".join(vocab)},
                   class_names=corpus.CLASS_NAMES, flush_every=settings.flush_every,
                   run_name=out.name, model={"name": "minigpt", "config": cfg.to_dict()},
                   seed=settings.seed,
                   eval_settings={"every": settings.eval_every, "split": "val",
                                  "examples": int(val.input_ids.shape[0])}) as log:
        log.save_eval_set(input_ids=val.input_ids, targets=val.targets, target_mask=val.target_mask,
                          attention_mask=val.attention_mask, class_ids=val.class_ids)
        t0 = time.perf_counter()
        for step in range(settings.steps + 1):
            if step % settings.eval_every == 0 or step == settings.steps:
                val_loss, val_per_example = evaluate(model, val)
                log.log_eval(step, split="val", loss=val_loss, per_example_loss=val_per_example,
                             class_ids=val.class_ids, n_tokens=int(val.target_mask.sum()))
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                log.save_checkpoint(step, model)
            if step == settings.steps:
                break
            idx, targets, target_mask, class_ids = next(batches)
            lr = lr_at(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, per_example = masked_losses(model(idx), targets, target_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            log.log_step(step, loss=loss, model=model, lr=lr)
            log.log_class_losses(step, per_example, class_ids)
            opt.step()
            if progress is not None and (step % 50 == 0 or step == settings.steps - 1):
                progress(step + 1, settings.steps, time.perf_counter() - t0)
    return out
