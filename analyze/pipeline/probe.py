"""Model-based metrics of one checkpoint: run the evaluation set through the rebuilt model
(`analyze.models`) with hooks found by structure (§3, §5, §6, §7-§8, §12) and, for language
models, one backward pass for the evaluation-batch rho (§11).

Probe points (`analyze.models.structure`), the same for MiniGPT, nanoGPT and transformers models:

    block outputs               each layer-stack block's output (B, L, d)  -> activation magnitude (§3)
    FFN post-activation         input of each block's down-projection      -> dead units (§5)
    attention logits / probs    input / output of each (B, H, L, L) softmax -> max logit (§12), heads (§6)
    LM logits                   the model's output (language models only)   -> loss, log Z, classes (§7, §8, §12)

Padding (attention_mask False) is left out of every mean and attention statistic. Encoder models
(no next-token head) get everything but the LM panels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from analyze.kernels import class_welford
from analyze.metrics.activations import mean_abs_activation
from analyze.metrics.attention import HeadStatsState, causal_visible, log_partition, max_attention_logit
from analyze.metrics.gradients import classify_rho, grad_to_weight_ratio
from analyze.metrics.losses import ClassLossState, per_example_loss, per_token_loss, token_losses
from analyze.metrics.neurons import DeadNeuronState
from analyze.models import RebuiltModel, load_weights, resolve_model_factory
from analyze.models.structure import SoftmaxTap, activation_kind, find_blocks
from analyze.pipeline.grad_ratio import EVAL_BATCH
from loaders.errors import TrainauditError
from loaders.evaldata import EvalSet, load_eval_set

__all__ = ["EvalSet", "ModelProbe", "load_eval_set", "resolve_model_factory", "eval_batch_indices"]


def eval_batch_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """k of n evaluation rows drawn uniformly at random (seeded), in order: the backward-pass batch
    for the evaluation-batch rho, representative of the whole set rather than its first rows (§11)."""
    if n <= k:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def _first_embedding_rows(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None


class ModelProbe:
    """Loads a checkpoint's weights into one rebuilt model and computes the model-based rows."""

    def __init__(self, rebuilt: RebuiltModel, eval_set: EvalSet, class_names: list[str], *, eps: float,
                 batch_size: int, grad_batch_size: int, rho_band: tuple[float, float], seed: int = 0) -> None:
        self.rebuilt = rebuilt
        self.model = rebuilt.module.eval()
        self.data = eval_set
        self.class_names = class_names
        self.eps = eps
        self.batch_size = batch_size
        self.grad_batch_size = grad_batch_size
        self.rho_band = rho_band
        self.seed = seed
        self.blocks = find_blocks(self.model)
        length = eval_set.input_ids.shape[1]
        if rebuilt.context is not None and length > rebuilt.context:
            raise TrainauditError(None, f"evaluation sequences of length {length} exceed the model's context "
                                        f"{rebuilt.context}")
        rows = _first_embedding_rows(self.model)
        top = int(eval_set.input_ids.max()) if eval_set.input_ids.numel() else 0
        if rows is not None and top >= rows:
            raise TrainauditError(None, f"the evaluation data holds token id {top}, but the model's vocabulary has "
                                        f"{rows} tokens: the data was tokenised for another model")
        self.ffn_label, self.ffn_act = self._trace_ffn()
        self.notes = [f"model panels: {rebuilt.description}, {len(self.blocks.items)} block(s) found by structure, "
                      f"{eval_set.input_ids.shape[0]} evaluation sequence(s) of up to {length} tokens"]
        self.notes += list(eval_set.notes)
        if not rebuilt.is_lm:
            self.notes.append(f"{rebuilt.description} has no next-token head: loss, log Z, per-class loss, tau "
                              "and the evaluation-batch rho are not computed (language-model panels)")

    def _trace_ffn(self) -> tuple[dict[int, str], dict[int, str]]:
        """Label each FFN probe by the module whose output is the down-projection's input (the
        activation) when there is one, else the down-projection; and name the nonlinearity."""
        label: dict[int, str] = {}
        act: dict[int, str] = {}
        seen: dict[int, tuple[str, nn.Module, torch.Tensor]] = {}  # the tensor kept alive: ids stay unique
        handles = []
        for layer, bname, block, dname, down in self.blocks.items:
            if down is None:
                continue
            label[layer] = f"{dname} (input)"
            act[layer] = activation_kind(None, self.rebuilt.activation_hint)
            for sub_name, sub in block.named_modules():
                if sub is down or sub is block or any(True for _ in sub.children()):
                    continue
                handles.append(sub.register_forward_hook(
                    lambda m, i, o, n=f"{bname}.{sub_name}": seen.__setitem__(id(o), (n, m, o))))

            def pre(_m: nn.Module, args: tuple, layer: int = layer) -> None:
                hit = seen.get(id(args[0])) if args else None
                if hit is not None:
                    label[layer], act[layer] = hit[0], activation_kind(hit[1], self.rebuilt.activation_hint)
            handles.append(down.register_forward_pre_hook(pre))
        try:
            with torch.inference_mode():
                self.rebuilt.forward(self.data.input_ids[:1], self.data.attention_mask[:1])
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise TrainauditError(None, f"the rebuilt model cannot run the evaluation data "
                                        f"({' '.join(str(exc).split())[:200]})") from None
        finally:
            for h in handles:
                h.remove()
        return label, act

    def missing_points(self) -> list[str]:
        """Probe points the model lacks (no layer stack, no FFN)."""
        if not self.blocks.items:
            return ["transformer blocks (no nn.ModuleList of identical blocks with an FFN)"]
        return []

    def load(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load weights; returns problems (missing tensors, other shapes) that make the probe unusable."""
        return load_weights(self.model, state)

    def _visible(self, mask: torch.Tensor) -> torch.Tensor:
        if self.rebuilt.causal:
            return causal_visible(mask.shape[1], key_padding_mask=mask)
        return mask[:, None, :] & mask[:, :, None]

    def run(self, step: int) -> dict[str, list[dict[str, Any]]]:
        """All model-based rows of the currently loaded weights, keyed by table name."""
        d = self.data
        n = d.input_ids.shape[0]
        is_lm = self.rebuilt.is_lm
        act_vals: dict[int, list[torch.Tensor]] = {i: [] for i, *_ in self.blocks.items}
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
            def hook(_m, args):
                s = DeadNeuronState.from_batch(args[0], batch["mask"], self.eps)
                ffn[layer] = s if layer not in ffn else ffn[layer].merge(s)
            return hook

        def on_attention(i: int, logits: torch.Tensor, probs: torch.Tensor) -> None:
            s = HeadStatsState.from_batch(probs, batch["visible"])
            heads[i] = s if i not in heads else heads[i].merge(s)
            m = max_attention_logit(logits, batch["visible"]).max()
            max_logit[i] = m if i not in max_logit else torch.maximum(max_logit[i], m)

        handles = []
        for layer, _bname, block, _dname, down in self.blocks.items:
            handles.append(block.register_forward_hook(on_block(layer)))
            if down is not None:
                handles.append(down.register_forward_pre_hook(on_ffn(layer)))
        n_classes = len(self.class_names)
        cls_state = ClassLossState.empty(n_classes) if (is_lm and d.class_ids is not None and n_classes) else None
        loss_sum, tok_count, lz_sum, lz_count = 0.0, 0, 0.0, 0
        try:
            with torch.inference_mode():
                for i in range(0, n, self.batch_size):
                    ids = d.input_ids[i:i + self.batch_size]
                    batch["mask"] = d.attention_mask[i:i + self.batch_size]
                    batch["visible"] = self._visible(batch["mask"])
                    with SoftmaxTap(ids.shape[1], on_attention):
                        out = self.rebuilt.forward(ids, batch["mask"])
                    if not is_lm:
                        continue
                    tl = token_losses(out, d.targets[i:i + self.batch_size])
                    tmask = d.target_mask[i:i + self.batch_size]
                    nt = int(tmask.sum())
                    if nt:
                        loss_sum += float(per_token_loss(tl, tmask)) * nt
                        tok_count += nt
                    nm = int(batch["mask"].sum())
                    if nm:
                        lz_sum += float(log_partition(out, batch["mask"])) * nm
                        lz_count += nm
                    if cls_state is not None:
                        ex = per_example_loss(tl, tmask)
                        cid = d.class_ids[i:i + self.batch_size]
                        keep = cid >= 0
                        cls_state = cls_state.merge(ClassLossState.from_batch(ex[keep], cid[keep], n_classes))
        finally:
            for h in handles:
                h.remove()
        rows: dict[str, list[dict[str, Any]]] = {}
        rows["eval_set"] = [{"step": step, "loss": loss_sum / tok_count if tok_count else math.nan,
                             "n_tokens": tok_count, "n_examples": n,
                             "mean_log_z": lz_sum / lz_count if lz_count else math.nan}] if is_lm else []
        rows["activations"] = []
        for layer, bname, *_ in self.blocks.items:
            if not act_vals[layer]:
                continue
            vals = torch.stack(act_vals[layer]).double()
            # Welford over the batches (§1, §3): the one kernel; non-finite batch means are skipped
            cnt, tot, m2, _skipped = class_welford(vals, torch.zeros(len(vals), dtype=torch.long), 1)
            c = int(cnt[0, 0])
            rows["activations"].append({"step": step, "layer": bname,
                                        "mean_abs": float(tot[0, 0]) / c if c else math.nan,
                                        "std": math.sqrt(float(m2[0, 0]) / (c - 1)) if c >= 2 else math.nan,
                                        "n_batches": c})
        rows["dead_neurons"] = []
        for layer, *_ in self.blocks.items:
            if layer not in ffn:
                continue
            r = ffn[layer].result(self.ffn_act[layer])
            rows["dead_neurons"].append({
                "step": step, "layer": self.ffn_label[layer], "d_ff": r.d_ff, "dead_count": r.dead_count,
                "dead_fraction": r.dead_fraction, "near_dead_count": r.near_dead_count, "n_tokens": r.n_tokens,
                "eps": r.eps, "activation": r.activation, "activation_sparsity": r.activation_sparsity})
            # §5 f_j per unit (share of tokens with |H| >= eps), one row per unit
            rows.setdefault("activation_frequency", []).extend(
                {"step": step, "layer": self.ffn_label[layer], "unit": j, "f_j": f}
                for j, f in enumerate(r.frequency.tolist()))
        rows["attention"] = []
        for layer in sorted(heads):
            hs = heads[layer].result(layer=layer)
            for h in range(hs.n_heads):
                rows["attention"].append({
                    "step": step, "layer": layer, "head": h, "mean_entropy": float(hs.mean_entropy[h]),
                    "mean_norm_entropy": float(hs.mean_norm_entropy[h]), "dead": bool(hs.dead[h]),
                    "dead_ge4": bool(hs.dead_ge4[h]), "share_2_3_keys": float(hs.share_2_3_keys[h]),
                    "sink_mass": float(hs.sink_mass[h]), "offset_mode": int(hs.offset_mode[h]),
                    "offset_share": float(hs.offset_share[h]), "label": hs.label[h]})
        rows["attention_logits"] = [{"step": step, "layer": layer, "max_logit": float(max_logit[layer])}
                                    for layer in sorted(max_logit)]
        rows["class_losses"], rows["tau_state"] = [], []
        if cls_state is not None:
            mean, var = cls_state.mean().numpy(), cls_state.var().numpy()
            for c, name in enumerate(self.class_names):
                rows["class_losses"].append({"source": "checkpoint", "step": step, "step_start": step, "cls": name,
                                             "count": int(cls_state.count[c]), "mean": float(mean[c]),
                                             "std": float(math.sqrt(var[c])) if var[c] >= 0 else math.nan})
            rows["tau_state"] = [{"step": step, "cls": name, "count": int(cls_state.count[c]),
                                  "loss_sum": float(cls_state.loss_sum[c]), "loss_m2": float(cls_state.loss_m2[c])}
                                 for c, name in enumerate(self.class_names)]
        rows["grad_ratio"] = self._grad_ratio(step) if is_lm else []
        return rows

    def _grad_ratio(self, step: int) -> list[dict[str, Any]]:
        """Evaluation-batch rho per weight matrix: one backward pass on grad_batch_size rows drawn at
        random from the whole evaluation set (§11); the labelled fallback for runs that logged no
        training gradient norms."""
        d = self.data
        idx = eval_batch_indices(d.input_ids.shape[0], self.grad_batch_size, self.seed)
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.rebuilt.forward(d.input_ids[idx], d.attention_mask[idx])
            loss = per_token_loss(token_losses(logits, d.targets[idx]), d.target_mask[idx])
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
                        "status": classify_rho(rho, *self.rho_band), "source": EVAL_BATCH})
        self.model.zero_grad(set_to_none=True)
        return out
