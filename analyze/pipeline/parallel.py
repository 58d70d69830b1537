"""The per-checkpoint work as independent tasks, run in process, on a local process pool or on a
Dask cluster, with results identical in all three (issue 7, "Scale out").

Two kinds of task:

- ``WeightsTask``: one tensor group at one checkpoint. Both spectral estimators warm-started from
  the vectors the same group produced at the previous checkpoint (passed in explicitly, a few KB),
  exact SVD beside them, stable rank and the update ratio to the previous checkpoint (§4, §11,
  §12). The task of checkpoint j needs the vectors of checkpoint j-1, so each group is a chain
  along checkpoints; the chains of different groups, and all model passes, run side by side.
- ``ProbeTask``: the model pass of one checkpoint (forward hooks + one backward pass,
  `analyze.pipeline.probe`); independent of every other task.

Why (checkpoint x group) tasks with explicit vectors rather than one task per group walking every
checkpoint: results arrive checkpoint by checkpoint, so progress and the per-checkpoint cache are
written as the analysis goes (an interrupted report keeps what it finished), a lost or slow worker
costs one small task, and the scheduler balances the model passes between the chain steps.
Parallelism is the same either way (the warm start serialises a group along checkpoints); the price
is re-reading the checkpoint header per task and the previous checkpoint's tensor for the update
ratio (one tensor at a time, plain reads, page-cached).

Identical results: a task's output depends only on its inputs. Cold starts draw from a generator
seeded by (config seed, tensor name), never from a stream shared with other tensors, and every task
runs on one intra-op thread, in this process, in a pool worker or on a Dask worker alike. So
serial, ``--workers N`` and ``--scheduler`` produce the same bits (tested with a Dask LocalCluster).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import multiprocessing
import sys
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from analyze.config import AnalysisConfig, default_workers
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef

__all__ = [
    "default_workers", "make_runner", "TaskRunner", "SerialRunner", "PoolRunner", "DaskRunner",
    "WeightsTask", "WeightsResult", "TensorResult", "ProbeSpec", "ProbeTask", "ProbeResult",
    "run_weights_task", "run_probe_task", "probe_reason", "tensor_seed", "plan_checkpoint", "plan_groups",
    "CheckpointPlan", "CheckpointOutcome", "run_checkpoints", "DASK_HINT",
]

_ROW_BLOCK_ELEMENTS = 1 << 20  # rows of the previous checkpoint read per update-ratio block (~4 MB float32)
GROUPS_PER_WORKER = 2   # tensor groups per worker: the chains keep every worker busy
DASK_HINT = "--scheduler needs dask.distributed: pip install 'trainaudit[dask]'"


def tensor_seed(seed: int, name: str) -> int:
    """Seed of a tensor's cold-start generator: depends on the tensor, not on what ran before."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Every task runs on one intra-op thread, wherever it runs (same bits everywhere)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


# --------------------------------------------------------------------------- reading tensors


class _Buffers:
    """Read buffers recycled across the tensors of a task: a tensor's bytes land in memory this
    process already touched, so a read costs one copy, not a copy plus a page fault (and the
    kernel zeroing a fresh page) every 4 KB. Keeps at most `keep` idle buffers."""

    def __init__(self, keep: int = 3) -> None:
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._keep = keep

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
            if fits:
                return self._idle.pop(min(fits, key=lambda i: self._idle[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        with self._lock:
            self._idle.append(buf)
            self._idle.sort(key=torch.Tensor.numel, reverse=True)
            del self._idle[self._keep:]


class _Reader:
    """Tensors of one checkpoint by name, restricted to `names`, closed with ``close()``.

    A plain ``.safetensors`` file is read one tensor at a time, as ``loaders.checkpoints`` reads
    it: header validated first, then a plain read of that tensor's bytes (no mmap, so the resident
    set stays near one tensor). Other kinds (torch pickles, HF folders, shards) go through one
    pass of ``loaders.checkpoints.iter_tensors``, keeping the named tensors.
    """

    def __init__(self, ref: CheckpointRef, names: Sequence[str]) -> None:
        self.ref = ref
        self.path = Path(ref.path)
        self.names = set(names)
        self._file: Any = None
        self._kept: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors" and self.path.is_file():
            import struct

            from loaders.checkpoints import check_safetensors_header, checkpoint_info
            from loaders.safeio import open_regular

            self._prefix = checkpoint_info(ref).stripped_prefix
            self._header = check_safetensors_header(self.path)
            self._file = open_regular(self.path)
            (n,) = struct.unpack("<Q", self._file.read(8))
            self._base = 8 + n

    def get(self, name: str, buffers: _Buffers | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(tensor, the recycled buffer it lives in or None); (None, None) when absent."""
        if self._file is not None:
            from loaders.checkpoints import read_safetensors_tensor

            entry = self._header.get(self._prefix + name)
            if entry is None:
                return None, None
            begin, end = entry["data_offsets"]
            buf = buffers.take(end - begin) if buffers is not None else None
            return read_safetensors_tensor(self._file, self._base, self.path, name, entry, out=buf), buf
        return self._all().get(name), None

    def _all(self) -> dict[str, torch.Tensor]:
        if self._kept is None:
            from loaders.checkpoints import iter_tensors

            # partial: a missing or unreadable shard was already reported when the checkpoint was
            # planned (checkpoint_info); the tensors of the other shards are analysed (row B13)
            self._kept = {n: t for n, t in iter_tensors(self.ref, warnings=DataWarnings(), partial=True)
                          if n in self.names}
        return self._kept

    def row_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]] | None:
        """(first row, rows) blocks of ~4 MB covering tensor `name`, or None when it is absent or its
        shape is not `shape`. From a safetensors file each block is its own plain read, so the
        update ratio never holds a second copy of a large tensor (issue 7, target 5)."""
        if self._file is None:
            t = self._all().get(name)
            return None if t is None or tuple(t.shape) != shape else iter([(0, t)])
        entry = self._header.get(self._prefix + name)
        if entry is None or tuple(entry["shape"]) != shape or not shape:
            return None
        from loaders.checkpoints import read_safetensors_tensor

        row_elems = max(1, math.prod(shape[1:]))
        step = max(1, _ROW_BLOCK_ELEMENTS // row_elems)
        begin, end = entry["data_offsets"]
        buf = torch.empty(min(end - begin, step * ((end - begin) // shape[0] if shape[0] else 0)), dtype=torch.uint8)
        # One buffer for every block: each block is consumed before the next read overwrites it.
        return ((i, read_safetensors_tensor(self._file, self._base, self.path, name, entry,
                                            rows=(i, min(i + step, shape[0])), out=buf))
                for i in range(0, shape[0], step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._kept = None


# --------------------------------------------------------------------------- weights tasks


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


def _update_row(name: str, t: torch.Tensor, ref: CheckpointRef, prev: _Reader) -> dict[str, Any] | None:
    """The update ratio of `t` against the same tensor at the previous checkpoint (§11, §12),
    reading the old tensor in row blocks; None when it is absent there or changed shape."""
    from analyze.metrics.gradients import ratio_from_sums, update_sums

    blocks = prev.row_blocks(name, tuple(t.shape))
    if blocks is None:
        return None
    diff_sq = old_sq = 0.0
    for i, old in blocks:
        d, o = update_sums(t[i: i + old.shape[0]], old)
        diff_sq, old_sq = diff_sq + d, old_sq + o
    r = ratio_from_sums(diff_sq, old_sq)
    elapsed = ref.step - prev.ref.step
    return {"step": ref.step, "prev_step": prev.ref.step, "tensor": name, "update_ratio": r,
            "update_ratio_per_step": r / elapsed if elapsed > 0 else math.nan}


def _tensor_rows(name: str, t: torch.Tensor, ref: CheckpointRef, prev: _Reader | None, task: WeightsTask,
                 vectors: dict[str, torch.Tensor]) -> TensorResult:
    from analyze.metrics.gradients import sum_of_squares
    from analyze.metrics.spectral import (as_matrix, estimate_spectral_norm, exact_top_singular_values,
                                  matrix_skip_reason, power_iteration, sigma_ratio)

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
                                 v0_second=_fit(task.vectors.get(f"est2:{name}"), n))
    vectors[f"est:{name}"] = est.v.detach().cpu().clone()  # clones: v and v2 are views of one buffer
    if est.v2 is not None:
        vectors[f"est2:{name}"] = est.v2.detach().cpu().clone()
    pw = None
    if cfg.power_iteration:
        pw = power_iteration(m, _fit(task.vectors.get(f"pow:{name}"), n), tol=cfg.power_tol,
                             max_iter=cfg.power_max_iter, generator=gen)
        vectors[f"pow:{name}"] = pw.v.detach().cpu()
    ex = exact_top_singular_values(m) if task.exact else None
    s1 = ex.sigma1 if ex is not None else est.sigma
    row.update({
        "method": est.method, "sigma_est": est.sigma, "err_bound": est.err_bound,
        "sigma_power": pw.sigma if pw else math.nan,
        "sigma_exact": ex.sigma1 if ex else math.nan, "sigma2_exact": ex.sigma2 if ex else math.nan,
        "rel_err": abs(est.sigma - ex.sigma1) / ex.sigma1 if ex and ex.sigma1 > 0 else math.nan,
        "power_rel_err": abs(pw.sigma - ex.sigma1) / ex.sigma1 if pw and ex and ex.sigma1 > 0 else math.nan,
        "iterations": est.iterations, "power_iterations": pw.iterations if pw else 0, "warm_start": est.warm_start,
        "power_warm_start": pw.warm_start if pw else False, "power_converged": pw.converged if pw else False,
        "sigma_ratio": sigma_ratio(ex) if ex else math.nan, "stable_rank": fro_sq / (s1 * s1) if s1 > 0 else math.nan,
        "frobenius": math.sqrt(fro_sq), "finite": True})
    return TensorResult(name, row, _update_row(name, t, ref, prev) if prev is not None else None)


def run_weights_task(task: WeightsTask) -> WeightsResult:
    """Spectral rows (both estimators + exact) and update ratios of one group at one checkpoint.

    The next tensor is read in a background thread while this one is analysed
    (`loaders.safeio.prefetched`): the read overlaps the compute instead of adding to it.
    """
    from loaders.safeio import prefetched

    with _one_thread():
        vectors: dict[str, torch.Tensor] = {}
        out: list[TensorResult] = []
        readers: list[_Reader] = []
        stream = None
        try:
            cur = _Reader(task.ref, task.names)
            readers.append(cur)
            prev = _Reader(task.prev, task.names) if task.prev is not None else None
            if prev is not None:
                readers.append(prev)
            buffers = _Buffers()
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


# --------------------------------------------------------------------------- model passes


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """Everything a worker needs to rebuild the model and the evaluation set (not the weights)."""

    model_name: str | None
    model_config_json: str               # the run's model config, JSON (kept hashable and plain)
    model_factory: str | None            # explicit --model module:function
    eval_set_path: str | None
    class_names: tuple[str, ...]
    dead_eps: float
    eval_batch_size: int
    grad_batch_size: int
    max_eval_examples: int | None

    @property
    def token(self) -> str:
        return hashlib.sha256(repr(tuple(getattr(self, f) for f in self.__slots__)).encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class ProbeTask:
    ref: CheckpointRef
    spec: ProbeSpec


@dataclass(frozen=True, slots=True)
class ProbeResult:
    step: int
    rows: dict[str, list[dict[str, Any]]]
    notes: tuple[str, ...] = ()
    error: str = ""                      # the checkpoint could not be read


class _ProbePool:
    """Model probes built in this process, by spec; one per concurrently running task."""

    def __init__(self, keep: int = 4) -> None:
        self.lock = threading.Lock()
        self.free: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()
        self.reasons: dict[str, str] = {}
        self.keep = keep

    def _build(self, spec: ProbeSpec) -> tuple[Any, str]:
        from analyze.pipeline.probe import ModelProbe, build_run_model, load_eval_set

        model, why = build_run_model(spec.model_name, json.loads(spec.model_config_json), spec.model_factory)
        if model is None:
            return None, why
        if spec.eval_set_path is None:
            return None, "the run stores no evaluation set to run the model on (RunLogger.save_eval_set writes one)"
        data = load_eval_set(Path(spec.eval_set_path), spec.max_eval_examples)
        names = list(spec.class_names)
        if data.class_ids is not None and names and int(data.class_ids.max()) >= len(names):
            data = type(data)(data.input_ids, data.targets, data.target_mask, data.attention_mask, None)
        probe = ModelProbe(model, data, names, eps=spec.dead_eps, batch_size=spec.eval_batch_size,
                           grad_batch_size=spec.grad_batch_size)
        if len(probe.missing_hooks()) == 3:
            return None, ("the model has none of the hook points the activation panels read "
                          "(blocks.<i>, mlp.act, attn.probs)")
        return probe, ""

    def acquire(self, spec: ProbeSpec) -> tuple[Any, str]:
        key = spec.token
        with self.lock:
            if key in self.reasons:
                return None, self.reasons[key]
            stack = self.free.get(key)
            if stack:
                return stack.pop(), ""
        probe, why = self._build(spec)
        if probe is None:
            with self.lock:
                self.reasons[key] = why
        return probe, why

    def release(self, spec: ProbeSpec, probe: Any) -> None:
        with self.lock:
            self.free.setdefault(spec.token, []).append(probe)
            self.free.move_to_end(spec.token)
            while len(self.free) > self.keep:
                self.free.popitem(last=False)


_PROBES = _ProbePool()


def probe_reason(spec: ProbeSpec) -> str:
    """Why the model panels cannot run for this spec ("" when they can). Builds one probe here
    (kept for the in-process tasks); a bad --model or eval set raises TrainauditError."""
    with _one_thread():
        probe, why = _PROBES.acquire(spec)
    if probe is not None:
        _PROBES.release(spec, probe)
    return why


def run_probe_task(task: ProbeTask) -> ProbeResult:
    """The model pass of one checkpoint: load its weights into a (per-process) model and run the
    evaluation set with hooks and one backward pass."""
    from loaders.checkpoints import iter_tensors

    step = task.ref.step
    with _one_thread():
        try:
            state = dict(iter_tensors(task.ref, warnings=DataWarnings()))
        except TrainauditError as exc:
            return ProbeResult(step, {}, (), str(exc))
        probe, why = _PROBES.acquire(task.spec)
        if probe is None:
            return ProbeResult(step, {}, (f"step {step}: model panels skipped: {why}",))
        try:
            problems = probe.load(state)
            del state
            if problems:
                return ProbeResult(step, {}, (f"step {step}: model panels skipped: {problems[0]}",))
            try:
                return ProbeResult(step, probe.run(step))
            except (RuntimeError, ValueError, TrainauditError) as exc:
                return ProbeResult(step, {}, (f"step {step}: model pass failed: {' '.join(str(exc).split())[:300]}",))
        finally:
            _PROBES.release(task.spec, probe)


# --------------------------------------------------------------------------- runners


class TaskRunner(Protocol):
    """Runs tasks (a top-level function and one picklable argument) and hands back results
    as they finish."""

    workers: int

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None: ...

    def next_done(self) -> tuple[Hashable, Any]: ...

    def close(self) -> None: ...


class SerialRunner:
    """In this process, in submission order."""

    workers = 1

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[Hashable, Callable[[Any], Any], Any]] = collections.deque()

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.queue.append((tag, fn, arg))

    def next_done(self) -> tuple[Hashable, Any]:
        tag, fn, arg = self.queue.popleft()
        return tag, fn(arg)

    def close(self) -> None:
        self.queue.clear()


def _init_worker() -> None:
    torch.set_num_threads(1)


class PoolRunner:
    """A local process pool; each worker runs one task at a time on one thread (forked on Linux,
    spawned elsewhere)."""

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # fork: workers start in milliseconds with torch already imported, and need no importable
        # __main__ (a notebook, stdin); torch's DataLoader does the same. Elsewhere: spawn.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker)
        self.futures: dict[Any, Hashable] = {}
        self.done: collections.deque[Any] = collections.deque()

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.futures[self.pool.submit(fn, arg)] = tag

    def next_done(self) -> tuple[Hashable, Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        if not self.done:
            finished, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            self.done.extend(finished)
        fut = self.done.popleft()
        return self.futures.pop(fut), fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskRunner:
    """Tasks on a Dask distributed cluster. Workers must see the run's files at the same paths and
    be able to import trainaudit (and a --model factory, when one is given).

    Speed: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    dynamic mmap threshold, so every large torch allocation becomes a fresh mmap and a model pass
    runs ~1.6x slower; the worker's 10 ms stack profiler also takes the GIL from the task thread
    (benchmarks/scale.py). Start the workers with the dask config
    ``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_: null`` and
    ``distributed.worker.profile.enabled: false``.
    """

    def __init__(self, address: str, timeout: float = 20.0) -> None:
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise TrainauditError(None, DASK_HINT) from None
        try:
            self.client = Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise TrainauditError(None, f"cannot reach the Dask scheduler at {address!r} "
                                        f"({type(exc).__name__}: {exc})") from None
        self.workers = max(1, sum(self.client.nthreads().values()))
        self.pending = as_completed([], with_results=False)
        self.tags: dict[str, Hashable] = {}
        self.prefix = f"trainaudit-{uuid.uuid4().hex[:8]}"
        self.count = 0

    def submit(self, tag: Hashable, fn: Callable[[Any], Any], arg: Any) -> None:
        self.count += 1
        fut = self.client.submit(fn, arg, pure=False, key=f"{self.prefix}-{self.count}")
        self.tags[fut.key] = tag
        self.pending.add(fut)

    def next_done(self) -> tuple[Hashable, Any]:
        fut = next(self.pending)
        result = fut.result()
        tag = self.tags.pop(fut.key)
        fut.release()
        return tag, result

    def close(self) -> None:
        self.client.close()


def make_runner(workers: int, scheduler: str | None = None) -> TaskRunner:
    """Dask when a scheduler address is given, else a process pool for workers > 1, else serial."""
    if scheduler:
        return DaskRunner(scheduler)
    if workers > 1:
        return PoolRunner(workers)
    return SerialRunner()


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True, slots=True)
class CheckpointPlan:
    """A checkpoint to analyse: its tensors in storage order (from the header), the warnings that
    reading the header raised, and `error` when it cannot be read at all."""

    ref: CheckpointRef
    names: tuple[str, ...]
    sizes: tuple[int, ...]               # cost weight per tensor (numel x min dim for matrices)
    warnings: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class CheckpointOutcome:
    """Everything one checkpoint contributed, assembled from its tasks in storage order."""

    ref: CheckpointRef
    rows: dict[str, list[dict[str, Any]]]
    vectors: dict[str, torch.Tensor]
    notes: list[str]
    warnings: list[str]
    error: str = ""                      # the checkpoint was skipped (unreadable)


def plan_checkpoint(ref: CheckpointRef) -> CheckpointPlan:
    """Names and sizes from the header (no tensor data read); a checkpoint that cannot be
    described is planned as failed."""
    from loaders.checkpoints import checkpoint_info

    w = DataWarnings()
    try:
        info = checkpoint_info(ref, warnings=w)
    except TrainauditError as exc:
        return CheckpointPlan(ref, (), (), tuple(w), str(exc))
    sizes = []
    for t in info.tensors:
        numel = math.prod(t.shape) if t.shape else 1
        sizes.append(numel * (min(t.shape[0], numel // max(1, t.shape[0])) if len(t.shape) >= 2 else 1))
    return CheckpointPlan(ref, tuple(t.name for t in info.tensors), tuple(sizes), tuple(w))


def plan_groups(plans: Sequence[CheckpointPlan], n_groups: int) -> dict[str, int]:
    """Tensor name -> group, balancing the summed cost (largest first onto the lightest group).
    Grouping never changes a result, only how the work is split."""
    cost: dict[str, int] = {}
    for p in plans:
        for name, size in zip(p.names, p.sizes):
            cost[name] = max(cost.get(name, 0), size)
    n_groups = max(1, min(n_groups, len(cost)))
    load = [0] * n_groups
    group: dict[str, int] = {}
    for name in sorted(cost, key=lambda n: (-cost[n], n)):
        g = min(range(n_groups), key=lambda i: (load[i], i))
        group[name] = g
        load[g] += cost[name] + 1
    return group


class _Scheduler:
    """Submits the tasks of `plans` and assembles their results, checkpoint by checkpoint.

    State per tensor group g: ``results[g][i] = (pred, WeightsResult)`` for plan index i, where pred
    is the plan index whose vectors (and tensors, for the update ratio) the task used. A result is
    valid while pred is still i's predecessor in ``order`` (the readable checkpoints); when a
    checkpoint turns out unreadable it leaves ``order`` and the chains after it are recomputed.
    """

    def __init__(self, plans: Sequence[CheckpointPlan], cfg: AnalysisConfig, exact: bool,
                 init_vectors: Mapping[str, torch.Tensor], init_prev: CheckpointRef | None,
                 probe_spec: ProbeSpec | None, runner: TaskRunner) -> None:
        self.plans, self.cfg, self.exact, self.runner = plans, cfg, exact, runner
        self.init_vectors, self.init_prev, self.probe_spec = dict(init_vectors), init_prev, probe_spec
        # Tensor groups read plain safetensors files one tensor at a time; any other kind is read
        # whole by every task, so it gets one group (its model passes still run side by side).
        selective = all(Path(p.ref.path).suffix == ".safetensors" and Path(p.ref.path).is_file() for p in plans)
        n_groups = runner.workers * GROUPS_PER_WORKER if runner.workers > 1 and selective else 1
        group_of = plan_groups([p for p in plans if not p.error], n_groups)
        self.groups = sorted(set(group_of.values()))
        self.names_in = [{g: tuple(nm for nm in p.names if group_of.get(nm) == g) for g in self.groups}
                         for p in plans]
        self.order = [i for i, p in enumerate(plans) if not p.error]
        self.failed = {i: p.error for i, p in enumerate(plans) if p.error}
        self.results: list[dict[int, tuple[int | None, WeightsResult]]] = [{} for _ in self.groups]
        self.inflight: list[bool] = [False for _ in self.groups]
        self.probes: dict[int, ProbeResult] = {}
        self.probes_sent: set[int] = set()
        self.window = 2 * runner.workers + 1  # model passes queued ahead of the first unfinished checkpoint
        self.outstanding = 0
        self.emitted = 0

    def _submit(self, tag: tuple, fn: Callable[[Any], Any], arg: Any) -> None:
        self.runner.submit(tag, fn, arg)
        self.outstanding += 1

    def _pred(self, i: int) -> int | None:
        pos = self.order.index(i)
        return self.order[pos - 1] if pos else None

    def send_probes(self) -> None:
        if self.probe_spec is None:
            return
        for i in self.order:
            if i >= self.emitted + self.window:
                break
            if i not in self.probes_sent:
                self.probes_sent.add(i)
                self._submit(("probe", i), run_probe_task, ProbeTask(self.plans[i].ref, self.probe_spec))

    def schedule(self) -> None:
        """Per idle group: the first checkpoint without a valid result gets its task."""
        for g in self.groups:
            if self.inflight[g]:
                continue
            res = self.results[g]
            pred: int | None = None
            for pos, i in enumerate(self.order):
                have = res.get(i)
                if have is not None and have[0] == pred:
                    pred = i
                    continue
                for j in self.order[pos:]:  # everything after a broken link is stale
                    res.pop(j, None)
                names = self.names_in[i][g]
                if not names:  # no tensor of this group here: the next checkpoint starts cold, as serially
                    res[i] = (pred, WeightsResult(self.plans[i].ref.step, g, (), {}))
                    pred = i
                    continue
                vec = self.init_vectors if pred is None else res[pred][1].vectors
                keep = set(names)
                task = WeightsTask(self.plans[i].ref, self.init_prev if pred is None else self.plans[pred].ref,
                                   names, {k: v for k, v in vec.items() if k.partition(":")[2] in keep},
                                   self.cfg, self.exact, g)
                self._submit(("weights", i, g, pred), run_weights_task, task)
                self.inflight[g] = True
                break

    def receive(self, tag: tuple, result: Any) -> None:
        self.outstanding -= 1
        if tag[0] == "probe":
            i = tag[1]
            if result.error:
                self._fail(i, result.error)
            else:
                self.probes[i] = result
            return
        _, i, g, pred = tag
        self.inflight[g] = False
        if result.error:
            self._fail(i, result.error)
        elif i not in self.failed:
            self.results[g][i] = (pred, result)

    def _fail(self, i: int, error: str) -> None:
        if i not in self.failed:
            self.failed[i] = error
            self.order.remove(i)

    def complete(self, i: int) -> bool:
        if i in self.failed:
            return True
        pred = self._pred(i)
        for g in self.groups:
            have = self.results[g].get(i)
            if have is None or have[0] != pred:
                return False
        return self.probe_spec is None or i in self.probes

    def outcome(self, i: int) -> CheckpointOutcome:
        p = self.plans[i]
        if i in self.failed:
            err = self.failed[i]
            warns = [w for w in p.warnings if w not in err]
            warns.append(f"{err} (checkpoint at step {p.ref.step} skipped; the others are analysed)")
            return CheckpointOutcome(p.ref, {}, {}, [], warns, err)
        by_name: dict[str, TensorResult] = {}
        vectors: dict[str, torch.Tensor] = {}
        for g in self.groups:
            res = self.results[g][i][1]
            by_name.update((t.name, t) for t in res.tensors)
            vectors.update(res.vectors)
        spectral, updates, skipped = [], [], []
        for name in p.names:  # storage order, whatever the grouping
            t = by_name[name]
            if t.spectral is not None:
                spectral.append(t.spectral)
            if t.update is not None:
                updates.append(t.update)
            if t.skip:
                skipped.append((name, t.skip))
        notes = []
        if skipped:
            shown = ", ".join(f"{nm} ({why})" for nm, why in skipped[:6])
            more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
            notes.append(f"{len(skipped)} tensor(s) have no spectral norm and were skipped: {shown}{more}")
        rows: dict[str, list[dict[str, Any]]] = {"spectral": spectral, "update_ratio": updates}
        if self.probe_spec is not None:
            rows.update(self.probes[i].rows)
            notes.extend(self.probes[i].notes)
        return CheckpointOutcome(p.ref, rows, vectors, notes, list(p.warnings))

    def forget_before(self, i: int) -> None:
        """Drop the vectors of checkpoints before i (emitted; no restart can go back past i)."""
        for res in self.results:
            for j in [j for j in res if j < i]:
                pred, old = res[j]
                if old.vectors:
                    res[j] = (pred, WeightsResult(old.step, old.group, (), {}))


def run_checkpoints(plans: Sequence[CheckpointPlan], *, cfg: AnalysisConfig, exact: bool,
                    init_vectors: Mapping[str, torch.Tensor], init_prev: CheckpointRef | None,
                    probe_spec: ProbeSpec | None, runner: TaskRunner,
                    on_done: Callable[[CheckpointOutcome], None]) -> None:
    """Run every checkpoint's tasks on `runner` and call `on_done` once per checkpoint, in step
    order, as soon as it and every checkpoint before it are complete.

    `init_vectors` / `init_prev`: the warm starts and the checkpoint before the first plan (from
    the cache), or empty / None. A checkpoint that cannot be read is reported (its outcome has
    `error`) and skipped like in a serial walk: chains that went through it are recomputed from
    the checkpoint before it, so every result is what a serial pass over the readable ones gives.
    """
    s = _Scheduler(plans, cfg, exact, init_vectors, init_prev, probe_spec, runner)
    n = len(plans)
    with _one_thread():  # the in-process tasks (serial runner); workers set their own
        s.schedule()
        s.send_probes()
        while s.emitted < n:
            while s.emitted < n and s.complete(s.emitted):
                on_done(s.outcome(s.emitted))
                if s.emitted not in s.failed:
                    s.forget_before(s.emitted)
                s.emitted += 1
            if s.emitted >= n:
                break
            s.send_probes()
            if s.outstanding == 0:  # a bug, not a data problem: nothing runs and nothing is complete
                raise RuntimeError(f"checkpoint scheduler stalled at plan index {s.emitted}")
            s.receive(*s.runner.next_done())
            s.schedule()
