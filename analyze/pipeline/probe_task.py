"""The probe task: the model pass of one checkpoint (forward hooks + one backward pass,
`analyze.pipeline.probe`), independent of every other task.

A worker rebuilds the model and the evaluation set from a `ProbeSpec` (not the weights) once and
keeps it in `_PROBES`, one probe per concurrently running task; each task loads its checkpoint's
weights into one.
"""
from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyze.pipeline.runners import one_thread
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef

__all__ = ["ProbeSpec", "ProbeTask", "ProbeResult", "probe_reason", "run_probe_task"]


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
    rho_band: tuple[float, float]        # healthy grad-to-weight band (AnalysisConfig.rho_low, rho_high; §11)

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
                           grad_batch_size=spec.grad_batch_size, rho_band=spec.rho_band)
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
    with one_thread():
        probe, why = _PROBES.acquire(spec)
    if probe is not None:
        _PROBES.release(spec, probe)
    return why


def run_probe_task(task: ProbeTask) -> ProbeResult:
    """The model pass of one checkpoint: load its weights into a (per-process) model and run the
    evaluation set with hooks and one backward pass."""
    from loaders.checkpoints import iter_tensors

    step = task.ref.step
    with one_thread():
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
