"""Spectral norm sigma_1 of weight matrices (§4) and stable rank (§12).

Three ways to sigma_1, all on `as_matrix(w)` (N-d weights reshaped to (out, rest)):

- `power_iteration`: the sheet's method, exactly as §4 writes it (relative-change stop).
  Kept for the validation table; its stop bounds the last change, not the error.
- `estimate_spectral_norm` (the default): Golub-Kahan-Lanczos bidiagonalisation with full
  reorthogonalisation, warm-startable from the previous checkpoint's vector, stopping on an
  error bound that needs no SVD. Batched twin: `estimate_spectral_norm_batched`.
- `exact_top_singular_values`: the float64 reference (sigma_1, sigma_2).
- `estimate_with_power_iteration`: the cold default estimate and the cold power iteration of one
  matrix (the validation pair of `trainaudit spectral`), sharing their matrix-vector products.

`spectral_validation` puts the three side by side (the §4 validation row, with whether the
estimator's own bound held against exact); `stable_rank` and `relative_error` are the §12 and
§4 formulas on numbers already computed.

Over 400 lines on purpose: the estimator, its error bound (argued below) and the references it is
validated against are read and changed together.

Why Lanczos (measured, 1 CPU thread, torch 2.13 + MKL; benchmarks/spectral.py):
  * On the 39 matrices of all-MiniLM-L6-v2 with min(m, n) >= 3 (sigma_2/sigma_1 up to
    0.993) Golub-Kahan needs 6-35 steps (1152 matrix-vector products in all) for errors
    <= 1.4e-7; block power (subspace) iteration with Rayleigh-Ritz and the same residual
    stop needs 9088 (block 4) or 12048 (block 8) products and 6-7x the time. On CPU a block
    of p vectors costs about p single products (MKL's skinny GEMM is no faster per column
    than GEMV), so blocking buys nothing back; Krylov's sqrt(gap) convergence is what wins.
  * The sheet's power iteration stops 1e-3 to 3e-2 low on those matrices and, warm-started,
    after one step with the error it started with.

The error bound (``SpectralEstimate.err_bound``, relative): for the top Ritz triple
(theta, u, v) of the bidiagonal B_j, W v = theta u exactly and ||W^T u - theta v|| =
beta_j |x_j| =: r, so ||W^T W v - theta^2 v|| = theta r and (Krylov-Bogoliubov) W^T W has an
eigenvalue in [theta^2 - theta r, theta^2 + theta r]. theta is a Ritz value, so theta <= sigma_1
(to rounding); when that eigenvalue is sigma_1^2, (sigma_1 - theta) / theta <=
sqrt(1 + r / theta) - 1 = err_bound (plus 8 eps of the working precision for rounding in the
products). The bound is about the singular value *nearest* theta; it is sigma_1's unless the start
vector was almost orthogonal to sigma_1's singular vector (then every Krylov method sees the
wrong cluster). Two consequences, both measured on 300 x 300 matrices with clustered tops
(sigma_2/sigma_1 = 0.99-0.999, 100 random starts each):
  * a Kato-Temple (quadratic, gap-based) bound with sigma_2 estimated from the second Ritz
    value stops early and is wrong in 3-40% of starts (errors to 1e-2): rejected;
  * the linear bound above with a stop at 1e-3 or 1e-4 still misses in 1-7% of cold starts
    (the Ritz vector is then almost pure v_2); at 1e-5 (DEFAULT_RTOL) 0 of 800 starts missed
    and the actual errors are ~1e-7, for ~10-15% more steps than 1e-4. Warm starts (the
    normal case across checkpoints) begin close to v_1, with one exception, handled:
  * when sigma_1 and sigma_2 swap between two checkpoints while their vectors barely mix, the
    previous v_1 is the new v_2, and a start from it alone reports sigma_2 (error = the gap
    1 - sigma_2 / sigma_1). Measured (600 x 400, swapped tops, mixing angle eps, 5 trials each):
    at the 1e-5 stop such a start misses for eps < 1e-3 with gaps of 1e-2 and 5e-2; at 1e-4 it
    misses up to eps = 1e-3. So the warm start is two vectors: the previous v and the previous
    second Ritz vector ``v2``; the start is the best vector of their span (a 2 x 2 Rayleigh-Ritz
    step, one skinny product: `_rayleigh_ritz_start`). It found sigma_1 in every case of that
    grid (gaps 1e-3 to 5e-2, eps 0 to 1e-2) at every stop from 1e-3 to 1e-5, and it cuts the
    steps on GPT-2-small-shaped weights from 274 to 164 (benchmarks/weights.py). A reordering
    that brings sigma_3 or lower to the top is not covered; the exact pass (automatic up to 10M
    parameters, `--exact-svd`) shows such a miss. Mixing a random vector into every start
    would cover it but costs ~60% more steps on every matrix; not done.

Speed: one host sync per half-step (the Lanczos coefficients); with ``method="auto"`` matrices
with min(m, n) <= EXACT_MAX_DIM use the exact Gram eigensolve instead (cheaper than any loop).
The report's validation runs ``method="lanczos"`` on every matrix, so the estimator is
validated on small matrices too (`analyze.pipeline.weights_task`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RTOL",
    "EXACT_MAX_DIM",
    "ExactSigma",
    "PowerResult",
    "SpectralEstimate",
    "SpectralValidation",
    "as_matrix",
    "bound_held",
    "estimate_spectral_norm",
    "estimate_spectral_norm_batched",
    "estimate_with_power_iteration",
    "exact_top_singular_values",
    "is_finite_tensor",
    "matrix_skip_reason",
    "power_iteration",
    "relative_error",
    "sigma_ratio",
    "spectral_validation",
    "stable_rank",
]

DEFAULT_RTOL = 1e-5      # stop when err_bound <= this: 100x inside the 1e-3 target (docstring)
DEFAULT_MAX_ITER = 300   # Golub-Kahan steps (each = one W v and one W^T u product)
EXACT_MAX_DIM = 128      # min(m, n) up to this: the exact Gram eigensolve is cheaper than Lanczos


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class PowerResult:
    """The sheet's power iteration: estimate, unit right vector for the next warm start."""

    sigma: float
    v: Tensor          # (n,) unit right singular vector estimate, float32/64, on W's device
    iterations: int    # k at stop (each = one W^T u and one W v product)
    converged: bool    # the relative-change rule fired before max_iter
    warm_start: bool


@dataclass(frozen=True, slots=True)
class SpectralEstimate:
    """Default estimator's result. ``sigma <= sigma_1`` to rounding (a Ritz value, or exact).

    ``err_bound`` bounds the relative error (sigma_1 - sigma) / sigma_1 without any SVD
    (see the module docstring for what it assumes).
    """

    sigma: float
    err_bound: float
    v: Tensor          # (n,) unit Ritz vector: pass as v0 at the next checkpoint
    iterations: int    # Golub-Kahan steps used
    method: str        # "lanczos" (Golub-Kahan bidiagonalisation) or "exact" (tiny matrices)
    warm_start: bool
    converged: bool    # err_bound <= rtol reached
    v2: Tensor | None = None  # (n,) unit second Ritz vector (None after 1 step): pass as v0_second


@dataclass(frozen=True, slots=True)
class ExactSigma:
    """Exact top-2 singular values (float64). ``finite`` False: input had NaN/inf, values NaN."""

    sigma1: float
    sigma2: float      # NaN when min(m, n) < 2
    finite: bool

    @property
    def ratio(self) -> float:
        """sigma_2 / sigma_1: how slowly power iteration converges (§4)."""
        return sigma_ratio(self)


# --------------------------------------------------------------------------- matrices


def matrix_skip_reason(w: Tensor) -> str | None:
    """Why ``w`` has no spectral norm (a note for the report), or None when it has one."""
    if not (w.is_floating_point() or w.is_complex()):
        return f"{str(w.dtype).removeprefix('torch.')} tensor: no spectral norm"
    if w.ndim < 2:
        return f"{w.ndim}-D tensor: no spectral norm"
    if w.numel() == 0:
        return "empty tensor: no spectral norm"
    if w.is_complex():
        return "complex tensor: not supported"
    return None


def as_matrix(w: Tensor) -> Tensor | None:
    """The 2-D float matrix whose sigma_1 is reported, or None (see `matrix_skip_reason`).

    N-d weights (convolutions: (out, in, kh, kw)) are reshaped to (out, rest); float16 and
    bfloat16 are upcast to float32 (their 8-11 bit mantissas would swamp a 1e-3 target).
    """
    if matrix_skip_reason(w) is not None:
        return None
    m = w.detach().reshape(w.shape[0], -1)  # (out, rest)
    if m.dtype not in (torch.float32, torch.float64):
        m = m.to(torch.float32)
    return m


def _require_matrix(w: Tensor) -> Tensor:
    m = as_matrix(w)
    if m is None:
        raise ValueError(f"no spectral norm for tensor of shape {tuple(w.shape)}, dtype {w.dtype}: "
                         f"{matrix_skip_reason(w)}")
    return m


def is_finite_tensor(w: Tensor) -> bool:
    """True when every element is finite (exact SVD raises on NaN/inf).

    Fast path: a finite sum proves every element finite (NaN and inf propagate); only a
    non-finite sum (or a float32 overflow) pays for the elementwise check.
    """
    if not (w.is_floating_point() or w.is_complex()):
        return True
    acc = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(w.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(w).all())


# --------------------------------------------------------------------------- exact


def exact_top_singular_values(w: Tensor) -> ExactSigma:
    """sigma_1 and sigma_2 in float64 from eigvalsh of the smaller Gram matrix (§4 reference).

    The Gram matrix of the short side (k x k, k = min(m, n)) is formed in float64, so its top
    eigenvalues are sigma_1^2, sigma_2^2 to ~1e-15 relative; for a 50257 x 768 embedding this
    is faster than ``svdvals``, and no slower for square matrices. Non-finite input returns
    NaNs flagged ``finite=False`` instead of raising (SVD routines throw on it).
    """
    m = _require_matrix(w)
    if not is_finite_tensor(m):
        return ExactSigma(math.nan, math.nan, False)
    a = m.to(torch.float64)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T   # (k, k)
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)           # ascending
    s1 = math.sqrt(float(lam[-1]))
    s2 = math.sqrt(float(lam[-2])) if lam.numel() > 1 else math.nan
    return ExactSigma(s1, s2, True)


def sigma_ratio(exact: ExactSigma) -> float:
    """sigma_2 / sigma_1 of an exact result; NaN when undefined (sigma_1 = 0 or one value)."""
    if not exact.sigma1 > 0:
        return math.nan
    return exact.sigma2 / exact.sigma1


def stable_rank(fro_sq: float, sigma1: float) -> float:
    """||W||_F^2 / sigma_1^2 (§12) from the squared Frobenius norm (`analyze.metrics.gradients.sum_of_squares`
    of `as_matrix(w)`); NaN when sigma_1 <= 0."""
    return fro_sq / (sigma1 * sigma1) if sigma1 > 0 else math.nan


def relative_error(estimate: float, reference: float) -> float:
    """|estimate - reference| / reference (§4 validation); NaN when the reference is not finite
    or not positive."""
    return abs(estimate - reference) / reference if math.isfinite(reference) and reference > 0 else math.nan


@dataclass(frozen=True, slots=True)
class SpectralValidation:
    """One matrix of the §4 validation table: the default estimate with its bound, the sheet's
    power iteration and the exact reference, with relative errors (NaN where a method did not run)."""

    method: str
    sigma_est: float
    err_bound: float
    iterations: int
    warm_start: bool
    sigma_power: float
    power_iterations: int
    power_warm_start: bool
    power_converged: bool
    sigma_exact: float
    sigma2_exact: float
    rel_err: float
    power_rel_err: float
    sigma_ratio: float
    bound_held: bool | None   # |sigma_est - sigma_exact| <= err_bound * sigma_est; None without exact


def bound_held(sigma_est: float, err_bound: float, sigma_exact: float) -> bool | None:
    """Whether the estimator's relative bound held: |sigma_est - sigma_exact| <= err_bound * sigma_est
    (the bound is relative to the estimate, module docstring); None when exact is not known."""
    if not math.isfinite(sigma_exact):
        return None
    return bool(abs(sigma_est - sigma_exact) <= err_bound * sigma_est)


def spectral_validation(est: SpectralEstimate, power: PowerResult | None, exact: ExactSigma | None,
                        ) -> SpectralValidation:
    """The §4 validation row of one matrix from its three results (`power`, `exact`: None when not run)."""
    nan = math.nan
    s1 = exact.sigma1 if exact is not None else nan
    return SpectralValidation(
        method=est.method, sigma_est=est.sigma, err_bound=est.err_bound, iterations=est.iterations,
        warm_start=est.warm_start, sigma_power=power.sigma if power else nan,
        power_iterations=power.iterations if power else 0, power_warm_start=power.warm_start if power else False,
        power_converged=power.converged if power else False, sigma_exact=s1,
        sigma2_exact=exact.sigma2 if exact is not None else nan, rel_err=relative_error(est.sigma, s1),
        power_rel_err=relative_error(power.sigma, s1) if power else nan,
        sigma_ratio=sigma_ratio(exact) if exact is not None else nan,
        bound_held=bound_held(est.sigma, est.err_bound, s1))


# --------------------------------------------------------------------------- power iteration


def _warm_vector(v0: Tensor | None, n: int, like: Tensor, batch: tuple[int, ...] = ()) -> Tensor | None:
    """v0 normalised to shape (*batch, n), or None when absent, stale (wrong size) or unusable."""
    if v0 is None or v0.numel() != math.prod(batch) * n:
        return None
    v = v0.detach().to(device=like.device, dtype=like.dtype).reshape(*batch, n)
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if not (bool((norm > 0).all()) and bool(torch.isfinite(norm).all())):
        return None
    return v / norm


def _cold_vector(n: int, like: Tensor, generator: torch.Generator | None, batch: tuple[int, ...] = ()) -> Tensor:
    """Seeded Gaussian unit vector (seed 0 unless a generator is given), shared by a batch
    so that a stack gets the per-matrix cold starts."""
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    v = torch.randn(n, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    return (v / torch.linalg.vector_norm(v)).expand(*batch, n).contiguous()


def power_iteration(w: Tensor, v0: Tensor | None = None, *, tol: float = 1e-4, max_iter: int = 100,
                    generator: torch.Generator | None = None) -> PowerResult:
    """The sheet's power iteration on W^T W, exactly as §4 writes it.

    u_k = W v_{k-1} / ||.||, v_k = W^T u_k / ||.||, s_k = ||W v_k||; stop when
    |s_k - s_{k-1}| <= tol * s_k (s_0 = ||W v_0||). This stop bounds the last change, not
    the error: with sigma_2 / sigma_1 near 1 it halts early (up to 2% low on real weights).
    """
    a = _require_matrix(w)
    v = _warm_vector(v0, a.shape[1], a)
    warm = v is not None
    if v is None:
        v = _cold_vector(a.shape[1], a, generator)
    p = a @ v                                   # (m,)  W v_{k-1}, reused from the last s_k
    s_prev = float(torch.linalg.vector_norm(p))
    if s_prev == 0.0 or not math.isfinite(s_prev):
        return PowerResult(s_prev, v, 0, s_prev == 0.0, warm)
    return _power_steps(a, v, p, s_prev, 0, tol, max_iter, warm)


def _power_steps(a: Tensor, v: Tensor, p: Tensor, s_prev: float, k0: int, tol: float, max_iter: int,
                 warm: bool) -> PowerResult:
    """Steps k0 + 1 .. max_iter of `power_iteration` from v = v_k0, p = W v_k0, s_prev = s_k0."""
    s, k, converged = s_prev, k0, False
    for k in range(k0 + 1, max_iter + 1):
        u = p / torch.linalg.vector_norm(p)
        q = u @ a                               # (n,)  W^T u_k
        v = q / torch.linalg.vector_norm(q)
        p = a @ v
        s = float(torch.linalg.vector_norm(p))
        if abs(s - s_prev) <= tol * s:
            converged = True
            break
        s_prev = s
    return PowerResult(s, v, k, converged, warm)


# --------------------------------------------------------------------------- Golub-Kahan-Lanczos


def _project_out(x: Tensor, basis: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass: x - (x basis^T) basis. x: (b, 1, n); basis: (b, k, n)."""
    # Row-vector products only: MKL's batched (k, n) @ (n, 1) path is several times slower.
    return torch.baddbmm(x, torch.bmm(x, basis.transpose(1, 2)), basis, alpha=-1)


def _orthonormalise(x: Tensor, basis: Tensor, scale: np.ndarray, floor: float,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, np.ndarray]:
    """Full reorthogonalisation of x (b, 1, n) against basis (b, k, n), then x / ||x||.

    Returns (unit x, ||x|| (b, 1, 1) on device, ||x|| (b,) on host); one host sync. A second
    Gram-Schmidt pass runs only where the first cancelled more than 30% of the norm (DGKS
    criterion: "twice is enough"). Where ||x|| is at rounding level (<= floor * scale) the
    Krylov space is invariant: continue with a random unit vector orthogonal to the basis and
    coefficient 0; dropping a coefficient that small moves singular values by <= floor * scale.
    """
    before = torch.linalg.vector_norm(x, dim=-1, keepdim=True)      # (b, 1, 1)
    x = _project_out(x, basis)
    after = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    host = np.asarray(torch.cat([before, after], dim=1).tolist()).reshape(-1, 2)  # (b, 2) float64
    if (host[:, 1] < 0.7 * host[:, 0]).any():
        x = _project_out(x, basis)
        after = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        host[:, 1] = np.asarray(after.tolist()).reshape(-1)
    norm = host[:, 1]
    tiny = norm <= floor * np.maximum(scale, norm)
    if not tiny.any():
        return x / after, after, norm
    r = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    r = _project_out(_project_out(r, basis), basis)
    r = r / torch.linalg.vector_norm(r, dim=-1, keepdim=True)
    t = torch.from_numpy(tiny).to(x.device).reshape(-1, 1, 1)
    x = torch.where(t, r, x / after.clamp_min(torch.finfo(x.dtype).tiny))
    return x, torch.where(t, torch.zeros_like(after), after), np.where(tiny, 0.0, norm)


@dataclass(frozen=True, slots=True)
class _Ritz:
    theta: np.ndarray   # (b,) top Ritz value of B_j
    bound: np.ndarray   # (b,) relative error bound on theta (module docstring)
    x: np.ndarray       # (b, j) left singular vector of B_j (coefficients on U)
    y: np.ndarray       # (b, j) right singular vector of B_j (coefficients on V)
    x2: np.ndarray      # (b, j) second left singular vector (zeros when j = 1)
    y2: np.ndarray      # (b, j) second right singular vector


def _ritz(alpha: np.ndarray, beta: np.ndarray, floor: float) -> _Ritz:
    """Top Ritz triple of the j x j upper bidiagonal B_j and its error bound (float64, host).

    alpha: (b, j) diagonal; beta: (b, j) superdiagonal followed by the trailing beta_j.
    For the Ritz triple (theta, x, y): W v = theta u exactly and
    W^T u - theta v = beta_j x[-1] v_{j+1}, so W^T W v - theta^2 v has norm theta * r with
    r = beta_j |x[-1]|. Krylov-Bogoliubov: an eigenvalue of W^T W lies within theta * r of
    theta^2, i.e. a singular value within theta * (sqrt(1 + r / theta) - 1) of theta.
    ``floor`` (relative) accounts for rounding in the products, which r does not see.
    """
    b, j = alpha.shape
    idx = np.arange(j)
    B = np.zeros((b, j, j))
    B[:, idx, idx] = alpha
    B[:, idx[:-1], idx[1:]] = beta[:, : j - 1]
    X, S, Yh = np.linalg.svd(B)
    theta = S[:, 0]
    res = beta[:, -1] * np.abs(X[:, -1, 0])
    bound = np.where(theta > 0, np.sqrt(1.0 + res / np.maximum(theta, 1e-300)) - 1.0, 0.0) + floor
    if j > 1:
        x2, y2 = X[:, :, 1], Yh[:, 1, :]
    else:
        x2, y2 = np.zeros((b, j)), np.zeros((b, j))
    return _Ritz(theta, bound, X[:, :, 0], Yh[:, 0, :], x2, y2)


@dataclass(frozen=True, slots=True)
class _GKLResult:
    sigma: np.ndarray      # (b,)
    bound: np.ndarray      # (b,)
    iterations: np.ndarray  # (b,)
    v: Tensor              # (b, n) Ritz vector in the start space
    u: Tensor              # (b, m) Ritz vector in the other space
    v2: Tensor             # (b, n) second Ritz vectors (zero rows where only one step ran)
    u2: Tensor             # (b, m)
    alpha: np.ndarray      # (b, kmax) diagonal of B (first `iterations` entries valid)
    beta: np.ndarray       # (b, kmax) superdiagonal of B, then the trailing beta_j
    V: Tensor              # (b, >= j, n) Lanczos basis of the start space: W V_j = U_j B_j
    U: Tensor              # (b, >= j, m)


def _grow(t: Tensor, rows: int) -> Tensor:
    """Copy of basis storage t (b, k, d) with room for ``rows`` vectors."""
    out = torch.zeros(t.shape[0], rows, t.shape[2], dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _gkl(a: Tensor, v: Tensor, *, rtol: float, max_iter: int, generator: torch.Generator) -> _GKLResult:
    """Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation, batched.

    a: (b, m, n), v: (b, n) unit start vectors. W V_j = U_j B_j with B_j upper bidiagonal;
    the top singular value of B_j is the Ritz value. Each matrix stops on its own when its
    bound <= rtol and its answer is frozen there, so a stack gives the per-matrix answers.
    """
    bsz, m, n = a.shape
    kmax = max(1, min(max_iter, m, n))
    cap = min(kmax, 32)                                          # grows by doubling
    V = torch.zeros(bsz, cap + 1, n, dtype=a.dtype, device=a.device)
    U = torch.zeros(bsz, cap, m, dtype=a.dtype, device=a.device)
    alphas, betas = np.zeros((bsz, kmax)), np.zeros((bsz, kmax))
    sigma, bound = np.zeros(bsz), np.full(bsz, np.inf)
    xs, ys = np.zeros((bsz, kmax)), np.zeros((bsz, kmax))
    xs2, ys2 = np.zeros((bsz, kmax)), np.zeros((bsz, kmax))
    iters = np.zeros(bsz, dtype=np.int64)
    done = np.zeros(bsz, dtype=bool)
    scale = np.zeros(bsz)                                        # running max coefficient
    floor = 8 * torch.finfo(a.dtype).eps                         # relative rounding level

    at = a.transpose(1, 2)                                       # (b, n, m) view: x @ at = (W x^T)^T
    V[:, 0] = v
    p = torch.bmm(v.unsqueeze(1), at)                            # (b, 1, m)  W v_1
    u, alpha_t, alphas[:, 0] = _orthonormalise(p, U[:, :0], scale, floor, generator)
    scale = np.maximum(scale, alphas[:, 0])
    for j in range(1, kmax + 1):
        if j > cap:
            cap = min(2 * cap, kmax)
            V, U = _grow(V, cap + 1), _grow(U, cap)
        U[:, j - 1 : j] = u
        q = torch.baddbmm(V[:, j - 1 : j] * -alpha_t, u, a)        # (b, 1, n)  W^T u_j - alpha_j v_j
        vn, beta_t, betas[:, j - 1] = _orthonormalise(q, V[:, :j], scale, floor, generator)
        scale = np.maximum(scale, betas[:, j - 1])
        r = _ritz(alphas[:, :j], betas[:, :j], floor)
        newly = ~done & ((r.bound <= rtol) | (j == kmax))
        if newly.any():
            sigma[newly], bound[newly], iters[newly] = r.theta[newly], r.bound[newly], j
            xs[newly, :j], ys[newly, :j] = r.x[newly], r.y[newly]
            xs2[newly, :j], ys2[newly, :j] = r.x2[newly], r.y2[newly]
            done |= newly
        if done.all():
            break
        V[:, j : j + 1] = vn
        p = torch.baddbmm(u * -beta_t, vn, at)                     # (b, 1, m)  W v_{j+1} - beta_j u_j
        u, alpha_t, alphas[:, j] = _orthonormalise(p, U[:, :j], scale, floor, generator)
        scale = np.maximum(scale, alphas[:, j])
    k = int(iters.max())
    coef = torch.from_numpy(np.stack([ys[:, :k], ys2[:, :k]], axis=1)).to(device=a.device, dtype=a.dtype)  # (b, 2, k)
    coef_u = torch.from_numpy(np.stack([xs[:, :k], xs2[:, :k]], axis=1)).to(device=a.device, dtype=a.dtype)
    v_r = torch.bmm(coef, V[:, :k])                              # (b, 2, n): first and second Ritz vectors
    u_r = torch.bmm(coef_u, U[:, :k])                            # (b, 2, m)
    tiny = torch.finfo(a.dtype).tiny
    v_r = v_r / torch.linalg.vector_norm(v_r, dim=-1, keepdim=True).clamp_min(tiny)
    u_r = u_r / torch.linalg.vector_norm(u_r, dim=-1, keepdim=True).clamp_min(tiny)
    return _GKLResult(sigma, bound, iters, v_r[:, 0], u_r[:, 0], v_r[:, 1], u_r[:, 1], alphas, betas, V, U)


def _exact_small(a: Tensor) -> tuple[np.ndarray, np.ndarray, Tensor, Tensor | None]:
    """Exact sigma_1, right singular vector and second one of each (m, n) in a (b, m, n) stack
    (float64; the second is None when min(m, n) = 1).

    sigma_1^2 is the top eigenvalue of the smaller Gram matrix; the relative error bound is
    rounding: ~ eps64 * cond, reported as 1e-12.
    """
    d = a.to(torch.float64)
    wide = d.shape[1] < d.shape[2]
    gram = d @ d.transpose(1, 2) if wide else d.transpose(1, 2) @ d   # (b, k, k)
    lam, vec = torch.linalg.eigh(gram)
    top = vec[..., -2:].flip(-1).transpose(1, 2)                      # (b, 2 or 1, k): first, second
    sigma = lam[..., -1].clamp_min(0).sqrt()
    if wide:                                                          # top is u: v = W^T u / sigma
        top = torch.bmm(top, d)
        top = top / torch.linalg.vector_norm(top, dim=-1, keepdim=True).clamp_min(1e-300)
    top = top.to(a.dtype)
    return sigma.cpu().numpy(), np.full(d.shape[0], 1e-12), top[:, 0], top[:, 1] if top.shape[1] > 1 else None


def _rayleigh_ritz_start(a: Tensor, v1: Tensor, v2: Tensor) -> Tensor | None:
    """The unit vector of span{v1, v2} that W stretches most: top eigenvector of the 2 x 2
    (W Q)^T (W Q), Q an orthonormal basis of the span (two products in one skinny GEMM). None
    when v2 adds no direction. When sigma_1 and sigma_2 swap between checkpoints, the previous
    checkpoint's second vector is the new first one, and this start follows it."""
    n = a.shape[1]
    basis = torch.stack([v1.reshape(-1), v2.reshape(-1)]).to(device=a.device, dtype=a.dtype)  # (2, n)
    if basis.shape[1] != n or not bool(torch.isfinite(basis).all()):
        return None
    q, r = torch.linalg.qr(basis.T)                               # (n, 2), (2, 2)
    diag = r.diagonal().abs()
    if not float(diag[1]) > 1e-6 * float(diag[0]):
        return None
    p = q.T @ a.T                                                 # (2, m) = (W Q)^T, one pass over W
    _, vec = torch.linalg.eigh((p @ p.T).to(torch.float64))       # ascending
    return q @ vec[:, -1].to(a.dtype)


def estimate_spectral_norm(w: Tensor, v0: Tensor | None = None, *, rtol: float = DEFAULT_RTOL,
                           max_iter: int = DEFAULT_MAX_ITER, method: str = "auto",
                           generator: torch.Generator | None = None, check_finite: bool = True,
                           v0_second: Tensor | None = None) -> SpectralEstimate:
    """sigma_1 of one weight (any shape `as_matrix` accepts) with a relative error bound.

    Golub-Kahan-Lanczos from ``v0`` (warm start: the previous checkpoint's ``.v``, a unit right
    singular vector estimate; a wrong-sized v0 starts cold) or a seeded Gaussian (cold).
    ``sigma`` is a Ritz value: never above sigma_1 beyond rounding (~1e-7 in float32).
    ``method``: "auto" (exact for min(m, n) <= EXACT_MAX_DIM, else "lanczos"), "lanczos" or
    "exact". Raises ValueError for tensors `as_matrix` rejects and for non-finite ones;
    ``check_finite=False`` skips that pass over the data when the caller already knows (a finite
    `analyze.metrics.gradients.sum_of_squares` proves every entry finite). ``v0_second``: the previous
    checkpoint's ``.v2`` beside ``v0``; the start is then the best vector of their span
    (`_rayleigh_ritz_start`), which follows a swap of sigma_1 and sigma_2 and saves steps when
    they are close.
    """
    a = _require_matrix(w)
    small = method == "exact" or (method == "auto" and min(a.shape) <= EXACT_MAX_DIM)
    if v0 is not None and v0_second is not None and not small and v0.numel() == a.shape[1]:
        if check_finite and not is_finite_tensor(a):
            raise ValueError("non-finite entries: no spectral norm (check is_finite_tensor first)")
        start = _rayleigh_ritz_start(a, v0, v0_second) if v0_second.numel() == a.shape[1] else None
        v0 = v0 if start is None else start  # no usable pair: the plain warm start
        check_finite = False
    return estimate_spectral_norm_batched(a.unsqueeze(0), None if v0 is None else v0.reshape(1, -1),
                                          rtol=rtol, max_iter=max_iter, method=method, generator=generator,
                                          check_finite=check_finite)[0]


def estimate_spectral_norm_batched(ws: Tensor, v0: Tensor | None = None, *, rtol: float = DEFAULT_RTOL,
                                   max_iter: int = DEFAULT_MAX_ITER, method: str = "auto",
                                   generator: torch.Generator | None = None,
                                   check_finite: bool = True) -> list[SpectralEstimate]:
    """`estimate_spectral_norm` for a stack (k, m, n) of same-shape matrices at once.

    One batched product per half-step for the whole stack (e.g. the same weight of every
    layer); each matrix stops on its own bound and gets the answer it would get alone.
    ``v0``: (k, n) warm-start vectors.
    """
    if method not in ("auto", "lanczos", "exact"):
        raise ValueError(f"method must be one of auto, lanczos, exact; got {method!r}")
    if ws.ndim != 3 or ws.numel() == 0:
        raise ValueError(f"expected a non-empty (k, m, n) stack, got shape {tuple(ws.shape)}")
    a = ws.detach()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.to(torch.float32)
    if check_finite and not is_finite_tensor(a):
        raise ValueError("non-finite entries: no spectral norm (check is_finite_tensor first)")
    k, m, n = a.shape
    if method == "exact" or (method == "auto" and min(m, n) <= EXACT_MAX_DIM):
        sig, bnd, vec, vec2 = _exact_small(a)
        return [SpectralEstimate(float(sig[i]), float(bnd[i]), vec[i], 0, "exact", False, True,
                                 None if vec2 is None else vec2[i]) for i in range(k)]
    if generator is None:
        generator = torch.Generator(device=a.device).manual_seed(0)  # also used on breakdowns
    # Start in the smaller space: its Krylov space is exhausted after min(m, n) steps.
    wide = m < n
    op = a.transpose(1, 2) if wide else a                          # (k, M, N), N <= M
    start = _warm_vector(v0, n, a, batch=(k,))
    if start is not None and wide:
        p = torch.bmm(start.unsqueeze(1), a.transpose(1, 2)).squeeze(1)  # (k, m): u_0 = W v0 / ||W v0||
        pn = torch.linalg.vector_norm(p, dim=-1, keepdim=True)
        start = p / pn if bool((pn > 0).all()) else None
    warm = start is not None
    if start is None:
        start = _cold_vector(op.shape[2], a, generator, batch=(k,))
    r = _gkl(op, start, rtol=rtol, max_iter=max_iter, generator=generator)
    right = r.u if wide else r.v                                   # (k, n) right singular vector
    right2 = r.u2 if wide else r.v2
    return [SpectralEstimate(float(r.sigma[i]), float(r.bound[i]), right[i], int(r.iterations[i]), "lanczos",
                             warm, bool(r.bound[i] <= rtol), right2[i] if r.iterations[i] > 1 else None)
            for i in range(k)]


def estimate_with_power_iteration(w: Tensor, *, rtol: float = DEFAULT_RTOL, max_iter: int = DEFAULT_MAX_ITER,
                                  method: str = "auto", tol: float = 1e-4, power_max_iter: int = 100,
                                  check_finite: bool = True) -> tuple[SpectralEstimate, PowerResult]:
    """Cold `estimate_spectral_norm` and cold `power_iteration` of one matrix (the §4 validation
    pair), sharing their matrix-vector products.

    The power iterates from the seeded start v_0 lie in the Krylov space that Golub-Kahan builds
    from the same start (for a wide W the estimator starts from u_1 = W v_0 / ||W v_0||, the
    power iteration's first left vector). With W V_j = U_j B_j and W^T U_j = V_j B_j^T +
    beta_j v_{j+1} e_j^T, a power step on a vector V_j c with c_j = 0 is B_j^T B_j c and
    s_k = ||W v_k|| a norm of j-vectors: the first j - 1 power steps cost no product. They are
    the same steps and the same stopping rule as `power_iteration`, evaluated exactly on the
    basis (values agree to float rounding, ~1e-7 relative in float32); the steps after them run
    as in `power_iteration`. Falls back to the two separate calls where nothing is shared (small
    matrices solved exactly, a zero start product).
    """
    a = _require_matrix(w)
    if check_finite and not is_finite_tensor(a):
        raise ValueError("non-finite entries: no spectral norm (check is_finite_tensor first)")
    if method not in ("auto", "lanczos", "exact"):
        raise ValueError(f"method must be one of auto, lanczos, exact; got {method!r}")
    m, n = a.shape
    if method == "exact" or (method == "auto" and min(m, n) <= EXACT_MAX_DIM):
        return (estimate_spectral_norm(a, rtol=rtol, max_iter=max_iter, method=method, check_finite=False),
                power_iteration(a, tol=tol, max_iter=power_max_iter))
    wide = m < n
    generator = torch.Generator(device=a.device).manual_seed(0)
    v0 = _cold_vector(n, a, None)                     # power_iteration's cold start
    if wide:  # the estimator starts in the smaller (left) space, from the power iteration's u_1
        p0 = a @ v0
        s0 = float(torch.linalg.vector_norm(p0))
        if not (s0 > 0 and math.isfinite(s0)):
            return (estimate_spectral_norm(a, rtol=rtol, max_iter=max_iter, method=method, check_finite=False),
                    power_iteration(a, tol=tol, max_iter=power_max_iter))
        op, start = a.T.unsqueeze(0), (p0 / s0).unsqueeze(0)
    else:     # the same seeded vector as `estimate_spectral_norm`'s cold start
        op, start = a.unsqueeze(0), _cold_vector(n, a, generator, batch=(1,))
    r = _gkl(op, start, rtol=rtol, max_iter=max_iter, generator=generator)
    j = int(r.iterations[0])
    est = SpectralEstimate(float(r.sigma[0]), float(r.bound[0]), (r.u if wide else r.v)[0], j, "lanczos", False,
                           bool(r.bound[0] <= rtol), (r.u2 if wide else r.v2)[0] if j > 1 else None)
    return est, _power_from_basis(a, r, j, wide, s0 if wide else None, tol, power_max_iter)


def _power_from_basis(a: Tensor, r: _GKLResult, j: int, wide: bool, s0: float | None, tol: float,
                      max_iter: int) -> PowerResult:
    """Cold `power_iteration` whose first j - 1 steps are read off the Golub-Kahan basis of `r`
    (`estimate_with_power_iteration`; coordinates in float64 on the host)."""
    B = np.zeros((j, j))
    B[np.arange(j), np.arange(j)] = r.alpha[0, :j]
    B[np.arange(j - 1), np.arange(1, j)] = r.beta[0, : j - 1]
    V, U = r.V[0, :j], r.U[0, :j]                       # start space, other space
    single = a.dtype == torch.float32

    def rounded(x: float) -> float:  # s_k at the precision of the products it stands for
        return float(np.float32(x)) if single else float(x)

    c = np.zeros(j)
    c[0] = 1.0                                          # tall: v_0 = V e_1; wide: u_1 = V e_1
    s_prev = s0 if wide else rounded(float(np.linalg.norm(B @ c)))
    y = np.zeros(j)
    k, s, converged = 0, s_prev, False
    for k in range(1, min(j - 1, max_iter) + 1):        # c has support k (wide) / k + 1 <= j (tall)
        y = B @ c                                       # tall: W v_{k-1} = U y;  wide: W^T u_k = U y
        z = B.T @ y                                     # (W^T W v_{k-1}) / (W W^T u_k) on V
        zn, yn = float(np.linalg.norm(z)), float(np.linalg.norm(y))
        if not (zn > 0 and yn > 0):
            return power_iteration(a, tol=tol, max_iter=max_iter)  # the same cold start
        c = z / zn
        s = rounded(float(np.linalg.norm(B @ c)) if not wide else zn / yn)
        if abs(s - s_prev) <= tol * s:
            converged = True
            break
        s_prev = s
    if k == 0:                                          # nothing shared (one step, or max_iter 0)
        return power_iteration(a, tol=tol, max_iter=max_iter)  # the same cold start

    def vec(coef: np.ndarray, basis: Tensor) -> Tensor:
        return torch.from_numpy(coef).to(device=a.device, dtype=a.dtype) @ basis

    if wide:  # v_k = W^T u_k / ||.|| = U y / ||y||;  W v_k = V z / ||y||
        v, p = vec(y / yn, U), vec(z / yn, V)
    else:     # v_k = V c;  W v_k = U B c
        v, p = vec(c, V), vec(B @ c, U)
    if converged or k == max_iter:
        return PowerResult(s, v, k, converged, False)
    return _power_steps(a, v, p, s, k, tol, max_iter, False)
