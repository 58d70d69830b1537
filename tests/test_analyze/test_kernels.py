"""analyze.kernels, the torch-only kernels shared by the logger and the analysis: per-class Welford
states against numpy over the raw examples, and the import rule (torch and the stdlib only)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analyze.kernels import class_welford, global_grad_norm, merge_welford, scatter_welford


def _ref(x: np.ndarray) -> tuple[int, float, float]:
    x = x[np.isfinite(x)]
    return len(x), float(x.sum()), float(((x - x.mean()) ** 2).sum()) if len(x) else 0.0


def test_class_welford_per_group_and_class_matches_numpy_and_skips_nonfinite() -> None:
    rng = np.random.default_rng(0)
    loss = 1e6 + rng.standard_normal(500)  # a large offset: a one-pass sum of squares would cancel
    loss[rng.choice(500, 25, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], 25)
    ids, group = rng.integers(0, 4, 500), rng.integers(0, 6, 500)
    count, total, m2, skipped = class_welford(torch.from_numpy(loss), torch.from_numpy(ids), 4,
                                              torch.from_numpy(group), 6)
    assert count.shape == (6, 4) and count.dtype == torch.int64 and total.dtype == torch.float64
    for g in range(6):
        for c in range(4):
            sel = loss[(group == g) & (ids == c)]
            n, s, q = _ref(sel)
            assert int(count[g, c]) == n and int(skipped[g, c]) == int((~np.isfinite(sel)).sum())
            assert float(total[g, c]) == pytest.approx(s, rel=1e-14)
            assert float(m2[g, c]) == pytest.approx(q, rel=1e-8, abs=1e-9)


def test_scatter_of_partial_states_equals_the_pooled_examples() -> None:
    # rows are states of sub-batches; binning them must give the state of all their examples
    rng = np.random.default_rng(1)
    parts = [rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 3), rng.integers(1, 9)) for _ in range(40)]
    bins = rng.integers(0, 5, 40)
    parts[7] = np.array([1.0, np.nan])  # a row whose sum is NaN is left out whole
    rows = np.array([_ref(p) if np.isfinite(p).all() else (2, np.nan, np.nan) for p in parts])
    count, total, m2, skipped = scatter_welford(torch.from_numpy(bins), torch.from_numpy(rows[:, 0].astype(np.int64)),
                                                torch.from_numpy(rows[:, 1]), torch.from_numpy(rows[:, 2]), 5)
    for b in range(5):
        kept = [p for p, k in zip(parts, bins) if k == b and np.isfinite(p).all()]
        n, s, q = _ref(np.concatenate(kept)) if kept else (0, 0.0, 0.0)
        assert int(count[b]) == n and float(total[b]) == pytest.approx(s, rel=1e-12, abs=1e-12)
        assert float(m2[b]) == pytest.approx(q, rel=1e-10, abs=1e-12)
        assert int(skipped[b]) == (2 if b == bins[7] else 0)


def test_merge_equals_pooled_and_empty_is_the_identity() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(3, 1, 17), rng.normal(-2, 4, 5)
    def state(x: np.ndarray) -> tuple[torch.Tensor, ...]:
        n, s, q = _ref(x)
        return torch.tensor(n), torch.tensor(s, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)

    sa, sb = state(a), state(b)
    n, s, q = merge_welford(sa, sb)
    ref = _ref(np.concatenate([a, b]))
    assert int(n) == ref[0] and float(s) == pytest.approx(ref[1]) and float(q) == pytest.approx(ref[2], rel=1e-12)
    empty = (torch.tensor(0), torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    for merged in (merge_welford(sa, empty), merge_welford(empty, sa)):
        assert [float(t) for t in merged] == [float(t) for t in sa]


def test_one_implementation_is_shared() -> None:
    import analyze.metrics.gradients as gradients
    import loaders.logger as logger

    assert gradients.global_grad_norm is global_grad_norm is logger.global_grad_norm


def test_kernels_import_only_torch_and_the_stdlib() -> None:
    code = ("import sys, analyze.kernels; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'scipy', 'loaders', 'reports') "
            "or m.startswith(('analyze.metrics', 'analyze.pipeline', 'analyze.cli', 'analyze.config'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
