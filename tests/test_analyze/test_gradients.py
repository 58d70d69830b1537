"""Global grad norm (§2) and rho / update ratio (§11) against direct formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyze.config import AnalysisConfig
from analyze.metrics.gradients import (
    classify_rho,
    global_grad_norm,
    grad_to_weight_ratio,
    frobenius_norm,
    ratio_from_sums,
    sum_of_squares,
    update_ratio,
    update_sums,
)

# Row norms accumulate in float32 (sum_of_squares docstring): 1e-6 relative is the documented bound.
F32_REL = 1e-6


def test_global_grad_norm_equals_norm_of_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in [(3, 4), (7,), (2, 3, 5), (1,), (0, 4)]]
    out = global_grad_norm(grads)
    ref = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads]).double())
    assert out.ndim == 0 and out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-6)
    # Hand-computed: sqrt(3^2 + 4^2 + 12^2) = 13.
    assert float(global_grad_norm([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])])) == pytest.approx(13.0, rel=1e-7)


def test_global_grad_norm_mixed_dtypes_and_empty() -> None:
    a = torch.full((1000,), 300.0, dtype=torch.bfloat16)  # sum of squares 9e7 overflows fp16, fine in fp32
    b = torch.full((10,), 2.0, dtype=torch.float16)
    c = torch.ones(4, dtype=torch.float64)
    ref = math.sqrt(1000 * 300.0**2 + 10 * 4.0 + 4)
    out = global_grad_norm([a, b, c])
    assert out.dtype == torch.float64
    assert float(out) == pytest.approx(ref, rel=1e-6)
    assert float(global_grad_norm([])) == 0.0 and global_grad_norm([]).ndim == 0
    assert float(global_grad_norm([None, torch.tensor([0.6, 0.8])])) == pytest.approx(1.0, rel=1e-7)


def test_global_grad_norm_never_syncs_with_the_host() -> None:
    # Meta tensors have no data: any .item() / float() / data-dependent branch would raise.
    out = global_grad_norm([torch.empty(3, 4, device="meta"), torch.empty(5, device="meta", dtype=torch.bfloat16)])
    assert out.device.type == "meta" and out.ndim == 0
    with pytest.raises(RuntimeError):
        float(out)  # proves the probe can detect a sync


def test_global_grad_norm_keeps_non_finite() -> None:
    assert math.isnan(float(global_grad_norm([torch.tensor([1.0, float("nan")]), torch.ones(3)])))
    assert math.isinf(float(global_grad_norm([torch.tensor([float("inf")]), torch.ones(3)])))


def test_grad_to_weight_ratio_and_update_ratio_against_numpy() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 5))
    gr = 1e-3 * rng.normal(size=(8, 5))
    rho = grad_to_weight_ratio(torch.from_numpy(gr), torch.from_numpy(w))
    assert rho == pytest.approx(np.linalg.norm(gr) / np.linalg.norm(w), rel=1e-12)
    w2 = w + gr
    ur = update_ratio(torch.from_numpy(w2).float(), torch.from_numpy(w).float())
    ref = np.linalg.norm(w2.astype(np.float32).astype(np.float64) - w.astype(np.float32)) / np.linalg.norm(
        w.astype(np.float32).astype(np.float64))
    assert ur == pytest.approx(ref, rel=F32_REL)
    assert math.isnan(grad_to_weight_ratio(torch.ones(3), torch.zeros(3)))
    assert math.isnan(update_ratio(torch.ones(3), torch.zeros(3)))
    with pytest.raises(ValueError):
        update_ratio(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize(
    ("rho", "verdict"),
    [(1e-6, "barely training"), (9.9e-5, "barely training"), (1e-4, "healthy"), (3e-3, "healthy"),
     (0.1, "healthy"), (0.11, "unstable"), (math.inf, "unstable"), (math.nan, "unstable")],
)
def test_classify_rho_band_edges(rho: float, verdict: str) -> None:
    cfg = AnalysisConfig()
    assert (cfg.rho_low, cfg.rho_high) == (1e-4, 1e-1)  # the §11 band is the default
    assert classify_rho(rho, cfg.rho_low, cfg.rho_high) == verdict


def test_sum_of_squares_against_float64_numpy_on_wide_and_long_rows() -> None:
    rng = np.random.default_rng(7)
    for shape in [(3, 100_000), (5000, 7), (4, 5, 6), (17,)]:
        x = (rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)).astype(np.float32)
        ref = float(np.sum(x.astype(np.float64) ** 2))
        assert sum_of_squares(torch.from_numpy(x)) == pytest.approx(ref, rel=F32_REL)
        assert frobenius_norm(torch.from_numpy(x)) == pytest.approx(math.sqrt(ref), rel=F32_REL)
    x64 = rng.normal(size=(40, 30))
    assert sum_of_squares(torch.from_numpy(x64)) == pytest.approx(float(np.sum(x64 ** 2)), rel=1e-13)
    half = torch.full((64, 64), 300.0, dtype=torch.float16)  # fp16 squares overflow; rows go through fp32
    assert sum_of_squares(half) == pytest.approx(64 * 64 * 300.0 ** 2, rel=1e-6)
    assert sum_of_squares(torch.empty(0, 3)) == 0.0


def test_sum_of_squares_survives_float32_overflow_and_keeps_nan() -> None:
    big = torch.full((3, 4), 1e20)          # finite entries whose squares overflow float32
    assert sum_of_squares(big) == pytest.approx(12 * 1e40, rel=1e-6)
    assert math.isnan(sum_of_squares(torch.tensor([[1.0, float("nan")]])))
    assert math.isinf(sum_of_squares(torch.tensor([[1.0, float("inf")]])))


def test_update_sums_add_up_over_row_blocks_and_match_numpy() -> None:
    rng = np.random.default_rng(11)
    old = rng.normal(size=(1000, 600)).astype(np.float32)      # > 1 block of ~1M elements
    new = (old + 1e-3 * rng.normal(size=old.shape)).astype(np.float32)
    d_ref = float(np.sum((new.astype(np.float64) - old) ** 2))
    o_ref = float(np.sum(old.astype(np.float64) ** 2))
    d, o = update_sums(torch.from_numpy(new), torch.from_numpy(old))
    assert d == pytest.approx(d_ref, rel=F32_REL) and o == pytest.approx(o_ref, rel=F32_REL)
    parts = [update_sums(torch.from_numpy(new[i:i + 333]), torch.from_numpy(old[i:i + 333])) for i in range(0, 1000, 333)]
    assert sum(p[0] for p in parts) == pytest.approx(d, rel=F32_REL)
    assert sum(p[1] for p in parts) == pytest.approx(o, rel=F32_REL)
    assert ratio_from_sums(d, o) == pytest.approx(math.sqrt(d_ref / o_ref), rel=F32_REL)
    assert math.isnan(ratio_from_sums(1.0, 0.0))
    big = torch.full((2, 2), 1e20)
    d, o = update_sums(big * 2, big)                            # float32 overflow -> float64 redo
    assert d == pytest.approx(4 * 1e40, rel=1e-6) and o == pytest.approx(4 * 1e40, rel=1e-6)


def test_update_sums_of_bfloat16_weights_difference_in_float32() -> None:
    # bf16 - bf16 rounded to bf16 would lose ~1e-5 of a large update; the difference is formed in float32.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 300, generator=g).to(torch.bfloat16)
    b = torch.randn(1000, 300, generator=g).to(torch.bfloat16)
    d, o = update_sums(b, a)
    assert d == pytest.approx(float(((b.double() - a.double()) ** 2).sum()), rel=F32_REL)
    assert o == pytest.approx(float((a.double() ** 2).sum()), rel=F32_REL)


# --------------------------------------------------------------------------- rho from training (§11)


def _logged_run(run_dir, grad_norms_every=None, checkpoint_first=True):
    """A 9-step run of a small MLP: checkpoints at 0, 4, 8, per-tensor grad norms logged."""
    from loaders import RunLogger

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with RunLogger(run_dir, flush_every=3, grad_norms_every=grad_norms_every) as log:
        for step in range(9):
            if checkpoint_first and step % 4 == 0:
                log.save_checkpoint(step, model)
            opt.zero_grad(set_to_none=True)
            model(torch.randn(32, 12)).pow(2).mean().backward()
            log.log_step(step, loss=1.0, model=model)
            if not checkpoint_first and step % 4 == 0:
                log.save_checkpoint(step, model)
            opt.step()
    return run_dir


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_training_rho_equals_logged_grad_norm_over_checkpoint_weight_norm(tmp_path, checkpoint_first) -> None:
    import csv

    from safetensors.numpy import load_file

    from analyze.pipeline.analysis import analyze_run

    run_dir = _logged_run(tmp_path / "r", grad_norms_every=3, checkpoint_first=checkpoint_first)
    logged = {}
    with open(run_dir / "grad_norms.csv", newline="") as f:
        for row in csv.DictReader(f):
            logged[(int(row["step"]), row["tensor"])] = float(row["grad_norm"])
    expected = {}
    for step in (0, 4, 8):
        weights = load_file(str(run_dir / "checkpoints" / f"step_{step:08d}.safetensors"))
        for name, w in weights.items():
            if w.ndim >= 2:  # rho is reported for weight matrices (§11; 1-D biases have no spectral row)
                expected[(step, name)] = logged[(step, name)] / float(np.linalg.norm(w.astype(np.float64)))
    gr = analyze_run(run_dir).tables["grad_ratio"]
    assert set(gr["source"]) == {"training"}
    got = {(int(r.step), r.tensor): float(r.rho) for r in gr.itertuples()}
    assert got.keys() == expected.keys()  # steps 3 and 6 have norms but no checkpoint: no rho there
    for key, rho in expected.items():
        assert got[key] == pytest.approx(rho, rel=1e-6), key
    cfg = AnalysisConfig()
    for r in gr.itertuples():
        assert r.status == classify_rho(float(r.rho), cfg.rho_low, cfg.rho_high)


def test_grad_ratio_table_falls_back_to_the_evaluation_batch_and_labels_it() -> None:
    import pandas as pd

    from analyze.pipeline.grad_ratio import grad_ratio_table

    cfg = AnalysisConfig()
    probe = [{"step": 10, "tensor": "w", "rho": 0.5, "grad_norm": 1.0, "weight_norm": 2.0, "status": "unstable"}]
    spectral = pd.DataFrame({"step": [10], "tensor": ["w"], "finite": [True], "frobenius": [4.0]})
    none = pd.DataFrame({"step": pd.Series(dtype="int64"), "tensor": pd.Series(dtype=object),
                         "grad_norm": pd.Series(dtype=float)})
    t, _ = grad_ratio_table(none, spectral, probe, cfg)
    assert t["source"].tolist() == ["evaluation batch"] and t["rho"].tolist() == [0.5]
    logged = pd.DataFrame({"step": [10], "tensor": ["w"], "grad_norm": [0.002]})
    t, notes = grad_ratio_table(logged, spectral, probe, cfg)
    assert t["source"].tolist() == ["training"] and t["rho"].tolist() == [pytest.approx(0.0005)]
    assert t["status"].tolist() == ["healthy"] and any("logged in training" in n for n in notes)
    elsewhere = logged.assign(step=[11])  # norms at a step without a checkpoint: the fallback, said so
    t, notes = grad_ratio_table(elsewhere, spectral, probe, cfg)
    assert t["source"].tolist() == ["evaluation batch"] and any("none at a checkpoint step" in n for n in notes)
    zero = spectral.assign(frobenius=[0.0])  # ||W|| = 0: rho undefined, flagged as not healthy
    t, _ = grad_ratio_table(logged, zero, [], cfg)
    assert math.isnan(t["rho"].iloc[0]) and t["status"].iloc[0] == "unstable"
