"""The per-checkpoint work as independent tasks, scheduled checkpoint by checkpoint: each
checkpoint's weights tasks (`analyze.pipeline.weights_task`, one per tensor group) and its model
pass (`analyze.pipeline.probe_task`), run on any `analyze.pipeline.runners` runner with identical
results.

Why (checkpoint x group) tasks with explicit vectors rather than one task per group walking every
checkpoint: results arrive checkpoint by checkpoint, so progress and the per-checkpoint cache are
written as the analysis goes (an interrupted report keeps what it finished), a lost or slow worker
costs one small task, and the scheduler balances the model passes between the chain steps.
Parallelism is the same either way (the warm start serialises a group along checkpoints); the price
is re-reading the checkpoint header per task and the previous checkpoint's tensor for the update
ratio (one tensor at a time, plain reads, page-cached).

Identical results: a task's output depends only on its inputs (`analyze.pipeline.weights_task`), so
serial, ``--workers N`` and ``--scheduler`` produce the same bits (tested with a Dask LocalCluster).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analyze.config import AnalysisConfig
from analyze.pipeline.probe_task import ProbeResult, ProbeSpec, ProbeTask, run_probe_task
from analyze.pipeline.runners import TaskRunner, one_thread
from analyze.pipeline.weights_task import TensorResult, WeightsResult, WeightsTask, run_weights_task
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef

__all__ = ["CheckpointPlan", "CheckpointOutcome", "plan_checkpoint", "plan_groups", "run_checkpoints",
           "GROUPS_PER_WORKER"]

GROUPS_PER_WORKER = 2   # tensor groups per worker: the chains keep every worker busy


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


def _selective(ref: CheckpointRef) -> bool:
    """True when the checkpoint's tensors can be read one by one (safetensors only, any layout)."""
    from loaders.tensor_reader import safetensors_locations

    try:
        return safetensors_locations(ref, partial=True) is not None
    except TrainauditError:
        return False


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
        # Tensor groups read safetensors checkpoints (files, HF folders, shards) one tensor at a
        # time; any other kind is read whole by every task, so it gets one group (its model passes
        # still run side by side).
        selective = all(_selective(p.ref) for p in plans if not p.error)
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
    with one_thread():  # the in-process tasks (serial runner); workers set their own
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
