"""Per-token, per-example and per-class loss, and the class-pair tax tau with its Welch SE
(§7-§8).

Losses are in nats. Per-class statistics live in a mergeable :class:`ClassLossState` (count, sum
and sum of squared deviations per class: the columns ``count, loss_sum, loss_m2`` of the run's
class-loss table), reduced from a batch with ``index_add_`` and merged with Chan et al.'s rule by
the kernels the logger uses too (`analyze.kernels`): no loop over examples, no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from analyze.kernels import class_welford, merge_welford

__all__ = [
    "ClassLossState", "Tau", "token_losses", "per_token_loss", "per_example_loss", "tau", "gaps_to_mean",
]


def token_losses(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-position cross-entropy -log p(y_t | y_<t), (B, L) float32 or float64 (§7).

    Args:
        logits: (B, L, V); position t predicts ``targets[:, t]`` (already shifted by the caller).
        targets: (B, L) int64 token ids; ``ignore_index`` positions get loss 0 (mask them out).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (B, L, V), (B, L)")
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    b, l, v = x.shape
    loss = F.cross_entropy(x.reshape(b * l, v), targets.reshape(b * l), reduction="none", ignore_index=ignore_index)
    return loss.view(b, l)


def per_token_loss(token_loss: Tensor, target_mask: Tensor) -> Tensor:
    """Token-weighted mean loss over target tokens only, 0-d float64; NaN without targets (§7)."""
    m = target_mask.to(torch.bool)
    x = torch.where(m, token_loss.to(torch.float64), torch.zeros((), dtype=torch.float64, device=token_loss.device))
    return x.sum() / m.sum()


def per_example_loss(token_loss: Tensor, target_mask: Tensor) -> Tensor:
    """Each example's mean loss over its own target tokens, (B,) float64 (§8).

    An example without target tokens gets NaN; :class:`ClassLossState` leaves it out.
    """
    m = target_mask.to(torch.bool)
    x = torch.where(m, token_loss.to(torch.float64), torch.zeros((), dtype=torch.float64, device=token_loss.device))
    return x.sum(dim=-1) / m.sum(dim=-1)  # 0 / 0 = NaN


@dataclass(frozen=True, slots=True)
class ClassLossState:
    """Welford-style per-class statistics of per-example losses (§8), all (n_classes,) tensors.

    ``n_skipped`` counts examples whose loss was not finite (no target tokens, or inf/NaN): they
    enter neither count nor sums, and are kept so a report can say how many were left out.
    """

    count: Tensor  # int64
    loss_sum: Tensor  # float64
    loss_m2: Tensor  # float64, sum of squared deviations from the class mean
    n_skipped: Tensor  # int64

    @staticmethod
    def empty(n_classes: int, device: torch.device | str | None = None) -> ClassLossState:
        """The identity of :meth:`merge`."""
        zi = torch.zeros(n_classes, dtype=torch.int64, device=device)
        zf = torch.zeros(n_classes, dtype=torch.float64, device=device)
        return ClassLossState(zi, zf, zf, zi)

    @staticmethod
    def from_batch(example_loss: Tensor, class_ids: Tensor, n_classes: int) -> ClassLossState:
        """Reduce one batch: example_loss (B,), class_ids (B,) int in [0, n_classes)."""
        if example_loss.dim() != 1 or class_ids.shape != example_loss.shape:
            raise ValueError(f"example_loss {tuple(example_loss.shape)} and class_ids {tuple(class_ids.shape)} "
                             "must both be (B,)")
        count, total, m2, skipped = class_welford(example_loss, class_ids, n_classes)
        return ClassLossState(count[0], total[0], m2[0], skipped[0])

    def merge(self, other: ClassLossState) -> ClassLossState:
        """Chan et al.'s parallel combination (associative; ``empty`` is the identity)."""
        if self.count.shape != other.count.shape:
            raise ValueError(f"cannot merge {self.count.numel()} classes with {other.count.numel()}")
        count, total, m2 = merge_welford((self.count, self.loss_sum, self.loss_m2),
                                         (other.count, other.loss_sum, other.loss_m2))
        return ClassLossState(count, total, m2, self.n_skipped + other.n_skipped)

    @property
    def n_classes(self) -> int:
        return self.count.numel()

    def mean(self) -> Tensor:
        """L_c per class, (C,) float64; NaN for an empty class (§8: skipped)."""
        return self.loss_sum / self.count.to(torch.float64)  # 0 / 0 = NaN

    def var(self) -> Tensor:
        """Sample variance s_c^2 (ddof = 1) per class; NaN where count < 2."""
        n = self.count.to(torch.float64)
        return torch.where(n >= 2, self.loss_m2 / (n - 1), torch.full_like(n, math.nan))


@dataclass(frozen=True, slots=True)
class Tau:
    """tau = mean_a - mean_b between class a (the hard one, e.g. irregular I) and class b (the easy
    one, e.g. regular R), with its Welch standard error (§8). NaN when a class is empty; ``se`` is
    NaN when either class has fewer than 2 examples."""

    tau: float
    se: float
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    a: int  # class index of the hard class
    b: int  # class index of the easy class


def tau(state: ClassLossState, hard: int, easy: int) -> Tau:
    """tau = L_hard - L_easy (§8: tau = L_I - L_R), SE = sqrt(s_h^2/n_h + s_e^2/n_e)."""
    for c in (hard, easy):
        if not 0 <= c < state.n_classes:
            raise ValueError(f"class {c} out of range [0, {state.n_classes})")
    mean, var = state.mean(), state.var()
    n = state.count.to(torch.float64)
    idx = torch.tensor([hard, easy], device=mean.device)
    m_h, m_e = mean[idx].tolist()
    se = torch.sqrt((var[idx] / n[idx]).sum()).item()
    n_h, n_e = state.count[idx].tolist()
    return Tau(tau=m_h - m_e, se=se, n_a=int(n_h), n_b=int(n_e), mean_a=m_h, mean_b=m_e, a=hard, b=easy)


def gaps_to_mean(state: ClassLossState) -> np.ndarray:
    """Each class's mean loss minus the all-class example-weighted mean, (C,) float64; NaN for empty classes."""
    grand = state.loss_sum.sum() / state.count.sum().to(torch.float64)
    return (state.mean() - grand).detach().cpu().numpy()
