"""GPT-2-shaped safetensors checkpoints for the weight benchmarks.

Two consecutive checkpoints of one layout: the second is the first plus a Gaussian update of
relative Frobenius size ``perturb`` per tensor (one optimizer interval). Names, shapes and
orientation follow Hugging Face ``GPT2Model`` (Conv1D weights are (in, out)).

Matrix spectra (§4):
* "trained": spikes plus bulk, the shape of trained spectra: U diag(s) V^T of rank 64 with
  s_1 = 1, s_2 = r, s_i = r (i-1)^-alpha (1 + 5% noise) <= r, plus Gaussian noise whose
  Marchenko-Pastur edge (0.25) lies below the spikes. r is the sigma_2 / sigma_1 of the tensor
  type (0.90-0.994, as on real checkpoints: attention matrices of all-MiniLM-L6-v2 sit at
  0.98-0.993). U, V orthonormal by QR of 64 columns; rank 64 keeps generation ~10x cheaper
  than full-rank factors.
* "gaussian": N(0, 0.02^2) entries, GPT-2's init: sigma_2 / sigma_1 near 1 (no method converges
  fast on it; reported apart).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "GPT2_SMALL",
    "Layout",
    "SIZES",
    "CheckpointPair",
    "gaussian_matrix",
    "perturbed",
    "tensor_type",
    "trained_matrix",
    "write_pair",
]

RANK = 64           # spikes above the bulk
ALPHA = 0.3         # power-law decay of the spikes below sigma_1
SPEC_NOISE = 0.05   # relative jitter of s_i (i >= 3)
BULK_EDGE = 0.25    # top of the noise bulk, relative to sigma_1 (the smallest spike is ~0.28)
INIT_STD = 0.02     # GPT-2 init; also the Gaussian case


@dataclass(frozen=True, slots=True)
class Layout:
    """A GPT-2 model shape: layers, width, vocabulary, context."""

    n_layer: int
    d: int
    vocab: int
    n_ctx: int

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor in Hugging Face GPT2Model order."""
        d = self.d
        out: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (self.vocab, d)), ("wpe.weight", (self.n_ctx, d))]
        for i in range(self.n_layer):
            h = f"h.{i}."
            out += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                    (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                    (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                    (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                    (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
                    (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,))]
        out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return out

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes())

    @property
    def n_matrices(self) -> int:
        return sum(len(s) == 2 for _, s in self.shapes())

    def label(self) -> str:
        return f"{self.n_layer}L d={self.d} V={self.vocab}"


GPT2_SMALL = Layout(n_layer=12, d=768, vocab=50257, n_ctx=1024)     # 124,439,808 parameters
SIZES = (Layout(2, 192, 512, 256), Layout(5, 384, 2048, 512), GPT2_SMALL)  # ~1M, ~10M, 124M


_TYPES = (("attn.c_attn.weight", "c_attn"), ("attn.c_proj.weight", "attn.c_proj"),
          ("mlp.c_fc.weight", "mlp.c_fc"), ("mlp.c_proj.weight", "mlp.c_proj"))


def tensor_type(name: str) -> str:
    """Short tensor kind for per-type tables: c_attn, attn.c_proj, c_fc, mlp.c_proj, wte, wpe, 1-D."""
    for suffix, kind in _TYPES:
        if name.endswith(suffix):
            return kind
    if name.startswith(("wte", "wpe")):
        return name[:3]
    return "1-D (bias, norm)"


# sigma_2 / sigma_1 per tensor type (first layer, last layer): spread like real checkpoints.
_RATIO = {"c_attn": (0.985, 0.994), "attn.c_proj": (0.97, 0.988), "mlp.c_fc": (0.93, 0.966),
          "mlp.c_proj": (0.96, 0.99), "wte": (0.90, 0.90), "wpe": (0.95, 0.95)}


def _orthonormal(rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(rows, k) with orthonormal columns (QR of a Gaussian; k is small, so this is cheap)."""
    q, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    return q


def trained_matrix(m: int, n: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Spikes plus bulk: U diag(s) V^T + Gaussian noise (module docstring).

    s_1 = 1, s_2 = ratio, s_i = ratio (i-1)^-ALPHA (1 + noise) <= ratio for 3 <= i <= RANK; the
    noise has its Marchenko-Pastur edge at BULK_EDGE, below every spike.
    """
    r = min(RANK, m, n)
    i = torch.arange(2, r, dtype=torch.float32)
    tail = ratio * i ** -ALPHA * (1 + SPEC_NOISE * torch.randn(r - 2, generator=g))
    s = torch.cat([torch.tensor([1.0, ratio]), tail.clamp(0.0, ratio)])[:r]
    u, v = _orthonormal(m, r, g), _orthonormal(n, r, g)
    noise = torch.randn(m, n, generator=g) * (BULK_EDGE / (math.sqrt(m) + math.sqrt(n)))
    return torch.addmm(noise, u * s, v.T)


def gaussian_matrix(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """N(0, INIT_STD^2) entries: sigma_2 / sigma_1 near 1."""
    return torch.randn(m, n, generator=g) * INIT_STD


def perturbed(w: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    """w + D, D Gaussian with ||D||_F = rel ||w||_F (the update between two checkpoints)."""
    d = torch.randn(w.shape, generator=g)
    return w + d * (rel * torch.linalg.vector_norm(w) / torch.linalg.vector_norm(d))


def _tensor(name: str, shape: tuple[int, ...], layout: Layout, kind: str, g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        base = torch.ones(shape) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
            or name == "ln_f.weight" else torch.zeros(shape)
        return base + INIT_STD * torch.randn(shape, generator=g)
    if kind == "gaussian":
        return gaussian_matrix(*shape, g)
    lo, hi = _RATIO[tensor_type(name)]
    layer = int(name.split(".")[1]) if name.startswith("h.") else 0
    ratio = lo + (hi - lo) * layer / max(1, layout.n_layer - 1)
    return trained_matrix(*shape, ratio, g)


@dataclass(frozen=True, slots=True)
class CheckpointPair:
    """Two consecutive checkpoints written by `write_pair`."""

    old: Path
    new: Path
    layout: Layout
    kind: str
    perturb: float
    seconds: float       # generation + writing, both files
    file_bytes: int      # size of one file


def write_pair(folder: str | Path, layout: Layout = GPT2_SMALL, *, kind: str = "trained",
               perturb: float = 1e-2, seed: int = 0) -> CheckpointPair:
    """Write ``{kind}_{n}_step_1.safetensors`` and ``..._step_2`` (float32) into ``folder``."""
    if kind not in ("trained", "gaussian"):
        raise ValueError(f"kind must be trained or gaussian, got {kind!r}")
    t0 = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    old = {name: _tensor(name, shape, layout, kind, g).contiguous() for name, shape in layout.shapes()}
    stem = f"{kind}_{layout.n_params}"
    p_old, p_new = folder / f"{stem}_step_1.safetensors", folder / f"{stem}_step_2.safetensors"
    save_file(old, str(p_old), metadata={"step": "1"})
    new = {}
    for name in list(old):
        new[name] = perturbed(old.pop(name), perturb, g).contiguous()
    save_file(new, str(p_new), metadata={"step": "2"})
    return CheckpointPair(p_old, p_new, layout, kind, perturb, time.perf_counter() - t0, p_new.stat().st_size)
