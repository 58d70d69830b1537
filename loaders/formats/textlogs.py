"""Plain loss logs: llm.c text logs, JSONL records, CSV tables and JSON arrays.

* llm.c (``s:N trl:X lr:Y norm:Z`` / ``s:N tel:X``), modded-nanogpt
  (``step:N/M train_loss:X`` / ``step:N/M val_loss:X``) and llm.c stdout
  (``step N/M | train loss X | norm Y | lr Z``): one line at a time, unknown lines counted.
* JSONL: one object per line (``parse_json_line``: NaN tokens, duplicate keys warned), steps
  from ``step`` / ``global_step`` / ``iter`` / ... or the record number.
* CSV: the sparse wide-table reader of ``lightning_csv``.
* JSON: an array of numbers (a loss per step), an array of objects, or an object of arrays.
All go through the same rewind policy and column naming as the other loaders.

DDP runs (bad-inputs.md D13): one log per rank (``metrics.rank0.jsonl`` ... , found by
``loaders.detect``) or one JSONL whose records carry a ``"rank"`` field. ``read_rank_logs``
reads each rank alone and combines them without double counting: the global series keep
their names and are rank 0's (the lowest rank present when rank 0 is missing); every other
rank's series are added as ``"<series>/rank<k>"`` (``loss/rank1``, ``val_loss/rank3``) so
they are visible but never enter the global curves, spike counts or the overfitting
verdict. Warnings say which ranks are missing (no file, no records, or below a logged
``world_size``) and which stop early ("rank 2 stops at step 180").
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings, TrainauditError
from loaders.formats.lightning_csv import STEP_KEYS, read_metrics_csv, wide_to_run
from loaders.lines import BlockDecoder, iter_line_batches, iter_line_blocks, parse_flat_json_block, parse_json_line, read_json
from loaders.longtables import Triples, WideLog, build_run, empty_frame, preferred_val_series, run_name, to_float
from loaders.run import CLASS_LOSS_COLUMNS, EVAL_CLASS_LOSS_COLUMNS, Run

__all__ = ["MAX_JSON_BYTES", "MAX_RANKS", "looks_like_llmc", "rank_series", "read_csv_log", "read_json_log",
           "read_jsonl", "read_llmc", "read_rank_logs"]

MAX_JSON_BYTES = 1 << 30
MAX_RANKS = 1 << 16     # a "rank" field at or above this is not a rank
_KV = re.compile(r"([A-Za-z_][\w/.-]*):(\S+)")
_PIPE_STEP = re.compile(r"^\s*step\s+(\d+)\s*(?:/\s*\d+)?\s*$", re.I)
_PIPE_KV = re.compile(r"^\s*([A-Za-z][A-Za-z _/]*?)\s+([-+0-9.eEinfaINFA]+)\s*\S*\s*$")
_LLMC_KEYS = {"trl": ("train", "loss"), "train_loss": ("train", "loss"), "loss": ("train", "loss"),
              "tel": ("eval", "val_loss"), "val_loss": ("eval", "val_loss"), "vl": ("eval", "val_loss"),
              "lr": ("train", "lr"), "norm": ("train", "grad_norm"), "grad_norm": ("train", "grad_norm")}
_PIPE_KEYS = {"train loss": ("train", "loss"), "loss": ("train", "loss"), "val loss": ("eval", "val_loss"),
              "norm": ("train", "grad_norm"), "grad norm": ("train", "grad_norm"), "lr": ("train", "lr")}


def _flatten(rec: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting flattened with "/" (``{"eval": {"loss": 1}}`` -> ``eval/loss``)."""
    for v in rec.values():
        if type(v) is dict:
            break
    else:
        return rec  # the common flat record: no copy
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update({f"{k}/{k2}": v2 for k2, v2 in v.items() if not isinstance(v2, dict)})
        else:
            out[k] = v
    return out


def _parse_step(v: str) -> str:
    return v.split("/", 1)[0]


def looks_like_llmc(lines: list[str]) -> bool:
    """True if some of these lines are llm.c / modded-nanogpt / llm.c-stdout loss lines."""
    return any(_parse_text_line(ln) is not None for ln in lines)


def _parse_text_line(line: str) -> tuple[str, list[tuple[str, str, str]]] | None:
    """(step, [(kind, series, value)]) of one log line, or None."""
    if "|" in line:
        parts = line.split("|")
        m = _PIPE_STEP.match(parts[0])
        if m:
            vals = []
            for part in parts[1:]:
                kv = _PIPE_KV.match(part)
                if kv and kv.group(1).strip().lower() in _PIPE_KEYS:
                    kind, series = _PIPE_KEYS[kv.group(1).strip().lower()]
                    vals.append((kind, series, kv.group(2)))
            return (m.group(1), vals) if vals else None
    pairs = _KV.findall(line)
    if not pairs:
        return None
    step = None
    vals = []
    for k, v in pairs:
        if k in ("s", "step") and step is None:
            step = _parse_step(v)
        elif k in _LLMC_KEYS:
            kind, series = _LLMC_KEYS[k]
            vals.append((kind, series, v))
    if step is None or not vals:
        return None
    return step, vals


def read_llmc(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None,
              root: str | os.PathLike[str] | None = None) -> Run:
    """An llm.c-style text log -> ``Run`` (train: loss, lr, grad_norm; eval: val_loss)."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    train, evals = Triples(), Triples()
    other = 0
    first_other = None
    for start, lines in iter_line_batches(p, warnings, root=root):
        for i, line in enumerate(lines):
            parsed = _parse_text_line(line)
            if parsed is None:
                if line.strip():
                    other += 1
                    first_other = first_other or start + i
                continue
            step, vals = parsed
            if step.isdigit():
                step = int(step)  # the common case; anything else goes through coerce_steps
            for kind, series, v in vals:
                (train if kind == "train" else evals).add(step, series, v)
    notes = []
    if other:
        notes.append(f"{other} lines that are not loss records skipped (first at line {first_other})")
    if len(train) == 0 and len(evals) == 0:
        raise TrainauditError(p, "no loss records found (expected llm.c lines like 's:N trl:X')")
    return build_run(p, "llmc", train=train, evals=evals, warnings=warnings, notes=notes,
                     meta={"log_file": str(p)})


def read_jsonl(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None,
               root: str | os.PathLike[str] | None = None) -> Run:
    """JSON Lines of ``{"step": ..., "loss": ..., "val_loss": ...}`` records -> ``Run``.

    Records are streamed into a column store (``WideLog``): memory grows with the numeric
    cells (16 bytes each), not with the text. A block of lines that are all flat records of
    numbers is parsed at once (``parse_flat_json_block``); any other block line by line, with
    the same result. Records with an integer ``"rank"`` field are
    kept apart per rank and combined by ``read_rank_logs`` (a record without one is rank 0's).
    """
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    log = WideLog(STEP_KEYS, p)
    logs: dict[int, WideLog] = {0: log}
    decode = BlockDecoder(p, warnings)
    for start, block in iter_line_blocks(p, warnings, root=root):
        flat = parse_flat_json_block(block) if len(logs) == 1 else None
        if flat is not None:  # every line a flat record of numbers: the whole block at once
            log.add_block(flat)
            continue
        for i, line in enumerate(decode(start, block)):
            rec = parse_json_line(line, warnings, p, start + i)
            if rec is None:
                continue
            target = log
            if "rank" in rec:
                rank = rec["rank"]
                if type(rank) is int and 0 <= rank < MAX_RANKS:
                    del rec["rank"]
                    if rank not in logs:
                        logs[rank] = WideLog(STEP_KEYS, p)
                    target = logs[rank]
            target.add(_flatten(rec))
    used = {r: lg for r, lg in logs.items() if lg.n}
    if not used:
        raise TrainauditError(p, "no JSON records found")
    if len(used) == 1:
        return wide_to_run(p, next(iter(used.values())), warnings, source_format="jsonl", run_path=p)
    return read_rank_logs(p, {r: p for r in sorted(used)},
                          lambda r, f, w: wide_to_run(p, used[r], w, source_format="jsonl", run_path=p),
                          warnings, labels="records")


def rank_series(series: str, rank: int) -> str:
    """Name of another rank's copy of a series: ``loss`` of rank 2 -> ``loss/rank2`` (row D13)."""
    return f"{series}/rank{rank}"


def _last_step(run: Run) -> int | None:
    steps = [int(df["step"].max()) for df in (run.scalars, run.evals) if len(df)]
    return max(steps) if steps else None


def _logged_world_size(run: Run) -> int | None:
    """A ``world_size`` column logged in the records (JSONL/CSV keep it among the extra scalars)."""
    extra = run.meta.get("extra_scalars")
    if not isinstance(extra, pd.DataFrame) or not len(extra):
        return None
    v = extra.loc[extra["series"] == "world_size", "value"].to_numpy(dtype=np.float64)
    v = v[np.isfinite(v) & (v >= 1) & (v <= MAX_RANKS)]
    return int(v.max()) if len(v) else None


def read_rank_logs(folder: str | os.PathLike[str], files: dict[int, Path],
                   read_one: Callable[[int, Path, DataWarnings], Run], warnings: DataWarnings, *,
                   labels: str = "file") -> Run:
    """Combine the logs of a DDP run, one per rank, into one ``Run`` (bad-inputs.md D13).

    ``files`` maps each rank to its log; ``read_one(rank, path, warnings)`` reads one of them
    (``labels="records"``: all ranks share one file and are told apart by a ``rank`` field). The global series are
    the lowest readable rank's (rank 0 normally), the others are added as ``rank_series``.
    Warnings: "rank 3 missing" (no file for a rank below the highest rank or a logged
    ``world_size``, or a file with no records) and "rank 2 stops at step 180" (its last step is
    before the others').
    """
    folder = Path(folder)
    runs: dict[int, Run] = {}
    for r, f in sorted(files.items()):
        try:
            runs[r] = read_one(r, f, warnings)
        except TrainauditError as e:
            warnings.add(f, f"rank {r} missing ({e.problem})")
    if not runs:
        raise TrainauditError(folder, f"no rank log could be read ({len(files)} ranks)")
    world = max([max(files) + 1, *(w for w in map(_logged_world_size, runs.values()) if w is not None)])
    names = [f.name for f in files.values()]
    for r in range(world):
        if r not in files:
            what = f"no {_rank_name(names, r)}" if labels == "file" else "no records with this rank"
            warnings.add(folder, f"rank {r} missing ({what})")
    primary = min(runs)
    ends = {r: _last_step(run) for r, run in runs.items()}
    known = {r: e for r, e in ends.items() if e is not None}
    if known:
        top_rank = max(known, key=lambda r: (known[r], -r))
        for r, e in known.items():
            if e < known[top_rank]:
                warnings.add(files[r], f"rank {r} stops at step {e} (rank {top_rank} reaches step {known[top_rank]})")
    scalars, evals = [], []
    for r, run in runs.items():
        sc, ev = run.scalars, run.evals
        if r != primary:
            sc = sc.assign(series=sc["series"].map(lambda s, _r=r: rank_series(s, _r)).astype(object))
            ev = ev.assign(series=ev["series"].map(lambda s, _r=r: rank_series(s, _r)).astype(object))
        scalars.append(sc)
        evals.append(ev)
    scalars_df = pd.concat(scalars, ignore_index=True).sort_values(["series", "step"], kind="stable")
    evals_df = pd.concat(evals, ignore_index=True).sort_values(["series", "step"], kind="stable")
    base = runs[primary]
    meta = dict(base.meta)
    val_names = sorted(set(evals_df["series"].astype(str)))
    meta.update(ranks=sorted(runs), world_size=world, rank_files={r: str(f) for r, f in files.items()},
                val_series=val_names, val_series_preferred=preferred_val_series(base.evals["series"]))
    notes = list(base.notes)
    notes.append(f"DDP log with {world} rank(s) ({len(runs)} read): the global series are rank {primary}'s; "
                 f"other ranks' are shown as '<series>/rank<k>' and never counted in the global ones")
    return Run(path=folder, name=run_name(folder), source_format=base.source_format, meta=meta,
               scalars=scalars_df.reset_index(drop=True), evals=evals_df.reset_index(drop=True),
               class_losses=empty_frame(CLASS_LOSS_COLUMNS), eval_class_losses=empty_frame(EVAL_CLASS_LOSS_COLUMNS),
               window_averaged=dict(base.window_averaged), warnings=warnings, notes=notes)


def _rank_name(names: list[str], rank: int) -> str:
    """The file name rank ``rank`` would have, from its siblings' names (``metrics.rank3.jsonl``)."""
    m = re.match(r"^(.*?rank[_-]?)(\d+)(\.[A-Za-z0-9]+)$", names[0], re.I)
    return f"{m.group(1)}{rank}{m.group(3)}" if m else f"log of rank {rank}"


def read_csv_log(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None,
                 root: str | os.PathLike[str] | None = None) -> Run:
    """A plain CSV loss log (``step,train_loss,val_loss,...``, sparse rows allowed) -> ``Run``."""
    warnings = warnings if warnings is not None else DataWarnings()
    return read_metrics_csv(path, warnings, root=root, source_format="csv")


def read_json_log(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None,
                  root: str | os.PathLike[str] | None = None) -> Run:
    """A JSON file: ``[loss, ...]``, ``[{"step":..,"loss":..}, ...]`` or ``{"train_loss": [...], ...}``."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    obj = read_json(p, root, max_bytes=MAX_JSON_BYTES)
    notes: list[str] = []
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        log = WideLog(STEP_KEYS, p)
        for r in obj:
            log.add(_flatten(r))
        return wide_to_run(p, log, warnings, source_format="json", run_path=p)
    train, evals = Triples(), Triples()
    if isinstance(obj, list):
        if not obj or to_float(obj[0]) is None:
            raise TrainauditError(p, "JSON array is neither numbers (a loss per step) nor records")
        for i, v in enumerate(obj):
            train.add(i, "loss", v)
        notes.append("bare list of losses: the position in the list is used as the step")
    elif isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        step_key = next((k for k in STEP_KEYS if k in lists or k + "s" in lists), None)
        steps = lists.get(step_key) or lists.get(f"{step_key}s") if step_key else None
        from loaders.longtables import classify_train_key, is_val_loss_key
        used = False
        for k, vals in lists.items():
            if k == step_key or (step_key and k == step_key + "s"):
                continue
            series = classify_train_key(k)
            is_val = is_val_loss_key(k)
            if series is None and not is_val:
                continue
            idx = steps if steps is not None and len(steps) == len(vals) else range(len(vals))
            for s, v in zip(idx, vals, strict=False):
                (evals.add(s, k, v) if is_val else train.add(s, series, v))
            used = True
        if not used:
            raise TrainauditError(p, "JSON object has no loss lists (looked for loss, train_loss, val_loss, ...)")
        if steps is None:
            notes.append("no step list: positions in each list are used as steps")
    else:
        raise TrainauditError(p, f"JSON {type(obj).__name__} is not a loss log")
    return build_run(p, "json", train=train, evals=evals, warnings=warnings, notes=notes,
                     meta={"log_file": str(p)})
