"""Model-based metrics of one checkpoint: run the stored evaluation set through the rebuilt model
with forward hooks (§3, §5, §6, §7-§8, §12) and one backward pass (§11).

Only built-in models are rebuilt by name (`analyze.demo.model.build_model`); a user's own model
comes from an explicit ``module:function`` given on the command line, never from a run's files.
Hook points follow MiniGPT's names (and any model that uses the same ones):

    blocks.<i>             block output (B, L, d)          -> activation magnitude (§3)
    blocks.<i>.mlp.act     FFN hidden activation            -> dead units (§5)
    blocks.<i>.attn.probs  attention probabilities          -> entropy, dead heads, labels (§6)
    blocks.<i>.attn.scores masked pre-softmax logits        -> max attention logit (§12)
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analyze.metrics.activations import mean_abs_activation
from analyze.metrics.attention import HeadStatsState, causal_visible, log_partition, max_attention_logit
from analyze.metrics.gradients import classify_rho, grad_to_weight_ratio
from analyze.metrics.losses import ClassLossState, per_example_loss, per_token_loss, token_losses
from analyze.metrics.neurons import DeadNeuronState
from analyze.metrics.welford import RunningStats
from loaders.errors import TrainauditError

__all__ = ["EvalSet", "ModelProbe", "load_eval_set", "resolve_model_factory", "find_hook_points", "HookPoints"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|h|layers)\.(\d+)(?:\.|$)")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|h|layers)\.(\d+)$")


@dataclass(frozen=True, slots=True)
class EvalSet:
    """The stored evaluation set, shifted so position t predicts targets[:, t] (§7)."""

    input_ids: torch.Tensor       # (N, L) int64
    targets: torch.Tensor         # (N, L) int64
    target_mask: torch.Tensor     # (N, L) bool: positions whose next token is a target token
    attention_mask: torch.Tensor  # (N, L) bool: real (non-padding) tokens
    class_ids: torch.Tensor | None  # (N,) int64


def load_eval_set(path: Path, max_examples: int | None = None) -> EvalSet:
    """Read the run's evaluation set (safetensors: input_ids, target_mask, optional targets,
    attention_mask, class_ids). Without `targets`, position t predicts input_ids[:, t+1]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainauditError(path, f"cannot read the evaluation set ({exc})") from None
    for need in ("input_ids", "target_mask"):
        if need not in t:
            raise TrainauditError(path, f"evaluation set has no {need!r} tensor")
    ids = t["input_ids"].to(torch.int64)
    mask = t["target_mask"].to(torch.bool)
    if ids.dim() != 2:
        raise TrainauditError(path, f"input_ids must be (N, L), got {tuple(ids.shape)}")
    if "targets" in t:
        targets = t["targets"].to(torch.int64)
    else:  # the next token; the last position has none
        targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        if mask.shape == ids.shape:
            mask = mask.clone()
            mask[:, -1] = False
    if mask.shape != ids.shape or targets.shape != ids.shape:
        raise TrainauditError(path, f"target_mask {tuple(mask.shape)} / targets {tuple(targets.shape)} "
                                    f"do not match input_ids {tuple(ids.shape)}")
    att = t["attention_mask"].to(torch.bool) if "attention_mask" in t else torch.ones_like(ids, dtype=torch.bool)
    if att.shape != ids.shape:
        raise TrainauditError(path, f"attention_mask {tuple(att.shape)} does not match input_ids {tuple(ids.shape)}")
    cls = t["class_ids"].to(torch.int64) if "class_ids" in t else None
    if cls is not None and cls.shape != ids.shape[:1]:
        raise TrainauditError(path, f"class_ids {tuple(cls.shape)} does not match {ids.shape[0]} examples")
    if max_examples is not None:
        ids, targets, mask, att = ids[:max_examples], targets[:max_examples], mask[:max_examples], att[:max_examples]
        cls = None if cls is None else cls[:max_examples]
    return EvalSet(ids, targets, mask, att, cls)


def resolve_model_factory(spec: str) -> Callable[..., nn.Module]:
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


def build_run_model(name: str | None, config: Mapping[str, Any], factory: str | None) -> tuple[nn.Module | None, str]:
    """The model to probe and a reason when there is none. `factory` (explicit) wins."""
    if factory:
        fn = resolve_model_factory(factory)
        try:
            takes_arg = len(inspect.signature(fn).parameters) > 0
        except (TypeError, ValueError):
            takes_arg = True
        model = fn(dict(config)) if takes_arg else fn()
        if not isinstance(model, nn.Module):
            raise TrainauditError(None, f"--model {factory}: returned {type(model).__name__}, not a torch nn.Module")
        return model, ""
    if name is None:
        return None, ("the run names no model, so activation, dead-unit, attention and gradient panels need "
                      "one: pass --model module:function")
    from analyze.demo.model import BUILTIN_MODELS, build_model

    if name not in BUILTIN_MODELS:
        return None, (f"the run names model {name!r}, which is not a built-in model ({', '.join(BUILTIN_MODELS)}); "
                      "pass --model module:function to enable the activation panels")
    try:
        return build_model(name, config), ""
    except (TypeError, ValueError, KeyError) as exc:
        return None, f"the built-in model {name!r} cannot be built from the run's config ({exc})"


@dataclass(frozen=True, slots=True)
class HookPoints:
    """Module names (and layer index) the probe hooks."""

    blocks: tuple[tuple[int, str], ...]
    ffn: tuple[tuple[int, str], ...]
    probs: tuple[tuple[int, str], ...]
    scores: tuple[tuple[int, str], ...]


def _layer(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def find_hook_points(model: nn.Module) -> HookPoints:
    blocks, ffn, probs, scores = [], [], [], []
    for name, _ in model.named_modules():
        layer = _layer(name)
        if layer is None:
            continue
        if _BLOCK_RE.search(name):
            blocks.append((layer, name))
        elif name.endswith("mlp.act"):
            ffn.append((layer, name))
        elif name.endswith("attn.probs"):
            probs.append((layer, name))
        elif name.endswith("attn.scores"):
            scores.append((layer, name))
    return HookPoints(tuple(blocks), tuple(ffn), tuple(probs), tuple(scores))


def _activation_name(module: nn.Module) -> str:
    return {"GELU": "gelu", "ReLU": "relu", "SiLU": "silu", "Tanh": "tanh"}.get(type(module).__name__,
                                                                                 type(module).__name__.lower())


class ModelProbe:
    """Loads a checkpoint's weights into one model instance and computes the model-based rows."""

    def __init__(self, model: nn.Module, eval_set: EvalSet, class_names: list[str], *, eps: float,
                 batch_size: int, grad_batch_size: int, rho_band: tuple[float, float]) -> None:
        self.model = model.eval()
        self.data = eval_set
        self.class_names = class_names
        self.eps = eps
        self.batch_size = batch_size
        self.grad_batch_size = grad_batch_size
        self.rho_band = rho_band
        self.points = find_hook_points(model)
        modules = dict(model.named_modules())
        self.modules = modules
        self.act_names = {name: _activation_name(modules[name]) for _, name in self.points.ffn}
        ctx = getattr(getattr(model, "cfg", None), "context", None)
        if ctx is not None and eval_set.input_ids.shape[1] > ctx:
            raise TrainauditError(None, f"evaluation sequences of length {eval_set.input_ids.shape[1]} exceed the "
                                        f"model's context {ctx}")

    def missing_hooks(self) -> list[str]:
        p = self.points
        return [what for what, pts in (("block outputs (blocks.<i>)", p.blocks), ("FFN activations (mlp.act)", p.ffn),
                                       ("attention probabilities (attn.probs)", p.probs)) if not pts]

    def load(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load weights; returns problems (missing / unexpected tensors) that make the probe unusable."""
        own = self.model.state_dict()
        ptr_to_names: dict[int, list[str]] = {}
        for k, v in own.items():
            ptr_to_names.setdefault(v.data_ptr(), []).append(k)
        present = set(state)
        missing = []
        for k, v in own.items():
            if k in present:
                continue
            if any(o in present for o in ptr_to_names.get(v.data_ptr(), [])):
                continue  # tied: loaded through another name
            missing.append(k)
        if missing:
            return [f"checkpoint lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]!r}"]
        wrong = [k for k in present & set(own) if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            return [f"tensor {k!r} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} "
                    "in the model"]
        with torch.no_grad():
            for k in present & set(own):
                own[k].copy_(state[k].to(own[k].dtype))
        return []

    def run(self, step: int) -> dict[str, list[dict[str, Any]]]:
        """All model-based rows of the currently loaded weights, keyed by table name."""
        d = self.data
        n = d.input_ids.shape[0]
        states: dict[str, Any] = {}
        act_vals: dict[int, list[torch.Tensor]] = {i: [] for i, _ in self.points.blocks}
        ffn: dict[int, DeadNeuronState] = {}
        heads: dict[int, HeadStatsState] = {}
        max_logit: dict[int, torch.Tensor] = {}
        batch: dict[str, torch.Tensor] = {}

        def on_block(layer: int):
            def hook(_m, _i, out):
                a = out[0] if isinstance(out, tuple) else out
                act_vals[layer].append(mean_abs_activation(a, batch["mask"]))
            return hook

        def on_ffn(layer: int):
            def hook(_m, _i, out):
                s = DeadNeuronState.from_batch(out, batch["mask"], self.eps)
                ffn[layer] = s if layer not in ffn else ffn[layer].merge(s)
            return hook

        def on_probs(layer: int):
            def hook(_m, _i, out):
                s = HeadStatsState.from_batch(out, batch["visible"])
                heads[layer] = s if layer not in heads else heads[layer].merge(s)
            return hook

        def on_scores(layer: int):
            def hook(_m, _i, out):
                m = max_attention_logit(out, batch["visible"]).max()
                max_logit[layer] = m if layer not in max_logit else torch.maximum(max_logit[layer], m)
            return hook

        handles = []
        for fn, pts in ((on_block, self.points.blocks), (on_ffn, self.points.ffn),
                        (on_probs, self.points.probs), (on_scores, self.points.scores)):
            for layer, name in pts:
                handles.append(self.modules[name].register_forward_hook(fn(layer)))
        n_classes = len(self.class_names)
        cls_state = ClassLossState.empty(n_classes) if (d.class_ids is not None and n_classes) else None
        loss_sum, tok_count, lz_sum, lz_count = 0.0, 0, 0.0, 0
        try:
            with torch.inference_mode():
                for i in range(0, n, self.batch_size):
                    ids = d.input_ids[i:i + self.batch_size]
                    batch["mask"] = d.attention_mask[i:i + self.batch_size]
                    batch["visible"] = causal_visible(ids.shape[1], key_padding_mask=batch["mask"])
                    logits = self.model(ids)
                    tl = token_losses(logits, d.targets[i:i + self.batch_size])
                    tmask = d.target_mask[i:i + self.batch_size]
                    nt = int(tmask.sum())
                    if nt:
                        loss_sum += float(per_token_loss(tl, tmask)) * nt
                        tok_count += nt
                    nm = int(batch["mask"].sum())
                    if nm:
                        lz_sum += float(log_partition(logits, batch["mask"])) * nm
                        lz_count += nm
                    if cls_state is not None:
                        ex = per_example_loss(tl, tmask)
                        cls_state = cls_state.merge(ClassLossState.from_batch(ex, d.class_ids[i:i + self.batch_size],
                                                                              n_classes))
        finally:
            for h in handles:
                h.remove()
        rows: dict[str, list[dict[str, Any]]] = {}
        rows["eval_set"] = [{"step": step, "loss": loss_sum / tok_count if tok_count else math.nan,
                             "n_tokens": tok_count, "n_examples": n,
                             "mean_log_z": lz_sum / lz_count if lz_count else math.nan}]
        rows["activations"] = []
        for layer, name in self.points.blocks:
            vals = torch.stack(act_vals[layer]).double().cpu().numpy() if act_vals[layer] else np.zeros(0)
            rs = RunningStats.from_batch(vals[np.isfinite(vals)])  # Welford over the batches (§3)
            rows["activations"].append({"step": step, "layer": name, "mean_abs": float(rs.mean),
                                        "std": float(rs.std), "n_batches": int(rs.n)})
        rows["dead_neurons"] = []
        for layer, name in self.points.ffn:
            if layer not in ffn:
                continue
            r = ffn[layer].result(self.act_names[name])
            rows["dead_neurons"].append({
                "step": step, "layer": name, "d_ff": r.d_ff, "dead_count": r.dead_count,
                "dead_fraction": r.dead_fraction, "near_dead_count": r.near_dead_count, "n_tokens": r.n_tokens,
                "eps": r.eps, "activation": r.activation, "activation_sparsity": r.activation_sparsity})
        rows["attention"] = []
        for layer, name in self.points.probs:
            if layer not in heads:
                continue
            hs = heads[layer].result(layer=layer)
            for h in range(hs.n_heads):
                rows["attention"].append({
                    "step": step, "layer": layer, "head": h, "mean_entropy": float(hs.mean_entropy[h]),
                    "mean_norm_entropy": float(hs.mean_norm_entropy[h]), "dead": bool(hs.dead[h]),
                    "dead_ge4": bool(hs.dead_ge4[h]), "share_2_3_keys": float(hs.share_2_3_keys[h]),
                    "sink_mass": float(hs.sink_mass[h]), "offset_mode": int(hs.offset_mode[h]),
                    "offset_share": float(hs.offset_share[h]), "label": hs.label[h]})
        rows["attention_logits"] = [{"step": step, "layer": layer, "max_logit": float(max_logit[layer])}
                                    for layer, _ in self.points.scores if layer in max_logit]
        rows["class_losses"], rows["tau_state"] = [], []
        if cls_state is not None:
            mean, var = cls_state.mean().numpy(), cls_state.var().numpy()
            for c, name in enumerate(self.class_names):
                rows["class_losses"].append({"source": "checkpoint", "step": step, "step_start": step, "cls": name,
                                             "count": int(cls_state.count[c]), "mean": float(mean[c]),
                                             "std": float(np.sqrt(var[c]))})
            rows["tau_state"] = [{"step": step, "cls": name, "count": int(cls_state.count[c]),
                                  "loss_sum": float(cls_state.loss_sum[c]), "loss_m2": float(cls_state.loss_m2[c])}
                                 for c, name in enumerate(self.class_names)]
        rows["grad_ratio"] = self._grad_ratio(step)
        return rows

    def _grad_ratio(self, step: int) -> list[dict[str, Any]]:
        """Offline rho per weight matrix from one backward pass on an evaluation batch (§11)."""
        d = self.data
        k = self.grad_batch_size
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.model(d.input_ids[:k])
            loss = per_token_loss(token_losses(logits, d.targets[:k]), d.target_mask[:k])
            if not torch.isfinite(loss):
                return []
            loss.backward()
        out = []
        for name, p in self.model.named_parameters():
            if p.grad is None or p.dim() < 2:
                continue
            rho = grad_to_weight_ratio(p.grad, p.detach())
            out.append({"step": step, "tensor": name, "rho": rho,
                        "grad_norm": float(torch.linalg.vector_norm(p.grad.double())),
                        "weight_norm": float(torch.linalg.vector_norm(p.detach().double())),
                        "status": classify_rho(rho, *self.rho_band)})
        self.model.zero_grad(set_to_none=True)
        return out
