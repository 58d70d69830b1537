"""Plain loss logs: llm.c text logs, JSONL records, CSV tables and JSON arrays.

* llm.c (``s:N trl:X lr:Y norm:Z`` / ``s:N tel:X``), modded-nanogpt
  (``step:N/M train_loss:X`` / ``step:N/M val_loss:X``) and llm.c stdout
  (``step N/M | train loss X | norm Y | lr Z``): one line at a time, unknown lines counted.
* JSONL: one object per line (``parse_json_line``: NaN tokens, duplicate keys warned), steps
  from ``step`` / ``global_step`` / ``iter`` / ... or the record number.
* CSV: the sparse wide-table reader of ``lightning_csv``.
* JSON: an array of numbers (a loss per step), an array of objects, or an object of arrays.
All go through the same rewind policy and column naming as the other loaders.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from loaders.errors import DataWarnings, TrainauditError
from loaders.lightning_csv import STEP_KEYS, read_metrics_csv, wide_to_run
from loaders.longtables import Triples, WideLog, build_run, to_float
from loaders.run import Run
from loaders.safeio import iter_line_batches, parse_json_line, read_bounded

__all__ = ["MAX_JSON_BYTES", "looks_like_llmc", "read_csv_log", "read_json_log", "read_jsonl", "read_llmc"]

MAX_JSON_BYTES = 1 << 30
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
    cells (16 bytes each), not with the text.
    """
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    log = WideLog(STEP_KEYS)
    for start, lines in iter_line_batches(p, warnings, root=root):
        for i, line in enumerate(lines):
            rec = parse_json_line(line, warnings, p, start + i)
            if rec is not None:
                log.add(_flatten(rec))
    if log.n == 0:
        raise TrainauditError(p, "no JSON records found")
    return wide_to_run(p, log, warnings, source_format="jsonl", run_path=p)


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
    raw = read_bounded(p, root, max_bytes=MAX_JSON_BYTES)
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise TrainauditError(p, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TrainauditError(p, f"not valid JSON: {e.msg} (line {e.lineno})") from None
    except (ValueError, RecursionError) as e:
        raise TrainauditError(p, f"not valid JSON ({type(e).__name__})") from None
    notes: list[str] = []
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        log = WideLog(STEP_KEYS)
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
