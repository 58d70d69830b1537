"""Timings of the loss-history and attention metrics (§5, §6, §9, §10). Prints figures.

    python benchmarks/loss_and_attention_metrics.py

Spike detector on 1e6 logged points (with 0.1% NaN), against pandas' rolling median as a
yardstick (pandas cannot skip non-finite values inside the window, so it answers an easier
question); overfitting analysis on 1e6 training points and 1e4 evaluations; §6 head statistics
and §5 dead-neuron state on GPT-2-small-shaped activations.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from analyze.metrics.attention import HeadStatsState, causal_visible
from analyze.metrics.neurons import DeadNeuronState
from analyze.metrics.overfitting import analyze_overfitting
from analyze.metrics.spikes import detect_spikes


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for n in (100_000, 1_000_000):
        x = 2.0 + 0.05 * rng.standard_normal(n)
        x[rng.choice(n, n // 1000, replace=False)] = np.nan
        steps = np.arange(n)
        t_ours = _best(lambda: detect_spikes(steps, x, window=50))
        t_pd = _best(lambda: pd.Series(x).rolling(50).median())
        print(f"spikes  n={n:>9,}  detect_spikes (median+MAD, finite-only windows, events): {t_ours:6.3f} s   "
              f"pandas rolling(50).median alone: {t_pd:6.3f} s")

    n_train, n_eval = 1_000_000, 10_000
    ts = np.arange(n_train)
    tl = 3 * np.exp(-ts / 2e5) + 1 + 0.05 * rng.standard_normal(n_train)
    es = np.linspace(100, n_train - 1, n_eval).astype(np.int64)
    vl = 3 * np.exp(-es / 2e5) + 1.1 + 1e-7 * np.maximum(es - 5e5, 0)
    t_over = _best(lambda: analyze_overfitting(ts, tl, es, vl))
    print(f"overfitting  train={n_train:,} evals={n_eval:,}: {t_over:6.3f} s")

    b, h, l = 8, 12, 512  # GPT-2 small layer, one evaluation batch
    vis = causal_visible(l)
    scores = torch.randn(b, h, l, l).masked_fill(~vis[:, None], -torch.inf)
    alpha = scores.softmax(-1)
    t_head = _best(lambda: HeadStatsState.from_batch(alpha, vis).result(), repeat=2)
    print(f"head stats  alpha=({b}, {h}, {l}, {l}) float32: {t_head:6.3f} s per layer-batch")

    act = torch.nn.functional.gelu(torch.randn(b, l, 3072))
    mask = torch.ones(b, l, dtype=torch.bool)
    t_dead = _best(lambda: DeadNeuronState.from_batch(act, mask).result())
    print(f"dead neurons  H=({b}, {l}, 3072) float32: {t_dead:6.3f} s per layer-batch")


if __name__ == "__main__":
    main()
