"""Attention entropy, dead heads and head labels (§6); max attention logit and log Z (§12).

Shapes: alpha and scores are (B, H, Lq, Lk); a *visible* mask is bool (B or 1, Lq, Lk), True where
query q may see key k (for causal attention, k <= q). alpha must be post-softmax, so it is zero on
keys a query cannot see. Queries are the last Lq positions of the Lk keys (Lq == Lk for plain
self-attention), so a query's position is ``q + Lk - Lq``.

Head labels (§6 leaves the cut-offs open; these are ours):

- a head is *low-entropy* when it is dead (Pr(H_q < log 2) > 0.99) or more than half of its
  queries have H_q < log 2 (``share_low_entropy > 0.5``);
- a low-entropy head is "collapsed: sink" when its sink mass (mean alpha on key 0) is > 0.5,
  else "collapsed: offset d" when more than half of its queries put their largest weight at the
  same offset d = q - argmax_k alpha_qk, else "collapsed: content";
- every other head is "diffuse"; a head with no query seeing >= 2 keys is "no eligible queries".

H_q < log 2 is tested as ``H_q < log 2 - 1e-6`` so a query spread evenly over exactly two keys
(H_q = log 2 up to rounding) never counts as low.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HeadStats", "HeadStatsState", "causal_visible", "query_entropy", "max_attention_logit", "log_partition",
    "head_labels", "DEAD_SHARE", "LOW_SHARE", "SINK_SHARE", "OFFSET_SHARE", "LOW_ENTROPY_TOL",
]

LOG2 = math.log(2.0)
LOW_ENTROPY_TOL = 1e-6  # nats; H_q < log 2 - tol counts as low (rounding guard at the 2-key boundary)
DEAD_SHARE = 0.99  # §6: dead iff Pr(H_q < log 2) > 0.99
LOW_SHARE = 0.5  # label: a head is low-entropy when dead or share_low_entropy > 0.5
SINK_SHARE = 0.5  # label: "collapsed: sink" when sink_mass > 0.5
OFFSET_SHARE = 0.5  # label: "collapsed: offset d" when offset_share > 0.5


def causal_visible(l_q: int, l_k: int | None = None, key_padding_mask: Tensor | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """Visible-key mask for causal attention, (B or 1, Lq, Lk) bool.

    Key k is visible to query q when k <= q + Lk - Lq and k is a real token; a padding query
    (its own position masked) sees nothing, so it drops out of every statistic.

    Args:
        l_q: number of queries. l_k: number of keys (default l_q).
        key_padding_mask: (B, Lk) bool, True = real token.
    """
    l_k = l_q if l_k is None else l_k
    if key_padding_mask is not None:
        device = key_padding_mask.device
    q_pos = torch.arange(l_q, device=device) + (l_k - l_q)
    vis = torch.arange(l_k, device=device)[None, :] <= q_pos[:, None]  # (Lq, Lk)
    vis = vis.unsqueeze(0)  # (1, Lq, Lk)
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.bool)  # (B, Lk)
        vis = vis & kpm[:, None, :] & kpm[:, l_k - l_q:, None]  # (B, Lq, Lk)
    return vis


def _as_visible(visible: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Normalise a visible mask to (B or 1, Lq, Lk) bool; None means every key is visible."""
    b, _, l_q, l_k = shape
    if visible is None:
        return torch.ones(1, l_q, l_k, dtype=torch.bool, device=device)
    v = visible.to(device=device, dtype=torch.bool)
    if v.dim() == 2:
        v = v.unsqueeze(0)
    if v.dim() != 3 or tuple(v.shape[1:]) != (l_q, l_k) or v.shape[0] not in (1, b):
        raise ValueError(f"visible mask {tuple(visible.shape)} does not fit attention {tuple(shape)}")
    return v


def query_entropy(alpha: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-query attention entropy H_q = -sum_k alpha_qk log alpha_qk in nats, 0 log 0 = 0 (§6).

    Args:
        alpha: (B, H, Lq, Lk) post-softmax attention weights.
        key_mask: visible mask (B or 1, Lq, Lk) or (Lq, Lk), True = key visible; None = all.

    Returns:
        entropy (B, H, Lq) float64 and n_visible (B or 1, Lq) int64 (visible keys per query).
    """
    if alpha.dim() != 4:
        raise ValueError(f"alpha must be (B, H, Lq, Lk), got shape {tuple(alpha.shape)}")
    vis = _as_visible(key_mask, alpha.shape, alpha.device)
    a = alpha.detach()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    # Terms in alpha's precision, sum in float64: a (B, H, L, L) float64 copy would double memory.
    ent = -torch.special.xlogy(a, a).sum(dim=-1, dtype=torch.float64)  # (B, H, Lq)
    return ent, vis.sum(dim=-1, dtype=torch.int64)  # (B', Lq)


@dataclass(frozen=True, slots=True)
class HeadStats:
    """§6 per-head statistics of one layer; every array has one entry per head.

    Shares are over eligible queries (>= 2 visible keys); ``*_ge4`` over queries with >= 4.
    Means are NaN for a head without eligible queries; its ``dead`` flags are False.
    """

    layer: int
    n_queries: np.ndarray  # eligible queries (>= 2 visible keys)
    n_queries_ge4: np.ndarray
    mean_entropy: np.ndarray  # nats
    mean_norm_entropy: np.ndarray  # H_q / log(n_visible), in [0, 1]
    share_low_entropy: np.ndarray  # Pr(H_q < log 2)
    dead: np.ndarray  # bool: share_low_entropy > 0.99 (the sheet's rule)
    share_low_entropy_ge4: np.ndarray
    dead_ge4: np.ndarray  # bool: the same rule over queries with >= 4 visible keys
    share_2_3_keys: np.ndarray  # share of eligible queries with only 2-3 visible keys
    sink_mass: np.ndarray  # mean alpha on key 0
    offset_mode: np.ndarray  # int: most common q - argmax_k alpha_qk
    offset_share: np.ndarray  # share of eligible queries at offset_mode
    label: tuple[str, ...]

    @property
    def n_heads(self) -> int:
        return len(self.label)


@dataclass(frozen=True, slots=True)
class HeadStatsState:
    """Mergeable §6 sums per head (all (H,) tensors; ``offset_hist`` is (H, 2K-1), offset d at d + K-1).

    No value is read back to the host, so it can be updated on an accelerator without a sync.
    """

    n_eligible: Tensor  # int64: queries with >= 2 visible keys
    n_low: Tensor  # int64: eligible with H < log 2
    n_eligible_ge4: Tensor  # int64
    n_low_ge4: Tensor  # int64
    n_2_3: Tensor  # int64: queries with 2 or 3 visible keys
    entropy_sum: Tensor  # float64
    norm_entropy_sum: Tensor  # float64
    sink_sum: Tensor  # float64, alpha on key 0
    offset_hist: Tensor  # int64 (H, 2K-1)

    @staticmethod
    def empty(n_heads: int, device: torch.device | str | None = None) -> HeadStatsState:
        """The identity of :meth:`merge`."""
        zi = torch.zeros(n_heads, dtype=torch.int64, device=device)
        zf = torch.zeros(n_heads, dtype=torch.float64, device=device)
        return HeadStatsState(zi, zi, zi, zi, zi, zf, zf, zf, torch.zeros(n_heads, 1, dtype=torch.int64, device=device))

    @staticmethod
    def from_batch(alpha: Tensor, visible: Tensor | None = None) -> HeadStatsState:
        """Reduce one batch of attention maps alpha (B, H, Lq, Lk) with its visible mask (B or 1, Lq, Lk)."""
        b, h, l_q, l_k = alpha.shape
        vis = _as_visible(visible, alpha.shape, alpha.device)
        ent, n_vis = query_entropy(alpha, vis)  # (B, H, Lq), (B', Lq)
        nv = n_vis.unsqueeze(1)  # (B', 1, Lq)
        elig = (nv >= 2).expand(b, h, l_q)  # (B, H, Lq)
        ge4 = (nv >= 4).expand(b, h, l_q)
        low = ent < LOG2 - LOW_ENTROPY_TOL
        zero = torch.zeros((), dtype=torch.float64, device=alpha.device)

        def count(m: Tensor) -> Tensor:
            return m.sum(dim=(0, 2), dtype=torch.int64)  # (H,)

        def total(x: Tensor) -> Tensor:
            return torch.where(elig, x, zero).sum(dim=(0, 2))  # (H,) float64

        norm = ent / torch.log(nv.clamp(min=2).to(torch.float64))  # (B, H, Lq)
        sink = alpha[..., 0].detach().to(torch.float64)  # (B, H, Lq)
        q_pos = torch.arange(l_q, device=alpha.device) + (l_k - l_q)
        offset = q_pos - alpha.detach().argmax(dim=-1)  # (B, H, Lq), in [1-Lq, Lk-1]
        half = max(l_q, l_k) - 1
        width = 2 * half + 1
        flat = torch.arange(h, device=alpha.device)[None, :, None] * width + offset + half  # (B, H, Lq)
        hist = torch.zeros(h * width, dtype=torch.int64, device=alpha.device)
        hist.scatter_add_(0, flat.reshape(-1), elig.reshape(-1).to(torch.int64))
        return HeadStatsState(
            n_eligible=count(elig),
            n_low=count(elig & low),
            n_eligible_ge4=count(ge4),
            n_low_ge4=count(ge4 & low),
            n_2_3=count(elig & (nv <= 3)),
            entropy_sum=total(ent),
            norm_entropy_sum=total(norm),
            sink_sum=total(sink),
            offset_hist=hist.view(h, width),
        )

    def merge(self, other: HeadStatsState) -> HeadStatsState:
        """Combine two states over disjoint queries (associative; ``empty`` is the identity)."""
        if self.n_eligible.shape != other.n_eligible.shape:
            raise ValueError(f"cannot merge {self.n_eligible.numel()} heads with {other.n_eligible.numel()}")
        ha, hb = self.offset_hist, other.offset_hist
        pad = (hb.shape[1] - ha.shape[1]) // 2  # both widths are odd and centred on offset 0
        if pad > 0:
            ha = torch.nn.functional.pad(ha, (pad, pad))
        elif pad < 0:
            hb = torch.nn.functional.pad(hb, (-pad, -pad))
        return HeadStatsState(
            self.n_eligible + other.n_eligible, self.n_low + other.n_low,
            self.n_eligible_ge4 + other.n_eligible_ge4, self.n_low_ge4 + other.n_low_ge4,
            self.n_2_3 + other.n_2_3, self.entropy_sum + other.entropy_sum,
            self.norm_entropy_sum + other.norm_entropy_sum, self.sink_sum + other.sink_sum, ha + hb,
        )

    def result(self, layer: int = 0) -> HeadStats:
        """Final per-head §6 numbers and labels for this layer."""
        def np_(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy()

        n, n4 = np_(self.n_eligible), np_(self.n_eligible_ge4)
        hist = np_(self.offset_hist)
        k = (hist.shape[1] + 1) // 2
        with np.errstate(invalid="ignore", divide="ignore"):
            share_low = np_(self.n_low) / n
            share_low4 = np_(self.n_low_ge4) / n4
            offset_share = hist.max(axis=1) / n
            stats = dict(
                mean_entropy=np_(self.entropy_sum) / n,
                mean_norm_entropy=np_(self.norm_entropy_sum) / n,
                share_2_3_keys=np_(self.n_2_3) / n,
                sink_mass=np_(self.sink_sum) / n,
            )
        dead = share_low > DEAD_SHARE  # NaN (no queries) compares False
        offset_mode = hist.argmax(axis=1) - (k - 1)
        labels = head_labels(n, dead, share_low, stats["sink_mass"], offset_mode, offset_share)
        return HeadStats(layer=layer, n_queries=n, n_queries_ge4=n4, share_low_entropy=share_low, dead=dead,
                         share_low_entropy_ge4=share_low4, dead_ge4=share_low4 > DEAD_SHARE,
                         offset_mode=offset_mode, offset_share=offset_share, label=labels, **stats)


def head_labels(n_queries: np.ndarray, dead: np.ndarray, share_low: np.ndarray, sink_mass: np.ndarray,
                offset_mode: np.ndarray, offset_share: np.ndarray) -> tuple[str, ...]:
    """Label each head by what it collapsed onto (thresholds in the module docstring)."""
    low = dead | (share_low > LOW_SHARE)
    out = []
    for i in range(len(n_queries)):  # one entry per head: a handful, not a hot loop
        if n_queries[i] == 0:
            out.append("no eligible queries")
        elif not low[i]:
            out.append("diffuse")
        elif sink_mass[i] > SINK_SHARE:
            out.append("collapsed: sink")
        elif offset_share[i] > OFFSET_SHARE:
            out.append(f"collapsed: offset {int(offset_mode[i])}")
        else:
            out.append("collapsed: content")
    return tuple(out)


def max_attention_logit(scores: Tensor, visible: Tensor | None = None) -> Tensor:
    """Largest pre-softmax attention logit per head over visible entries, (H,) float64 (§12).

    Args:
        scores: (B, H, Lq, Lk) attention logits (q.k / sqrt(d) before masking or with -inf).
        visible: visible mask as in :func:`query_entropy`; None = all entries. A head with no
            visible entry gives -inf. Take ``.max()`` for the per-layer value.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be (B, H, Lq, Lk), got shape {tuple(scores.shape)}")
    vis = _as_visible(visible, scores.shape, scores.device)
    s = scores.detach().masked_fill(~vis.unsqueeze(1), -math.inf)  # (B, H, Lq, Lk)
    return s.amax(dim=(0, 2, 3)).to(torch.float64)


def log_partition(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean log-partition log Z = logsumexp over the vocabulary of the output logits, 0-d float64 (§12).

    Args:
        logits: (..., V) output logits. mask: bool over the leading dims, True = include
            (padding excluded); None = all positions. NaN when no position is included.
    """
    x = logits.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    lz = torch.logsumexp(x, dim=-1).to(torch.float64)  # (...)
    if mask is None:
        return lz.mean() if lz.numel() else torch.tensor(math.nan, dtype=torch.float64)
    m = mask.to(device=lz.device, dtype=torch.bool)
    if m.shape != lz.shape:
        raise ValueError(f"mask {tuple(m.shape)} does not match logits' leading dims {tuple(lz.shape)}")
    return torch.where(m, lz, torch.zeros((), dtype=torch.float64, device=lz.device)).sum() / m.sum()
