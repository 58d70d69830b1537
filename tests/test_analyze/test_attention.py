"""Attention entropy, dead heads, head labels (§6), max logit and log Z (§12).

Hand-built maps (uniform, one-hot, sink, previous-token, content) check the labels; a per-query
Python loop is the independent twin for every per-head statistic.
"""
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from analyze.metrics.attention import (
    HeadStatsState, causal_visible, log_partition, max_attention_logit, query_entropy,
)

LOG2 = math.log(2)


def _causal(l: int) -> torch.Tensor:
    return torch.tril(torch.ones(l, l, dtype=torch.bool))


def _one_hot_map(keys: torch.Tensor, l_k: int) -> torch.Tensor:
    """alpha (1, 1, Lq, Lk) with all weight of query q on key keys[q]."""
    return torch.nn.functional.one_hot(keys, l_k).to(torch.float64)[None, None]


def _reference(batches):
    """Per-head statistics from an explicit loop over (batch, head, query); batches = [(alpha, vis)]."""
    h = batches[0][0].shape[1]
    rows = [[] for _ in range(h)]
    for alpha, vis in batches:
        a = alpha.double().numpy()
        v = vis.expand(a.shape[0], -1, -1).numpy()
        b, _, l_q, l_k = a.shape
        for bi in range(b):
            for hi in range(h):
                for q in range(l_q):
                    n = int(v[bi, q].sum())
                    if n < 2:
                        continue
                    p = a[bi, hi, q]
                    ent = -sum(x * math.log(x) for x in p if x > 0)
                    rows[hi].append(dict(ent=ent, n=n, norm=ent / math.log(n), sink=p[0],
                                         off=q + l_k - l_q - int(np.argmax(p))))
    out = []
    for r in rows:
        low = [x["ent"] < LOG2 - 1e-6 for x in r]
        ge4 = [x["n"] >= 4 for x in r]
        offs = [x["off"] for x in r]
        vals, counts = np.unique(offs, return_counts=True)
        out.append(dict(
            n=len(r), mean_entropy=np.mean([x["ent"] for x in r]), mean_norm=np.mean([x["norm"] for x in r]),
            share_low=np.mean(low), share_low4=np.sum(np.logical_and(low, ge4)) / np.sum(ge4),
            share23=np.mean([x["n"] <= 3 for x in r]), sink=np.mean([x["sink"] for x in r]),
            mode=int(vals[np.argmax(counts)]), mode_share=counts.max() / len(r), n4=int(np.sum(ge4))))
    return out


def _random_causal_batch(seed: int, b: int, h: int, l: int, pad: bool):
    g = torch.Generator().manual_seed(seed)
    kpm = None
    if pad:  # right padding of random length per example
        lengths = torch.randint(1, l + 1, (b,), generator=g)
        kpm = torch.arange(l)[None, :] < lengths[:, None]
    vis = causal_visible(l, key_padding_mask=kpm)
    scores = torch.randn(b, h, l, l, generator=g, dtype=torch.float64) * torch.tensor([0.3, 3.0, 12.0])[:h, None, None]
    alpha = scores.masked_fill(~vis[:, None], -math.inf).softmax(-1).nan_to_num(0.0)  # fully masked rows -> 0
    return alpha, vis


def test_query_entropy_uniform_causal_and_edge_cases():
    l = 6
    vis = _causal(l)
    alpha = (vis.double() / vis.double().sum(-1, keepdim=True))[None, None]  # uniform over visible keys
    ent, n_vis = query_entropy(alpha, vis)
    np.testing.assert_allclose(ent[0, 0].numpy(), np.log(np.arange(1, l + 1)), rtol=0, atol=1e-12)
    assert n_vis.tolist() == [[1, 2, 3, 4, 5, 6]]
    # 0 log 0 = 0: a one-hot row has exactly zero entropy, not NaN.
    ent1, _ = query_entropy(_one_hot_map(torch.tensor([0, 1]), 2))
    assert ent1.flatten().tolist() == [0.0, 0.0]


def test_uniform_head_is_diffuse_not_dead():
    l = 16
    vis = _causal(l)
    alpha = (vis.double() / vis.double().sum(-1, keepdim=True))[None, None]
    s = HeadStatsState.from_batch(alpha, vis).result()
    assert s.n_queries[0] == l - 1  # query 0 sees one key: excluded
    assert s.mean_entropy[0] == pytest.approx(np.mean(np.log(np.arange(2, l + 1))), abs=1e-12)
    assert s.mean_norm_entropy[0] == pytest.approx(1.0, abs=1e-12)
    assert s.share_low_entropy[0] == 0.0  # the 2-key uniform query sits at log 2 and is not low
    assert not s.dead[0] and s.label == ("diffuse",)
    assert s.share_2_3_keys[0] == pytest.approx(2 / (l - 1), abs=1e-15)
    assert s.n_queries_ge4[0] == l - 3


def test_sink_previous_token_and_content_heads():
    l = 24
    q = torch.arange(l)
    sink = _one_hot_map(torch.zeros(l, dtype=torch.long), l)
    prev = _one_hot_map((q - 1).clamp(min=0), l)
    content = _one_hot_map(q // 2, l)  # offset ceil(q/2): never the same for many queries
    alpha = torch.cat([sink, prev, content], dim=1)  # (1, 3, L, L)
    s = HeadStatsState.from_batch(alpha, _causal(l)).result(layer=3)
    assert s.layer == 3 and s.n_heads == 3
    assert s.dead.tolist() == [True, True, True]
    assert s.mean_entropy.tolist() == [0.0, 0.0, 0.0]
    assert s.label == ("collapsed: sink", "collapsed: offset 1", "collapsed: content")
    assert s.sink_mass[0] == 1.0
    assert s.sink_mass[1] == pytest.approx(1 / (l - 1), abs=1e-15)  # only query 1's previous token is key 0
    assert s.offset_mode[1] == 1 and s.offset_share[1] == 1.0
    assert s.offset_share[2] < 0.5


def test_dead_rule_is_strictly_above_99_percent():
    # 100 queries seeing 4 keys each: one-hot on key 0 (low) or uniform (log 4, not low).
    def head(n_low: int) -> torch.Tensor:
        a = torch.full((100, 4), 0.25, dtype=torch.float64)
        a[:n_low] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
        return a[None, None]

    at_99 = HeadStatsState.from_batch(head(99)).result()
    assert at_99.share_low_entropy[0] == pytest.approx(0.99, abs=1e-15) and not at_99.dead[0]
    assert HeadStatsState.from_batch(head(100)).result().dead[0]


def test_ge4_variant_separates_short_contexts():
    # Queries with 2-3 visible keys are one-hot (low), longer ones uniform: the short contexts alone
    # make 2 of 7 eligible queries low; restricted to >= 4 keys nothing is low.
    l = 8
    vis = _causal(l)
    alpha = vis.double() / vis.double().sum(-1, keepdim=True)
    alpha[1:3] = torch.nn.functional.one_hot(torch.tensor([1, 2]), l).to(torch.float64)
    s = HeadStatsState.from_batch(alpha[None, None], vis).result()
    assert s.share_low_entropy[0] == pytest.approx(2 / 7, abs=1e-15)
    assert s.share_low_entropy_ge4[0] == 0.0 and not s.dead_ge4[0]
    assert s.share_2_3_keys[0] == pytest.approx(2 / 7, abs=1e-15)


@pytest.mark.parametrize("pad", [False, True])
def test_random_maps_against_loop(pad):
    alpha, vis = _random_causal_batch(seed=1, b=3, h=3, l=9, pad=pad)
    s = HeadStatsState.from_batch(alpha, vis).result()
    _check_against(s, _reference([(alpha, vis)]))


def test_merge_over_batches_of_different_lengths_equals_pooled_loop():
    a1, v1 = _random_causal_batch(seed=2, b=2, h=3, l=7, pad=True)
    a2, v2 = _random_causal_batch(seed=3, b=3, h=3, l=12, pad=True)
    s1, s2 = HeadStatsState.from_batch(a1, v1), HeadStatsState.from_batch(a2, v2)
    ref = _reference([(a1, v1), (a2, v2)])
    _check_against(s1.merge(s2).result(), ref)
    _check_against(s2.merge(s1).result(), ref)
    _check_against(HeadStatsState.empty(3).merge(s1).merge(s2).result(), ref)


def _check_against(s, ref):
    for i, r in enumerate(ref):
        assert s.n_queries[i] == r["n"] and s.n_queries_ge4[i] == r["n4"]
        assert s.mean_entropy[i] == pytest.approx(r["mean_entropy"], rel=1e-12, abs=1e-12)
        assert s.mean_norm_entropy[i] == pytest.approx(r["mean_norm"], rel=1e-12, abs=1e-12)
        assert s.share_low_entropy[i] == pytest.approx(r["share_low"], abs=1e-15)
        assert s.share_low_entropy_ge4[i] == pytest.approx(r["share_low4"], abs=1e-15)
        assert s.share_2_3_keys[i] == pytest.approx(r["share23"], abs=1e-15)
        assert s.sink_mass[i] == pytest.approx(r["sink"], rel=1e-12, abs=1e-15)
        assert s.offset_share[i] == pytest.approx(r["mode_share"], abs=1e-15)
        # np.unique sorts offsets ascending and argmax takes the first: the same tie rule as the histogram.
        assert s.offset_mode[i] == r["mode"]


def test_causal_visible_with_padding_and_kv_cache():
    kpm = torch.tensor([[True, True, True, False]])
    v = causal_visible(4, key_padding_mask=kpm)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(v[0], expected)  # the padding query sees nothing
    # Two new queries over five keys: they sit at positions 3 and 4.
    assert causal_visible(2, 5)[0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_max_attention_logit_ignores_masked_entries():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, 6, 6, generator=g)
    vis = _causal(6)
    scores_masked_big = scores.clone()
    scores_masked_big[..., ~vis] = 1e4  # huge values where keys are not visible
    got = max_attention_logit(scores_masked_big, vis)
    ref = np.array([max(scores[b, h][vis].max().item() for b in range(2)) for h in range(4)])
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)
    assert max_attention_logit(scores).max().item() == pytest.approx(scores.max().item(), abs=0)


def test_log_partition_against_scipy():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 50, generator=g) * 20 + 300  # large offsets: naive exp overflows in float32
    mask = torch.rand(3, 5, generator=g) > 0.4
    x = logits.double().numpy()
    lz = logsumexp(x, axis=-1)
    assert log_partition(logits).item() == pytest.approx(lz.mean(), rel=1e-6)
    assert log_partition(logits, mask).item() == pytest.approx(lz[mask.numpy()].mean(), rel=1e-6)
    assert math.isnan(log_partition(logits, torch.zeros(3, 5, dtype=torch.bool)).item())


def test_bad_mask_shape_raises():
    with pytest.raises(ValueError):
        query_entropy(torch.ones(1, 1, 3, 3) / 3, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        query_entropy(torch.ones(3, 3))
