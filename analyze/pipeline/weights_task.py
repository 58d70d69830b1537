"""The weights task: one tensor group at one checkpoint (§4, §11, §12).

Both spectral estimators warm-started from the vectors the same group produced at the previous
checkpoint (passed in explicitly, a few KB), exact SVD beside them, stable rank and the update
ratio to the previous checkpoint. The default estimator runs as Golub-Kahan-Lanczos on every
matrix, small ones included, so each row of the §4 validation shows its real error against
exact; exact is always computed for matrices with min(m, n) <= EXACT_MAX_DIM (one small
eigensolve), and for the rest when exact SVD is on. The task of checkpoint j needs the vectors of checkpoint j-1, so
each group is a chain along checkpoints (`analyze.pipeline.scheduler` runs the chains).

Identical results wherever it runs: cold starts draw from a generator seeded by (config seed,
tensor name), never from a stream shared with other tensors, and the task runs on one intra-op
thread. Speed: the next tensor is read while this one is analysed, into recycled buffers
(`loaders.tensor_reader`), and the previous checkpoint's tensor is read in row blocks.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from analyze.config import AnalysisConfig
from analyze.metrics.gradients import sum_of_squares, update_ratio_of_blocks, update_ratio_per_step
from analyze.metrics.spectral import (EXACT_MAX_DIM, as_matrix, estimate_spectral_norm, exact_top_singular_values,
                                      matrix_skip_reason, power_iteration, spectral_validation, stable_rank)
from analyze.pipeline.runners import one_thread
from loaders.errors import TrainauditError
from loaders.run import CheckpointRef
from loaders.tensor_reader import ReadBuffers, TensorReader

__all__ = ["WeightsTask", "WeightsResult", "TensorResult", "run_weights_task", "tensor_seed"]


def tensor_seed(seed: int, name: str) -> int:
    """Seed of a tensor's cold-start generator: depends on the tensor, not on what ran before."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True, slots=True)
class WeightsTask:
    """One tensor group at one checkpoint; `vectors` are the group's warm starts from `prev`."""

    ref: CheckpointRef
    prev: CheckpointRef | None           # previous analysed checkpoint (update ratio), None for the first
    names: tuple[str, ...]               # the group's tensors in this checkpoint, in storage order
    vectors: dict[str, torch.Tensor]     # "est:<name>" / "pow:<name>" -> right singular vector estimate
    cfg: AnalysisConfig
    exact: bool
    group: int


@dataclass(frozen=True, slots=True)
class TensorResult:
    """One tensor's rows; `skip` says why it has no spectral norm ("" when it has one)."""

    name: str
    spectral: dict[str, Any] | None
    update: dict[str, Any] | None
    skip: str = ""


@dataclass(frozen=True, slots=True)
class WeightsResult:
    step: int
    group: int
    tensors: tuple[TensorResult, ...]
    vectors: dict[str, torch.Tensor]     # warm starts for the next checkpoint (this checkpoint's only)
    error: str = ""                      # the checkpoint could not be read (TrainauditError text)


def _fit(v: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return v if v is not None and v.numel() == n else None


def _update_row(name: str, t: torch.Tensor, ref: CheckpointRef, prev: TensorReader) -> dict[str, Any] | None:
    """The update ratio of `t` against the same tensor at the previous checkpoint (§11, §12),
    reading the old tensor in row blocks; None when it is absent there or changed shape."""
    blocks = prev.row_blocks(name, tuple(t.shape))
    if blocks is None:
        return None
    r = update_ratio_of_blocks((t[i: i + old.shape[0]], old) for i, old in blocks)
    return {"step": ref.step, "prev_step": prev.ref.step, "tensor": name, "update_ratio": r,
            "update_ratio_per_step": update_ratio_per_step(r, ref.step - prev.ref.step)}


def _tensor_rows(name: str, t: torch.Tensor, ref: CheckpointRef, prev: TensorReader | None, task: WeightsTask,
                 vectors: dict[str, torch.Tensor]) -> TensorResult:
    cfg = task.cfg
    m = as_matrix(t)
    if m is None:
        return TensorResult(name, None, None, matrix_skip_reason(t) or "no spectral norm")
    row: dict[str, Any] = {"step": ref.step, "tensor": name, "shape": "x".join(map(str, t.shape))}
    fro_sq = sum_of_squares(m)  # one pass: ||W||_F for the stable rank (§12), and finite iff every entry is
    if not math.isfinite(fro_sq):
        row.update({"method": "", "finite": False})
        return TensorResult(name, row, None)
    n = m.shape[1]
    gen = torch.Generator().manual_seed(tensor_seed(cfg.seed, name))
    # warm start from the best vector of span{previous v, previous second Ritz vector} (follows a
    # swap of sigma_1 and sigma_2; analyze.metrics.spectral.estimate_spectral_norm)
    est = estimate_spectral_norm(m, _fit(task.vectors.get(f"est:{name}"), n), generator=gen, check_finite=False,
                                 v0_second=_fit(task.vectors.get(f"est2:{name}"), n), method="lanczos")
    vectors[f"est:{name}"] = est.v.detach().cpu().clone()  # clones: v and v2 are views of one buffer
    if est.v2 is not None:
        vectors[f"est2:{name}"] = est.v2.detach().cpu().clone()
    pw = None
    if cfg.power_iteration:
        pw = power_iteration(m, _fit(task.vectors.get(f"pow:{name}"), n), tol=cfg.power_tol,
                             max_iter=cfg.power_max_iter, generator=gen)
        vectors[f"pow:{name}"] = pw.v.detach().cpu()
    ex = exact_top_singular_values(m) if task.exact or min(m.shape) <= EXACT_MAX_DIM else None
    row.update(asdict(spectral_validation(est, pw, ex)))
    row.update({"stable_rank": stable_rank(fro_sq, ex.sigma1 if ex is not None else est.sigma),
                "frobenius": math.sqrt(fro_sq), "finite": True})
    return TensorResult(name, row, _update_row(name, t, ref, prev) if prev is not None else None)


def run_weights_task(task: WeightsTask) -> WeightsResult:
    """Spectral rows (both estimators + exact) and update ratios of one group at one checkpoint.

    The next tensor is read in a background thread while this one is analysed
    (`loaders.safeio.prefetched`): the read overlaps the compute instead of adding to it.
    """
    from loaders.safeio import prefetched

    with one_thread():
        vectors: dict[str, torch.Tensor] = {}
        out: list[TensorResult] = []
        readers: list[TensorReader] = []
        stream = None
        try:
            cur = TensorReader(task.ref, task.names)
            readers.append(cur)
            prev = TensorReader(task.prev, task.names) if task.prev is not None else None
            if prev is not None:
                readers.append(prev)
            buffers = ReadBuffers()
            stream = prefetched((name, *cur.get(name, buffers)) for name in task.names)
            for name, t, buf in stream:
                if t is None:
                    raise TrainauditError(task.ref.path, f"tensor {name!r} disappeared while being read")
                out.append(_tensor_rows(name, t, task.ref, prev, task, vectors))
                del t  # nothing kept from a tensor aliases its buffer (rows hold floats, vectors are new)
                buffers.give(buf)
        except TrainauditError as exc:
            return WeightsResult(task.ref.step, task.group, (), {}, str(exc))
        finally:
            if stream is not None:
                stream.close()  # joins the reader thread before its file is closed
            for r in readers:
                r.close()
    return WeightsResult(task.ref.step, task.group, tuple(out), vectors)
