"""The probe task: the model pass of one checkpoint (forward hooks + one backward pass,
`analyze.pipeline.probe`), independent of every other task.

A worker rebuilds the model and the evaluation set from a `ProbeSpec` (not the weights) once and
keeps it in `_PROBES`, one probe per concurrently running task; each task loads its checkpoint's
weights into one.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analyze.models import ModelSource
from analyze.pipeline.runners import one_thread
from loaders.errors import DataWarnings, TrainauditError
from loaders.run import CheckpointRef

__all__ = ["ProbeSpec", "ProbeTask", "ProbeResult", "probe_reason", "run_probe_task"]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """Everything a worker needs to rebuild the model and the evaluation set (not the weights)."""

    model: ModelSource                   # which model to rebuild (analyze.models.find_model)
    eval_set_path: str | None            # the run's own eval_set.safetensors
    eval_data: str | None                # --eval-data: text, JSONL, val.bin or safetensors (wins over the run's)
    search_dirs: tuple[str, ...]         # where the checkpoint's tokenizer may be besides the model folder
    class_names: tuple[str, ...]
    dead_eps: float
    eval_batch_size: int
    grad_batch_size: int
    max_eval_examples: int | None
    eval_max_sequences: int              # sequences read from --eval-data (AnalysisConfig)
    eval_seq_len: int                    # tokens per sequence cut from --eval-data (AnalysisConfig)
    eval_seed: int                       # sampling seed of --eval-data and of the rho batch
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
        from analyze.models import ModelUnavailable, rebuild, text_encoder
        from analyze.pipeline.probe import ModelProbe
        from loaders.evaldata import EvalLimits, load_eval_data, load_eval_set

        if spec.eval_data is None and spec.eval_set_path is None:  # before building: a 1.1B model costs ~1 min
            return None, ("no evaluation data to run the model on: pass --eval-data (a text file, JSONL, val.bin "
                          "or eval_set.safetensors)")
        try:
            rebuilt = rebuild(spec.model)
        except ModelUnavailable as exc:
            return None, str(exc)
        limits = EvalLimits(max_sequences=spec.eval_max_sequences,
                            seq_len=min(spec.eval_seq_len, rebuilt.context or spec.eval_seq_len),
                            seed=spec.eval_seed)
        if spec.eval_data is not None:
            search = [Path(spec.eval_data).parent, *(Path(d) for d in spec.search_dirs)]
            data = load_eval_data(spec.eval_data, lambda: text_encoder(spec.model, search), limits)
        elif spec.eval_set_path is not None:
            data = load_eval_set(Path(spec.eval_set_path), spec.max_eval_examples)
        else:
            return None, ("no evaluation data to run the model on: pass --eval-data (a text file, JSONL, val.bin "
                          "or eval_set.safetensors)")
        names = list(spec.class_names)
        if data.class_ids is not None and data.class_names:  # classes named by the data: map to the run's
            index = {c: i for i, c in enumerate(names)}
            ids = [index.get(c, -1) for c in data.class_names]
            remap = torch.tensor(ids + [-1], dtype=torch.int64)  # -1 (no class) stays -1
            data = dataclasses.replace(data, class_ids=remap[data.class_ids])
        elif data.class_ids is not None and names and int(data.class_ids.max()) >= len(names):
            data = dataclasses.replace(data, class_ids=None)
        probe = ModelProbe(rebuilt, data, names, eps=spec.dead_eps, batch_size=spec.eval_batch_size,
                           grad_batch_size=spec.grad_batch_size, rho_band=spec.rho_band, seed=spec.eval_seed)
        missing = probe.missing_points()
        if missing:
            return None, f"{rebuilt.description} has none of the probe points: {missing[0]}"
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
                return ProbeResult(step, probe.run(step), tuple(probe.notes))
            except (RuntimeError, ValueError, TrainauditError) as exc:
                return ProbeResult(step, {}, (f"step {step}: model pass failed: {' '.join(str(exc).split())[:300]}",))
        finally:
            _PROBES.release(task.spec, probe)


MODEL_PASS_CODES = ("dead_neurons", "dead_head", "grad_ratio", "attention_logit_growth", "tau_band",
                    "tau_disagreement")


def audit_model_pass(checkpoint: Path, config: Any) -> tuple[list[Any], list[str]]:
    """`audit --eval-data`: the model pass of one checkpoint (dead units, dead heads, rho, attention
    logits, tau) as findings, and summary lines (evaluation loss, log Z, tau, or why the pass could
    not run). The report's analysis on that checkpoint alone, with one worker."""
    import dataclasses as dc

    from analyze.pipeline.analysis import analyze_run

    res = analyze_run(checkpoint, dc.replace(config, workers=1))
    found = [f for f in res.findings if f.code in MODEL_PASS_CODES]
    lines = []
    why = res.panels.get("dead_neurons") or res.panels.get("attention")
    if why:
        lines.append(f"model pass skipped: {why}")
    ev = res.tables.get("eval_set")
    if ev is not None and len(ev):
        r = ev.iloc[-1]
        lines.append(f"model pass: {int(r['n_examples'])} sequences, {int(r['n_tokens']):,} target tokens, "
                     f"loss {float(r['loss']):.4g} nats, mean log Z {float(r['mean_log_z']):.4g}")
    tau = res.tables.get("tau")
    if tau is not None and len(tau):
        t = tau[tau["source"] == "checkpoint"]
        if len(t):
            r = t.iloc[-1]
            lines.append(f"tau = L({r['class_a']}) - L({r['class_b']}) = {float(r['tau']):.4g} nats")
    dn = res.tables.get("dead_neurons")
    if dn is not None and len(dn):
        lines.append(f"dead FFN units: {int(dn['dead_count'].sum())} of {int(dn['d_ff'].sum())} in {len(dn)} layer(s)")
    att = res.tables.get("attention")
    if att is not None and len(att):
        lines.append(f"attention heads: {int(att['dead'].sum())} dead of {len(att)}")
    lines += [n for n in res.notes if n.startswith(("model panels:", "evaluation data:"))]
    return found, lines
