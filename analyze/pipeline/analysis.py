"""The offline analysis: a Run in, tidy tables + findings + notes out.

Thin orchestration over the metric modules (no formula lives here):

1. logs: training series with spike flags (§9), validation series, the §10 train/val alignment
   and verdict (`analyze.pipeline.log_tables`), per-class losses in Welford windows with tau
   and its SE (§8, `analyze.pipeline.class_tables`);
2. per checkpoint, in step order: tensors one at a time -> both spectral estimators warm-started
   from the previous checkpoint's vectors, exact SVD beside them, stable rank, update ratio
   (§4, §11, §12); then, when the run names a built-in model (or `--model` gives one) and stores
   an evaluation set, a forward pass with hooks and one backward pass (`analyze.pipeline.probe`). This
   work is a set of tasks (`analyze.pipeline.scheduler`) run in process, on a process pool or on Dask,
   with identical results;
3. findings from the tables (`analyze.pipeline.findings`) and the summary.json object.

Per-checkpoint results are cached in the output folder (`analyze.pipeline.cache`), so a second run on an
unchanged run recomputes nothing - and imports no torch: the per-class tables (computed with
torch) are cached too, and the task modules are imported only when a checkpoint needs work.

One module over 400 lines because `analyze_run` is one ordered recipe (logs, checkpoints, tables,
findings, summary) whose steps share its locals; the formulas and rules live elsewhere.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from analyze.pipeline import findings as findings_mod
from analyze.pipeline.cache import CheckpointCache
from analyze.pipeline.class_tables import BUILTIN_CLASS_PAIR, class_index, class_tables
from analyze.pipeline.grad_ratio import grad_ratio_table
from analyze.pipeline.log_tables import frame as _frame
from analyze.pipeline.log_tables import overfitting_table, train_table
from analyze.pipeline.tables import TABLE_COLUMNS, Finding, build_summary, finding_counts
from loaders.errors import TrainauditError
from loaders.run import CheckpointRef, Run

if TYPE_CHECKING:  # these import torch: only work the output folder's cache cannot serve needs it
    from analyze.pipeline.probe_task import ProbeSpec
    from analyze.pipeline.scheduler import CheckpointOutcome

__all__ = ["analyze_run", "AnalysisResult", "PANELS", "BUILTIN_CLASS_PAIR"]

Progress = Callable[[str], None]


# Panel id -> title; AnalysisResult.panels says why a panel could not be computed ("" when it could).
PANELS = {
    "loss": "Train and validation loss",
    "spikes": "Loss and gradient-norm spikes",
    "grad_norm": "Global gradient norm",
    "activations": "Activation magnitude per layer",
    "spectral": "Spectral norm per weight matrix",
    "dead_neurons": "Dead FFN units",
    "attention": "Attention entropy and dead heads",
    "class_losses": "Per-class loss and tau",
    "grad_ratio": "Grad-to-weight and update ratios",
    "logits": "Attention logits and output log Z",
}


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    """Everything the report shows: tables (TABLE_COLUMNS), findings, notes and summary.json.

    ``panels`` maps a panel id (PANELS) to the reason it could not be computed ("" when it was);
    ``headlines`` holds the one-line verdicts (overfitting, spikes, tau); ``data_warnings`` every
    loader warning plus what the analysis skipped; ``run_info`` the run header. ``config`` is the
    AnalysisConfig the tables and findings were made with; ``counts`` the findings per severity (a
    "N more" row counting N); ``headline`` what a reader needs first: ``verdict`` (the overfitting
    verdict, §10), ``verdict_text`` (its one line), ``memorisation`` (bool), ``worst_finding`` (the
    first finding, or None) and ``checkpoint_to_keep`` (as in summary.json).
    """

    tables: dict[str, pd.DataFrame]
    findings: list[Finding]
    notes: list[str]
    summary: dict[str, Any]
    run_info: dict[str, Any] = field(default_factory=dict)
    panels: dict[str, str] = field(default_factory=dict)
    headlines: dict[str, str] = field(default_factory=dict)
    data_warnings: list[str] = field(default_factory=list)
    not_analysed: list[str] = field(default_factory=list)   # library state files never opened (Run.not_analysed)
    cache_hits: int = 0
    cache_misses: int = 0
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    counts: dict[str, int] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _param_count(ref: CheckpointRef) -> tuple[int | None, str]:
    """Parameter count from the checkpoint's header / mmap (no tensor data read)."""
    from loaders.checkpoints import checkpoint_info

    try:
        return checkpoint_info(ref).n_params, "checkpoint header"
    except (TrainauditError, OSError, ValueError, RuntimeError):
        return None, "unknown"


def _probe_spec(run: Run, cfg: AnalysisConfig) -> ProbeSpec:
    from analyze.models import find_model
    from analyze.pipeline.probe_task import ProbeSpec

    refs = sorted(run.checkpoints, key=lambda r: r.step)
    model = find_model(Path(refs[-1].path) if refs else None,
                       builtin=(run.model.name, run.model.config) if run.model else None, factory=cfg.model_factory)
    return ProbeSpec(model=model, eval_set_path=None if run.eval_set_path is None else str(run.eval_set_path),
                     eval_data=cfg.eval_data, search_dirs=(str(run.path if Path(run.path).is_dir() else
                                                               Path(run.path).parent),),
                     class_names=tuple(str(c) for c in run.class_names), dead_eps=cfg.dead_eps,
                     eval_batch_size=cfg.eval_batch_size, grad_batch_size=cfg.grad_batch_size,
                     max_eval_examples=cfg.max_eval_examples, eval_max_sequences=cfg.eval_max_sequences,
                     eval_seq_len=cfg.eval_seq_len, eval_seed=cfg.eval_seed, rho_band=(cfg.rho_low, cfg.rho_high))


def _checkpoints(run: Run, cfg: AnalysisConfig, cache: CheckpointCache, progress: Progress | None,
                 ) -> tuple[dict[str, list[dict]], list[str], list[str], str, bool | None]:
    """All per-checkpoint rows (cached or computed), notes, data warnings, probe reason, exact flag.

    The longest prefix of checkpoints found in the cache is replayed; the rest runs as tasks
    (`analyze.pipeline.scheduler`) serially, on a process pool (cfg.workers) or on Dask (cfg.scheduler), and
    each finished checkpoint is cached as soon as it and every one before it are done.
    """
    refs = sorted(run.checkpoints, key=lambda r: r.step)
    rows: dict[str, list[dict]] = {}
    notes: list[str] = []
    warns: list[str] = []
    if not refs:
        return rows, notes, warns, "the run has no checkpoints", None
    n_params, how = _param_count(refs[-1])
    exact = cfg.use_exact_svd(n_params if n_params is not None else 0)
    if cfg.exact_svd is None:
        notes.append(f"exact SVD {'on' if exact else 'off'} (auto: {n_params:,} parameters by {how}; "
                     f"on up to 10,000,000)" if n_params is not None else "exact SVD on (auto: size unknown)")
    power = cfg.use_power_iteration(n_params if n_params is not None else 0)
    if cfg.power_iteration and not power:
        notes.append(f"the sheet's power iteration off ({n_params:,} parameters by {how}; on up to "
                     f"{cfg.power_iteration_max_params:,}, AnalysisConfig.power_iteration_max_params): "
                     "sigma_power and power_rel_err are empty")
    # What else changes a checkpoint's rows: the model the run names, its classes and the eval set.
    from analyze.pipeline.cache import checkpoint_fingerprint

    cfg_key = "|".join((cfg.cache_key(), "exact" if exact else "noexact", "power" if power else "nopower",
                        repr(None if run.model is None else (run.model.name, sorted(run.model.config.items()))),
                        repr(list(run.class_names)),
                        checkpoint_fingerprint(Path(run.eval_set_path)) if run.eval_set_path else "-",
                        checkpoint_fingerprint(Path(cfg.eval_data)) if cfg.eval_data else "-"))

    def add(part: dict[str, list[dict]]) -> None:
        for k, v in part.items():
            rows.setdefault(k, []).extend(v)

    # 1. the cached prefix: a failed checkpoint is cached too (as failed), and does not move the chain
    vectors: dict[str, Any] = {}  # numpy arrays from the cache: tensors only if a task needs them
    prev_ok: CheckpointRef | None = None
    prev_key: str | None = None
    first = 0
    for i, ref in enumerate(refs, 1):
        key = cache.key(Path(ref.path), cfg_key, prev_key)
        hit = cache.load(ref.step, key)
        if hit is None:
            break
        first = i
        warns.extend(hit.warnings)
        if hit.failed:
            _say(progress, f"checkpoint {i}/{len(refs)}: step {ref.step} (cached: unreadable, skipped)")
            continue
        add(hit.rows)
        notes.extend(hit.notes)
        vectors, prev_ok, prev_key = hit.vectors, ref, key
        _say(progress, f"checkpoint {i}/{len(refs)}: step {ref.step} (cached)")
    todo = refs[first:]
    if not todo:  # everything from the cache: say why model panels may be empty
        if rows.get("activations") or rows.get("dead_neurons"):
            return rows, notes, warns, "", exact
        from analyze.pipeline.probe_task import probe_reason

        return rows, notes, warns, probe_reason(_probe_spec(run, cfg)), exact
    cache.count_misses(len(todo) - 1)  # the first was counted by its failed load

    # 2. the rest as tasks (the task modules and torch are imported only here: a report served
    # wholly from the cache needs neither)
    from analyze.pipeline.cache import as_tensors
    from analyze.pipeline.probe_task import probe_reason
    from analyze.pipeline.runners import make_runner
    from analyze.pipeline.scheduler import plan_checkpoint, run_checkpoints

    spec = _probe_spec(run, cfg)
    reason = probe_reason(spec)
    plans = [plan_checkpoint(ref) for ref in todo]
    key_state = {"prev": prev_key}
    done = {"n": first}

    def on_done(out: CheckpointOutcome) -> None:
        key = cache.key(Path(out.ref.path), cfg_key, key_state["prev"])
        cache.store(out.ref.step, key, out.rows, out.vectors, out.notes, out.warnings, failed=out.error)
        done["n"] += 1
        warns.extend(out.warnings)
        if out.error:
            _say(progress, f"checkpoint {done['n']}/{len(refs)}: step {out.ref.step} unreadable, skipped")
            return
        key_state["prev"] = key
        add(out.rows)
        notes.extend(out.notes)
        _say(progress, f"checkpoint {done['n']}/{len(refs)}: step {out.ref.step} done "
                       f"({time.perf_counter() - t0:.1f}s elapsed)")

    t0 = time.perf_counter()
    runner = make_runner(cfg.workers, cfg.scheduler)
    try:
        if cfg.scheduler:
            _say(progress, f"running {len(todo)} checkpoint(s) on the Dask cluster at {cfg.scheduler} "
                           f"({runner.workers} worker thread(s))")
        elif runner.workers > 1:
            _say(progress, f"running {len(todo)} checkpoint(s) on {runner.workers} worker processes")
        task_cfg = cfg if power == cfg.power_iteration else replace(cfg, power_iteration=power)
        run_checkpoints(plans, cfg=task_cfg, exact=exact, init_vectors=as_tensors(vectors), init_prev=prev_ok,
                        probe_spec=None if reason else spec, runner=runner, on_done=on_done)
    finally:
        runner.close()
    return rows, notes, warns, reason, exact


# --------------------------------------------------------------------------- entry point


def _load(run_or_path: Run | str | os.PathLike[str], fmt: str | None) -> Run:
    if isinstance(run_or_path, Run):
        return run_or_path
    from loaders.rundir import load_run

    return load_run(run_or_path, format=fmt)


def _with_eval_classes(run: Run, cfg: AnalysisConfig) -> AnalysisConfig:
    """Classes named by --eval-data (JSONL) join the run's; tau's pair defaults to the first two seen."""
    if not cfg.eval_data:
        return cfg
    from dataclasses import replace

    from loaders.evaldata import eval_class_names

    found = eval_class_names(cfg.eval_data)
    run.class_names = [*run.class_names, *(c for c in found if c not in run.class_names)]
    if cfg.class_pair is None and len(found) >= 2:
        cfg = replace(cfg, class_pair=(found[0], found[1]))
    return cfg


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def analyze_run(run_or_path: Run | str | os.PathLike[str], config: AnalysisConfig | None = None, *,
                progress: Progress | None = None, cache_dir: str | os.PathLike[str] | None = None,
                format: str | None = None) -> AnalysisResult:  # noqa: A002 - the CLI's option name
    """Analyse a run (a `Run` or a path any loader reads) and return tables, findings and notes.

    Args:
        run_or_path: a loaded Run, or a run directory / log file / checkpoint path.
        config: analysis settings (defaults: formula-sheet values, docs/metrics).
        progress: called with one-line progress messages (the CLI prints them on stderr).
        cache_dir: folder for per-checkpoint results; None disables the cache.
        format: loader override (`--format`), when a path is given.
    """
    cfg = config or AnalysisConfig()
    t_start = time.perf_counter()
    run = _load(run_or_path, format)
    cfg = _with_eval_classes(run, cfg)
    _say(progress, f"loaded {run.source_format} run: {run.steps_logged} steps logged, "
                   f"{len(run.checkpoints)} checkpoint(s)")
    notes: list[str] = list(run.notes)
    panels = {k: "" for k in PANELS}
    headlines: dict[str, str] = {}

    # 1. logs
    train, spike_reports = train_table(run, cfg)
    evals = run.evals.sort_values(["series", "step"], kind="stable").reset_index(drop=True)
    of, val_series, of_table, of_notes = overfitting_table(run, cfg)
    notes += of_notes
    if of is not None:
        headlines["overfitting"] = of.headline
        notes += [f"overfitting ({val_series}): {n}" for n in of.notes]
    spike_rows = []
    for series, rep in spike_reports.items():
        for e in rep.events:
            spike_rows.append({"series": series, "kind": e.kind, "first_step": e.first_step,
                               "peak_step": e.peak_step, "height_mad": e.height_mad,
                               "height_sigma": e.height_sigma, "length": e.length})
        if rep.note:
            notes.append(f"spike detector on {series}: {rep.note}")
    # §9 spike score: flagged logged points over logged points; None when the run logs no such series
    spike_score = {s: float(spike_reports[s].score) if s in spike_reports else None for s in ("loss", "grad_norm")}
    del spike_reports  # their per-point arrays (flags are in `train`) are 17 bytes a logged point
    has_loss = bool((train["series"] == "loss").any())
    if not has_loss and of is None:
        panels["loss"] = "the run logs neither training nor validation loss"
    if not has_loss and not (train["series"] == "grad_norm").any():
        panels["spikes"] = "the run logs neither a training loss nor a gradient norm"
    if not (train["series"] == "grad_norm").any() or train.loc[train["series"] == "grad_norm", "value"].isna().all():
        panels["grad_norm"] = "the run logs no global gradient norm"

    names = class_index(run)

    # 2. checkpoints
    cache = CheckpointCache(None if cache_dir is None else Path(cache_dir))
    ck_rows, ck_notes, ck_warns, probe_reason, exact = _checkpoints(run, cfg, cache, progress)
    notes += ck_notes
    if not run.checkpoints:
        panels["spectral"] = "the run has no checkpoints, so there are no weights to measure"
    elif not ck_rows.get("spectral"):
        panels["spectral"] = "no checkpoint could be read, or none holds a 2-D weight"
    if probe_reason:
        for p in ("activations", "dead_neurons", "attention", "logits"):
            panels[p] = probe_reason
    else:
        for p, tname in (("activations", "activations"), ("dead_neurons", "dead_neurons"),
                         ("attention", "attention")):
            if not ck_rows.get(tname):
                panels[p] = "the model has no hook point for this panel, or every model pass failed (see notes)"
    if not ck_rows.get("grad_ratio") and not ck_rows.get("update_ratio") and run.grad_norms.empty:
        panels["grad_ratio"] = probe_reason or "fewer than two checkpoints and no model pass"
    ck_class_rows = ck_rows.pop("class_losses", [])
    per_class = class_tables(run, cfg, names, ck_rows.pop("tau_state", []), cache)
    pair = None if per_class["pair"] is None else (int(per_class["pair"][0]), int(per_class["pair"][1]))
    pair_note = per_class["pair_note"]
    class_rows = per_class["class_rows"] + ck_class_rows
    gap_rows, tau_rows = per_class["gap_rows"], per_class["tau_rows"]
    if not class_rows:
        panels["class_losses"] = "the run logs no per-class losses (RunLogger.log_class_losses writes them)"
    if class_rows:
        notes.append(pair_note)
    notes += per_class["notes"]

    tables: dict[str, pd.DataFrame] = {
        "train": train,
        "evals": evals[list(TABLE_COLUMNS["evals"])] if len(evals) else _frame("evals", []),
        "overfitting": of_table[list(TABLE_COLUMNS["overfitting"])] if len(of_table) else _frame("overfitting", []),
        "spikes": _frame("spikes", spike_rows),
        "class_losses": _frame("class_losses", class_rows),
        "tau": _frame("tau", tau_rows),
        "class_gaps": _frame("class_gaps", gap_rows),
    }
    for name in ("spectral", "update_ratio", "activations", "dead_neurons", "activation_frequency", "attention",
                 "attention_logits",
                 "eval_set"):
        tables[name] = _frame(name, ck_rows.get(name, []))
    # rho (§11): from the logged training gradients when there are any, else the probe's fallback
    tables["grad_ratio"], rho_notes = grad_ratio_table(run.grad_norms, tables["spectral"],
                                                       ck_rows.get("grad_ratio", []), cfg)
    notes += rho_notes
    if len(tables["spectral"]) and exact is False:
        notes.append("exact SVD was off: rel_err and sigma_ratio are empty (use --exact-svd to validate)")

    # 3. findings and summary
    data_warnings = [*run.warnings, *ck_warns]
    ctx = findings_mod.Context(cfg=cfg, run_name=run.name, is_builtin_corpus=pair is not None and
                               all(n in names for n in BUILTIN_CLASS_PAIR), overfitting=of,
                               val_series=val_series, n_data_warnings=len(data_warnings),
                               last_step=int(run.scalars["step"].max()) if len(run.scalars) else 0)
    found = findings_mod.derive(tables, ctx)
    ck_steps = [r.step for r in sorted(run.checkpoints, key=lambda r: r.step)]
    keep = findings_mod.checkpoint_to_keep(tables, ck_steps, val_series)
    tau_sum = None
    tau_t = tables["tau"]
    for source in ("train", *(f"eval:{s}" for s in sorted(set(evals["series"].astype(str)))), "checkpoint"):
        sel = tau_t[(tau_t["source"] == source)] if len(tau_t) else tau_t
        sel = sel[np.isfinite(sel["tau"].astype(float))] if len(sel) else sel
        if len(sel):
            imax = sel["tau"].astype(float).idxmax()
            tau_sum = {"class_a": sel["class_a"].iloc[-1], "class_b": sel["class_b"].iloc[-1],
                       "final": float(sel["tau"].iloc[-1]), "max": float(sel.loc[imax, "tau"]),
                       "max_step": int(sel.loc[imax, "step"]), "source": source}
            headlines["tau"] = (f"tau = L({tau_sum['class_a']}) - L({tau_sum['class_b']}) ended at "
                                f"{tau_sum['final']:.3f} nats (peak {tau_sum['max']:.3f} at step "
                                f"{tau_sum['max_step']}; "
                                f"from {'training windows' if source == 'train' else source})")
            break
    if cache.folder is not None and run.checkpoints:
        if cache.misses == 0 and cache.hits:
            notes.append(f"all {cache.hits} checkpoint(s) served from the cache ({cache.folder}); nothing recomputed")
        elif cache.hits:
            notes.append(f"{cache.hits} checkpoint(s) from the cache, {cache.misses} recomputed")
    notes = _dedupe(notes)
    summary = build_summary(
        run={"name": run.name, "source_format": run.source_format, "steps_logged": run.steps_logged,
             "checkpoints": [r.step for r in sorted(run.checkpoints, key=lambda r: r.step)]},
        overfitting={"verdict": of.verdict if of else None, "divergence_step": of.divergence_step if of else None,
                     "val_min_step": of.val_min_step if of else None, "gl5_step": of.gl_step if of else None,
                     "val_series": val_series, "final_gl": of.final_rise_pct if of else None,
                     "memorisation": (any(f.code == "memorisation" for f in found) if of and of.verdict else None)},
        spikes=[r for r in spike_rows if r["series"] in ("loss", "grad_norm")],
        tau=tau_sum, findings=found, notes=[*notes, *data_warnings], spike_score=spike_score,
        checkpoint_to_keep=keep, not_analysed=run.not_analysed)
    kinds = pd.DataFrame(spike_rows, columns=["series", "kind"]).value_counts() if spike_rows else {}
    n_spikes = {s: int(kinds.get((s, "spike"), 0)) for s in ("loss", "grad_norm")}
    n_nonfin = {s: int(kinds.get((s, "non-finite"), 0)) for s in ("loss", "grad_norm")}
    headlines["spikes"] = (f"{n_spikes['loss']} loss spike event(s), {n_spikes['grad_norm']} grad-norm spike event(s)"
                           + (f"; non-finite values: {n_nonfin['loss']} loss, {n_nonfin['grad_norm']} "
                              "grad-norm event(s)"
                              if any(n_nonfin.values()) else "")
                           + f" (median + MAD detector, window {cfg.spike_window}, k = {cfg.spike_k:g})")
    run_info = {
        "name": run.name, "source_format": run.source_format, "path": str(run.path),
        "steps_logged": run.steps_logged, "checkpoints": summary["run"]["checkpoints"],
        "class_names": names, "model": None if run.model is None else {"name": run.model.name,
                                                                        "config": dict(run.model.config)},
        "created": run.meta.get("created"), "seed": run.meta.get("seed"),
        "exact_svd": exact, "analysis_seconds": time.perf_counter() - t_start,
        "window_averaged": dict(run.window_averaged), "val_series": val_series,
        "builtin_corpus": ctx.is_builtin_corpus,
    }
    memorised = any(f.code == "memorisation" for f in found)
    headline = {"verdict": of.verdict if of else None, "verdict_text": of.headline if of else None,
                "memorisation": memorised, "worst_finding": found[0] if found else None,
                "checkpoint_to_keep": summary["checkpoint_to_keep"]}
    return AnalysisResult(tables=tables, findings=found, notes=notes, summary=summary, run_info=run_info,
                          panels=panels, headlines=headlines, data_warnings=data_warnings,
                          not_analysed=list(run.not_analysed),
                          cache_hits=cache.hits, cache_misses=cache.misses, config=cfg,
                          counts=finding_counts(found), headline=headline)
