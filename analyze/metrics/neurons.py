"""Dead FFN neurons by the max-abs rule, with token count and activation frequency (§5).

A unit j is dead when ``max_n |H[n, j]| < eps`` over all N real (non-padding) token positions.
Evaluation runs over many batches, so the sufficient statistics (per-unit max |H|, count of
|H| >= eps, N) live in a mergeable :class:`DeadNeuronState`; :meth:`DeadNeuronState.result`
turns them into :class:`DeadNeurons`. The element-level share of |H| < eps is reported as
``activation_sparsity`` and is never called "dead".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DeadNeuronState", "DeadNeurons", "dead_neurons", "dead_threshold_note", "NEAR_DEAD_FREQUENCY"]

NEAR_DEAD_FREQUENCY = 1e-3  # a unit with activation frequency f_j below this is near-dead (§5)


@dataclass(frozen=True, slots=True)
class DeadNeurons:
    """Dead-unit count of one FFN layer and what it was measured on (§5).

    ``near_dead_count`` counts units with f_j < 1e-3 and includes the dead ones (f_j = 0).
    ``activation_sparsity`` is the element-level share of |H| < eps: a different metric.
    Counts are NaN-free; fractions are NaN when no token was seen.
    """

    dead_count: int
    d_ff: int
    dead_fraction: float
    n_tokens: int
    eps: float
    near_dead_count: int
    frequency: np.ndarray  # (d_ff,) share of tokens with |H| >= eps
    max_abs: np.ndarray  # (d_ff,) max over tokens of |H|
    activation: str
    note: str
    activation_sparsity: float
    nonfinite_units: int  # units whose max |H| is NaN (non-finite activations); never counted dead


@dataclass(frozen=True, slots=True)
class DeadNeuronState:
    """Mergeable statistics for §5: per-unit max |H|, count of |H| >= eps, and N.

    Tensors stay on the input's device and no value is read back to the host, so the state can
    be updated inside a training loop without a synchronisation.
    """

    max_abs: Tensor  # (d_ff,) float64
    active_count: Tensor  # (d_ff,) int64, tokens with |H| >= eps
    n_tokens: Tensor  # 0-d int64
    eps: float

    @staticmethod
    def empty(d_ff: int, eps: float = 1e-3, device: torch.device | str | None = None) -> DeadNeuronState:
        """The identity of :meth:`merge` (no token seen)."""
        return DeadNeuronState(
            max_abs=torch.zeros(d_ff, dtype=torch.float64, device=device),
            active_count=torch.zeros(d_ff, dtype=torch.int64, device=device),
            n_tokens=torch.zeros((), dtype=torch.int64, device=device),
            eps=float(eps),
        )

    @staticmethod
    def from_batch(h: Tensor, mask: Tensor | None = None, eps: float = 1e-3) -> DeadNeuronState:
        """Reduce one batch of post-activation FFN hidden states.

        Args:
            h: (B, L, d_ff) or (N, d_ff) activations after the nonlinearity.
            mask: (B, L) or (N,) bool, True = real token; padding (False) is excluded.
            eps: the dead threshold on |H|.
        """
        if h.dim() not in (2, 3):
            raise ValueError(f"h must be (B, L, d_ff) or (N, d_ff), got shape {tuple(h.shape)}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        a = h.detach().reshape(-1, h.shape[-1]).abs()  # (N, d_ff)
        if mask is None:
            n_tokens = torch.tensor(a.shape[0], dtype=torch.int64, device=a.device)
        else:
            if tuple(mask.shape) != tuple(h.shape[:-1]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match h {tuple(h.shape[:-1])}")
            m = mask.reshape(-1, 1).to(device=a.device, dtype=torch.bool)  # (N, 1)
            a = torch.where(m, a, torch.zeros((), dtype=a.dtype, device=a.device))  # |H| >= 0: 0 never raises a max
            n_tokens = m.sum(dtype=torch.int64)
        if a.shape[0] == 0:
            return DeadNeuronState.empty(h.shape[-1], eps, a.device)
        max_abs = a.amax(dim=0).to(torch.float64)  # NaN propagates: a non-finite unit is never "dead"
        active = a >= eps  # padding was zeroed above and eps > 0, so it never counts
        return DeadNeuronState(max_abs, active.sum(dim=0, dtype=torch.int64), n_tokens, float(eps))

    def merge(self, other: DeadNeuronState) -> DeadNeuronState:
        """Combine two states over disjoint token sets (associative; ``empty`` is the identity)."""
        if self.eps != other.eps:
            raise ValueError(f"cannot merge states with different eps ({self.eps} vs {other.eps})")
        if self.max_abs.shape != other.max_abs.shape:
            raise ValueError(f"cannot merge d_ff {self.max_abs.numel()} with {other.max_abs.numel()}")
        return DeadNeuronState(
            torch.maximum(self.max_abs, other.max_abs),  # propagates NaN like amax
            self.active_count + other.active_count,
            self.n_tokens + other.n_tokens,
            self.eps,
        )

    def result(self, activation: str = "gelu") -> DeadNeurons:
        """Final §5 numbers; ``activation`` names the nonlinearity for the note (gelu, relu, silu, ...)."""
        max_abs = self.max_abs.detach().cpu().numpy().astype(np.float64)
        active = self.active_count.detach().cpu().numpy()
        n = int(self.n_tokens)
        d_ff = int(max_abs.shape[0])
        note = dead_threshold_note(activation, self.eps)
        if n == 0:
            nan_f = np.full(d_ff, np.nan)
            return DeadNeurons(0, d_ff, math.nan, 0, self.eps, 0, nan_f, max_abs, activation,
                               "no token seen: dead units undefined. " + note, math.nan, 0)
        freq = active / n
        dead = max_abs < self.eps  # NaN compares False
        return DeadNeurons(
            dead_count=int(dead.sum()),
            d_ff=d_ff,
            dead_fraction=float(dead.sum()) / d_ff if d_ff else math.nan,
            n_tokens=n,
            eps=self.eps,
            near_dead_count=int((freq < NEAR_DEAD_FREQUENCY).sum()),
            frequency=freq,
            max_abs=max_abs,
            activation=activation,
            note=note,
            activation_sparsity=1.0 - float(active.sum()) / (n * d_ff) if d_ff else math.nan,
            nonfinite_units=int(np.isnan(max_abs).sum()),
        )


def dead_neurons(h: Tensor, mask: Tensor | None = None, eps: float = 1e-3,
                 activation: str = "gelu") -> DeadNeurons:
    """One-shot §5 on a single tensor of activations (see :meth:`DeadNeuronState.from_batch`)."""
    return DeadNeuronState.from_batch(h, mask, eps).result(activation)


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def _far_negative_root(f, x_min: float, eps: float) -> float | None:
    """The x < x_min where f(x) = -eps, for f with f(-inf) = 0 and one negative dip at x_min; None if
    the dip never reaches -eps."""
    if f(x_min) > -eps:
        return None
    lo, hi = -700.0, x_min  # f(lo) > -eps >= f(hi); exp(700) still fits a float
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > -eps else (lo, mid)
    return 0.5 * (lo + hi)


_DIPS = {"gelu": (_gelu, -0.7518, "GELU"), "silu": (_silu, -1.2785, "SiLU")}
_ALIASES = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "swish": "silu"}


def dead_threshold_note(activation: str, eps: float = 1e-3) -> str:
    """What "dead" means for this nonlinearity in terms of its pre-activation x (§5)."""
    act = activation.lower()
    act = _ALIASES.get(act, act)
    if act in _DIPS:
        f, x_min, name = _DIPS[act]
        x0 = _far_negative_root(f, x_min, eps)
        if x0 is None:
            return f"{name}: |{name}(x)| < {eps:g} for every x < 0 (its dip never reaches {eps:g})"
        return (f"{name}: |{name}(x)| < {eps:g} holds only for x < {x0:.2f} (or |x| < ~{2 * eps:g}), so a dead "
                f"{name} unit is one whose pre-activation stays below {x0:.2f} on every token")
    if act == "relu":
        return (f"ReLU: ReLU(x) < {eps:g} holds for x < {eps:g}, so a dead ReLU unit is one whose "
                f"pre-activation stays below {eps:g} on every token (the classic dead ReLU)")
    return f"{activation}: dead means |H| < {eps:g} on every token; no pre-activation threshold is known for it"
