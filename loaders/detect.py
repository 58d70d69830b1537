"""``open_run(path)``: recognise what a path holds and read it with the matching loader.

Recognised (issue 5), in this order for a folder: our run directory (``run.json`` with
``format_version``), a Hugging Face Trainer output (``trainer_state.json`` and/or
``checkpoint-N/``), a Lightning log (``metrics.csv``, ``version_N/metrics.csv``), TensorBoard
event files, a nanoGPT ``ckpt.pt``, a Hugging Face model folder, a folder of checkpoints, and a
single plain log (JSONL / CSV / JSON / llm.c). A file is recognised by name and a peek at its
first bytes. ``format=`` (the CLI's ``--format``) skips detection. Anything else raises
``TrainauditError`` listing what was looked for.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from loaders.checkpoints import (
    TORCH_SUFFIXES,
    check_safetensors_header,
    checkpoint_kind,
    load_torch_object,
    step_from_name,
)
from loaders.errors import DataWarnings, TrainauditError
from loaders.longtables import Triples, build_run
from loaders.run import CheckpointRef, Run
from loaders.safeio import check_regular, open_regular

__all__ = ["FORMATS", "detect_format", "open_run", "read_checkpoints"]

FORMATS = ("rundir", "hf", "lightning", "tensorboard", "nanogpt", "llmc", "jsonl", "csv", "json", "checkpoint")

LOOKED_FOR = ("run.json (trainaudit run)", "trainer_state.json", "checkpoint-N/", "metrics.csv",
              "version_N/metrics.csv", "*tfevents*", "ckpt.pt", "model.safetensors", "pytorch_model.bin",
              "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.jsonl", "*.csv", "*.json", "*.log", "*.txt")
_CKPT_DIR_RE = re.compile(r"^checkpoint-\d+$")
_LOG_SUFFIXES = (".jsonl", ".csv", ".json", ".log", ".txt", ".ndjson")


def _peek(path: Path, n: int = 4096) -> bytes:
    with open_regular(path) as f:
        return f.read(n)


def _is_rundir(p: Path) -> bool:
    meta = p / "run.json"
    if not meta.is_file():
        return False
    try:
        head = _peek(meta, 1 << 16)
    except TrainauditError:
        return False
    try:
        obj = json.loads(head.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return b'"format_version"' in head  # a damaged run.json is still ours: its reader says what is wrong
    return isinstance(obj, dict) and "format_version" in obj


def _detect_file(p: Path) -> str:
    name = p.name.lower()
    if "tfevents" in name:
        return "tensorboard"
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return "checkpoint"
    if name.endswith(TORCH_SUFFIXES):
        if name == "ckpt.pt":
            return "nanogpt"
        return "checkpoint"  # nanoGPT-shaped dicts are recognised after loading (see _read_torch_file)
    head = _peek(p).lstrip(b"\xef\xbb\xbf").lstrip()
    if name == "trainer_state.json":
        return "hf"
    if name == "metrics.csv":
        return "lightning"
    if name.endswith(".json"):
        if head.startswith(b"{") and b'"log_history"' in _peek(p, 1 << 20):
            return "hf"
        return "json"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".csv"):
        first = head.split(b"\n", 1)[0].decode("utf-8", "replace").lower()
        cols = [c.strip() for c in first.split(",")]
        return "lightning" if "epoch" in cols and "step" in cols else "csv"
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()[:50]
    from loaders.textlogs import looks_like_llmc
    if looks_like_llmc(lines):
        return "llmc"
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"["):
        return "json"
    if lines and "," in lines[0]:
        return "csv"
    raise TrainauditError(p, f"unrecognised file (looked for: {', '.join(LOOKED_FOR)})")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name in ``FORMATS`` that ``open_run`` would use for ``path``."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise TrainauditError(p, "no such file or folder")
    if not p.is_dir():
        check_regular(p)
        return _detect_file(p)
    from loaders.hf_trainer import checkpoint_dirs
    from loaders.lightning_csv import find_metrics_csv
    from loaders.tensorboard import find_event_files

    if _is_rundir(p):
        return "rundir"
    if (p / "trainer_state.json").is_file() or checkpoint_dirs(p) or (
            _CKPT_DIR_RE.match(p.name) and (p / "trainer_state.json").is_file()):
        return "hf"
    if find_metrics_csv(p) is not None:
        return "lightning"
    if find_event_files(p):
        return "tensorboard"
    if (p / "ckpt.pt").is_file():
        return "nanogpt"
    if any((p / n).exists() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                      "pytorch_model.bin.index.json")):
        return "checkpoint"
    names = sorted(os.listdir(p))
    if any(n.endswith((".safetensors", *TORCH_SUFFIXES)) for n in names):
        return "checkpoint"
    logs = [n for n in names if n.lower().endswith(_LOG_SUFFIXES) and (p / n).is_file()]
    if len(logs) == 1:
        return _detect_file(p / logs[0])
    if not names:
        raise TrainauditError(p, "no run data found (empty folder)")
    if len(logs) > 1:
        raise TrainauditError(p, f"no run data found: several logs ({', '.join(logs[:5])}); "
                                 f"give one file or --format")
    raise TrainauditError(p, f"no run data found (looked for: {', '.join(LOOKED_FOR)})")


def _single_log(p: Path, suffixes: tuple[str, ...]) -> Path:
    if p.is_file():
        return p
    logs = sorted(n for n in os.listdir(p) if n.lower().endswith(suffixes) and (p / n).is_file())
    if len(logs) != 1:
        raise TrainauditError(p, f"expected one {'/'.join(suffixes)} file, found {len(logs)}")
    return p / logs[0]


def _ckpt_step(f: Path, warnings: DataWarnings) -> int | None:
    """A checkpoint file's step: safetensors metadata "step", else the file name."""
    if f.suffix == ".safetensors":
        try:
            meta = check_safetensors_header(f).get("__metadata__") or {}
        except TrainauditError as e:
            warnings.add(f, e.problem)
            meta = {}
        s = meta.get("step")
        if isinstance(s, str) and s.strip().isdigit():
            return int(s)
    return step_from_name(f.name)


def read_checkpoints(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """A bare checkpoint file, an HF model folder, or a folder of checkpoint files -> ``Run``
    with checkpoints only (no loss curves). A torch file shaped like nanoGPT's ``ckpt.pt`` is
    read as a nanoGPT run."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    notes = ["checkpoints only: no training log, so no loss curves"]
    ckpts: list[CheckpointRef] = []
    if p.is_file():
        if p.name.lower().endswith(TORCH_SUFFIXES):
            obj = load_torch_object(p, warnings=warnings)
            from loaders.nanogpt import is_nanogpt_dict, read_nanogpt
            if is_nanogpt_dict(obj):
                del obj
                return read_nanogpt(p, warnings=warnings)
            step = next((obj.get(k) for k in ("iter_num", "global_step", "step") if isinstance(obj, dict)
                         and isinstance(obj.get(k), int)), None)
            del obj
        else:
            step = _ckpt_step(p, warnings)
        if step is None:
            step = step_from_name(p.name) or 0
        ckpts.append(CheckpointRef(int(step), p, checkpoint_kind(p)))
    elif any((p / n).exists() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                        "pytorch_model.bin.index.json")):
        from loaders.checkpoints import skipped_side_files
        side = skipped_side_files(p)
        if side:
            warnings.add(p, f"skipped {', '.join(side)} (pickled object{'s' if len(side) > 1 else ''}, not needed)")
        ckpts.append(CheckpointRef(step_from_name(p.name) or 0, p, "hf-dir"))
    else:
        from loaders.checkpoints import skipped_side_files
        side = set(skipped_side_files(p))
        if side:
            warnings.add(p, f"skipped {', '.join(sorted(side))} (pickled object{'s' if len(side) > 1 else ''}, "
                            f"not needed)")
        files = sorted(n for n in os.listdir(p) if n.endswith((".safetensors", *TORCH_SUFFIXES)) and n not in side)
        unknown = []
        for i, n in enumerate(files):
            f = p / n
            try:
                check_regular(f, p)
            except TrainauditError as e:
                warnings.add(f, e.problem)
                continue
            s = _ckpt_step(f, warnings)
            if s is None:
                unknown.append(n)
                s = i
            ckpts.append(CheckpointRef(s, f, checkpoint_kind(f)))
        if unknown:
            warnings.add(p, f"no step in the name or metadata of {', '.join(unknown[:3])}"
                            f"{' ...' if len(unknown) > 3 else ''}: file order used as the step")
        steps = [c.step for c in ckpts]
        if len(set(steps)) != len(steps):
            warnings.add(p, "several checkpoints share a step; file order used instead")
            ckpts = [CheckpointRef(i, c.path, c.kind) for i, c in enumerate(sorted(ckpts, key=lambda c: c.path.name))]
    if not ckpts:
        raise TrainauditError(p, "no checkpoints found")
    return build_run(p, "checkpoint", train=Triples(), evals=Triples(), warnings=warnings,
                     checkpoints=ckpts, notes=notes)


def _read_rundir(p: Path) -> Run:
    from loaders import rundir  # the lead's reader of our own format, imported lazily
    return rundir.read_run_dir(p)


def _readers() -> dict[str, Callable[[Path, DataWarnings], Run]]:
    from loaders.hf_trainer import read_hf
    from loaders.lightning_csv import read_lightning
    from loaders.nanogpt import read_nanogpt
    from loaders.tensorboard import read_tensorboard
    from loaders.textlogs import read_csv_log, read_json_log, read_jsonl, read_llmc

    return {
        "rundir": lambda p, w: _read_rundir(p),
        "hf": lambda p, w: read_hf(p, warnings=w),
        "lightning": lambda p, w: read_lightning(p, warnings=w),
        "tensorboard": lambda p, w: read_tensorboard(p, warnings=w),
        "nanogpt": lambda p, w: read_nanogpt(p, warnings=w),
        "llmc": lambda p, w: read_llmc(_single_log(p, (".log", ".txt")), warnings=w),
        "jsonl": lambda p, w: read_jsonl(_single_log(p, (".jsonl", ".ndjson", ".json")), warnings=w),
        "csv": lambda p, w: read_csv_log(_single_log(p, (".csv",)), warnings=w),
        "json": lambda p, w: read_json_log(_single_log(p, (".json",)), warnings=w),
        "checkpoint": lambda p, w: read_checkpoints(p, warnings=w),
    }


def open_run(path: str | os.PathLike[str], *, format: str | None = None) -> Run:  # noqa: A002 (CLI name)
    """Read a run of any supported kind; ``format`` (one of ``FORMATS``) skips detection."""
    p = Path(path)
    if format == "trainaudit":  # the name loaders.rundir.load_run uses for our own format
        format = "rundir"  # noqa: A001
    if format is not None and format not in FORMATS:
        raise TrainauditError(p, f"unknown format {format!r} (choose from {', '.join(FORMATS)})")
    if not p.exists():
        raise TrainauditError(p, "no such file or folder")
    fmt = format or detect_format(p)
    warnings = DataWarnings()
    run = _readers()[fmt](p, warnings)
    run.meta.setdefault("detected_format", fmt)
    return run
