"""Timings of the loss-history and attention metrics (§5, §6, §9, §10). Prints figures.

    python benchmarks/loss_and_attention_metrics.py

Spike detector on 1e5 / 1e6 / 2e6 / 1e7 logged points (with 0.1% NaN), W = 50: CPU seconds and
the memory it allocates (tracemalloc: its peak, and what the returned report keeps), against
pandas' rolling median as a yardstick up to 1e6 (pandas cannot skip non-finite values inside the
window, so it answers an easier question); overfitting analysis on 1e6 training
points and 1e4 evaluations; §6 head statistics and §5 dead-neuron state on GPT-2-small-shaped
activations.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd
import torch

from analyze.metrics.attention import HeadStatsState, causal_visible
from analyze.metrics.neurons import DeadNeuronState
from analyze.metrics.overfitting import analyze_overfitting
from analyze.metrics.spikes import detect_spikes, rolling_median_mad


def _cpu(fn, repeat: int = 3) -> float:
    """Best CPU seconds of `repeat` calls (the machine is shared: wall time is noisy)."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def _allocated_mib(fn) -> tuple[float, float]:
    """(peak, kept): MiB that fn allocates at its peak and MiB still held by what it returns."""
    tracemalloc.start()
    out = fn()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return peak / 2**20, kept / 2**20


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
    for n in (100_000, 1_000_000, 2_000_000, 10_000_000):
        x = 2.0 + 0.05 * rng.standard_normal(n)
        x[rng.choice(n, n // 1000, replace=False)] = np.nan
        steps = np.arange(n)
        t_roll = _cpu(lambda: rolling_median_mad(x, 50), repeat=2)
        t_ours = _cpu(lambda: detect_spikes(steps, x, window=50), repeat=2)
        peak, kept = _allocated_mib(lambda: detect_spikes(steps, x, window=50))
        line = (f"spikes  n={n:>10,}  rolling_median_mad(W=50): {t_roll:6.3f} s CPU   detect_spikes (median+MAD, "
                f"finite-only windows, events): {t_ours:6.3f} s CPU, allocates {peak:5.0f} MiB at peak, "
                f"{kept:5.0f} MiB kept in the report")
        if n <= 1_000_000:
            line += f"   pandas rolling(50).median alone: {_cpu(lambda: pd.Series(x).rolling(50).median()):6.3f} s CPU"
        print(line, flush=True)

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
