"""``open_run(path)``: recognise what a path holds and read it with the matching loader.

Recognised, in this order for a folder: our run directory (``run.json`` with
``format_version``), a Hugging Face Trainer output (``trainer_state.json`` and/or
``checkpoint-N/``), a Lightning log (``metrics.csv``, ``version_N/metrics.csv``), TensorBoard
event files, a nanoGPT working folder (``ckpt.pt`` or ``out*/ckpt.pt``, stdout logs), a Hugging
Face model folder, a folder of checkpoints (files, checkpoint folders, a ``checkpoints/``
sub-folder: docs/foreign-runs.md), and a single plain log (nanoGPT stdout / JSONL / CSV / JSON /
llm.c) or one log per DDP rank (``metrics.rank0.jsonl``,
``metrics.rank1.jsonl``, ...: read by ``loaders.formats.textlogs.read_rank_logs``). A file is recognised
by name and a peek at its first bytes. ``format=`` (the CLI's ``--format``) skips detection.
Anything else raises ``TrainauditError`` listing what was looked for.

Inside a folder, a log that is a symlink leaving the folder, a FIFO, a device or a socket is
never opened (bad-inputs.md A12-A14): it is skipped with a warning and detection goes on with
the other files.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loaders.checkpoint_files import checkpoint_kind
from loaders.checkpoint_layout import (
    CHECKPOINT_FOLDERS,
    NOT_ANALYSED_RE,
    checkpoints_beside,
    dedupe,
    find_checkpoints,
    has_weights,
    not_analysed,
    recorded_step,
)
from loaders.errors import DataWarnings, TrainauditError
from loaders.longtables import Triples, build_run
from loaders.run import CheckpointRef, Run
from loaders.rundir import is_run_dir
from loaders.safeio import check_regular, open_regular
from loaders.safetensors_file import check_safetensors_header
from loaders.torch_files import TORCH_SUFFIXES, load_torch_object

__all__ = ["FORMATS", "detect_format", "is_run", "open_run", "rank_logs", "read_checkpoints"]

FORMATS = ("rundir", "hf", "lightning", "tensorboard", "nanogpt", "llmc", "jsonl", "csv", "json", "checkpoint")

LOOKED_FOR = ("run.json (trainaudit run)", "trainer_state.json", "checkpoint-N/", "metrics.csv",
              "version_N/metrics.csv", "*tfevents*", "ckpt.pt", "out*/ckpt.pt", "checkpoints/", "model.safetensors", "pytorch_model.bin",
              "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.jsonl", "*.csv", "*.json", "*.log", "*.txt")
_CKPT_DIR_RE = re.compile(r"^checkpoint-\d+$")
_LOG_SUFFIXES = (".jsonl", ".csv", ".json", ".log", ".txt", ".ndjson")
# One log per DDP rank: metrics.rank0.jsonl, train_rank1.log, rank2.jsonl, log-rank-3.csv (row D13).
_RANK_RE = re.compile(r"^(?P<base>(?:.*?[._-])?)rank[_-]?(?P<rank>\d{1,4})(?P<ext>\.[A-Za-z0-9]+)$", re.I)
_NUMPY_MAGIC = b"\x93NUMPY"
_NUMPY_PROBLEM = "numpy array file: not a run format trainaudit reads (never loaded: object arrays would need pickle)"


def _peek(path: Path, n: int = 4096) -> bytes:
    with open_regular(path) as f:
        return f.read(n)


def _detect_file(p: Path) -> str:
    """The format of one file, by name and a peek at its first bytes (64 KiB for text logs)."""
    name = p.name.lower()
    if name.endswith((".npy", ".npz")):
        raise TrainauditError(p, _NUMPY_PROBLEM)
    if "tfevents" in name:
        return "tensorboard"
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return "checkpoint"
    if name.endswith(TORCH_SUFFIXES):
        if name == "ckpt.pt":
            return "nanogpt"
        return "checkpoint"  # nanoGPT-shaped dicts are recognised after loading (see _read_torch_file)
    head = _peek(p, 65536).lstrip(b"\xef\xbb\xbf").lstrip()
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
    if head.startswith(_NUMPY_MAGIC):
        raise TrainauditError(p, _NUMPY_PROBLEM)
    text = head.decode("utf-8", "replace")
    from loaders.formats.nanogpt import looks_like_nanogpt_log
    if not head.startswith((b"{", b"[")) and looks_like_nanogpt_log(text.splitlines()[:400]):
        return "nanogpt"
    lines = text.splitlines()[:50]
    from loaders.formats.textlogs import looks_like_llmc
    if looks_like_llmc(lines):
        return "llmc"
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"["):
        return "json"
    if lines and "," in lines[0] and "\x00" not in lines[0]:  # a binary file with a comma is not a CSV
        return "csv"
    raise TrainauditError(p, f"unrecognised file (looked for: {', '.join(LOOKED_FOR)})")


def _usable(f: Path, root: Path, warnings: DataWarnings) -> bool:
    """A regular file inside ``root``; otherwise warn ("symlink leaves run dir; skipped") and say no."""
    try:
        check_regular(f, root)
    except TrainauditError as e:
        warnings.add(f, e.problem)
        return False
    return True


def _folder_logs(p: Path, warnings: DataWarnings, suffixes: tuple[str, ...] = _LOG_SUFFIXES) -> list[Path]:
    """The log files directly in folder ``p`` that may be opened (refused ones are warned about)."""
    return [p / n for n in sorted(os.listdir(p)) if n.lower().endswith(suffixes) and _usable(p / n, p, warnings)]


def rank_logs(files: list[Path]) -> dict[int, Path] | None:
    """``{rank: path}`` when ``files`` are one log per DDP rank (same name but the rank number)."""
    groups: dict[tuple[str, str], dict[int, Path]] = {}
    for f in files:
        m = _RANK_RE.match(f.name)
        if m is None:
            return None
        groups.setdefault((m.group("base").lower(), m.group("ext").lower()), {})[int(m.group("rank"))] = f
    if len(groups) != 1:
        return None
    ranks = next(iter(groups.values()))
    return dict(sorted(ranks.items())) if len(ranks) >= 2 else None


@dataclass(frozen=True, slots=True)
class _Detected:
    """What ``open_run`` reads: a format, the path its reader gets, and per-rank logs (D13)."""

    format: str
    path: Path
    ranks: dict[int, Path] | None = None


def _skipped(warnings: DataWarnings, start: int) -> str:
    """The files detection refused, for the "no run data" message."""
    return f" (skipped: {'; '.join(warnings[start:start + 3])})" if len(warnings) > start else ""


def _detect(p: Path, warnings: DataWarnings) -> _Detected:
    if not p.exists() and not p.is_symlink():
        raise TrainauditError(p, "no such file or folder")
    if not p.is_dir():
        check_regular(p)
        return _Detected(_detect_file(p), p)
    from loaders.formats.hf_trainer import checkpoint_dirs
    from loaders.formats.lightning_csv import find_metrics_csv
    from loaders.formats.tensorboard import find_event_files

    if is_run_dir(p):
        return _Detected("rundir", p)
    if (p / "trainer_state.json").is_file() or checkpoint_dirs(p) or (
            _CKPT_DIR_RE.match(p.name) and (p / "trainer_state.json").is_file()):
        return _Detected("hf", p)
    if find_metrics_csv(p) is not None:
        return _Detected("lightning", p)
    if find_event_files(p):
        return _Detected("tensorboard", p)
    from loaders.formats.nanogpt import find_nanogpt
    ckpt, nano_logs = find_nanogpt(p)
    if ckpt is not None or nano_logs:
        return _Detected("nanogpt", p)
    if has_weights(p) or _checkpoint_subfolders(p):
        return _Detected("checkpoint", p)
    names = sorted(os.listdir(p))
    if any(n.endswith((".safetensors", *TORCH_SUFFIXES)) and not NOT_ANALYSED_RE.match(n) for n in names):
        return _Detected("checkpoint", p)
    start = len(warnings)
    logs = _folder_logs(p, warnings)
    if len(logs) == 1:
        return _Detected(_detect_file(logs[0]), logs[0])
    ranks = rank_logs(logs)
    if ranks is not None:
        fmt = _detect_file(next(iter(ranks.values())))
        fmt = "csv" if fmt == "lightning" else fmt   # a per-rank CSV is read as a plain CSV log
        if fmt in _LOG_READERS:
            return _Detected(fmt, p, ranks)
    if not names:
        raise TrainauditError(p, "no run data found (empty folder)")
    if len(logs) > 1:
        raise TrainauditError(p, f"no run data found: several logs ({', '.join(f.name for f in logs[:5])}); "
                                 f"give one file or --format")
    raise TrainauditError(p, f"no run data found{_skipped(warnings, start)} (looked for: {', '.join(LOOKED_FOR)})")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name in ``FORMATS`` that ``open_run`` would use for ``path``."""
    return _detect(Path(path), DataWarnings()).format


def is_run(path: str | os.PathLike[str]) -> bool:
    """True when ``open_run`` would recognise `path` (any supported format)."""
    try:
        detect_format(path)
    except (TrainauditError, OSError):
        return False
    return True


def _single_log(p: Path, suffixes: tuple[str, ...], warnings: DataWarnings) -> Path | dict[int, Path]:
    """The one log of a folder for a forced ``--format`` (or its per-rank logs)."""
    if not p.is_dir():
        return p
    logs = _folder_logs(p, warnings, suffixes)
    if len(logs) == 1:
        return logs[0]
    ranks = rank_logs(logs)
    if ranks is not None:
        return ranks
    raise TrainauditError(p, f"expected one {'/'.join(suffixes)} file, found {len(logs)}")


_STEP_DIR_RE = re.compile(r"^(checkpoint|ckpt|step|iter|iteration|epoch|global_step)[-_=]?\d+$", re.I)


def _checkpoint_subfolders(p: Path) -> bool:
    """Checkpoints of one run in sub-folders: a ``checkpoints/`` (``ckpt/`` ...) folder, or
    folders named by a step or save number (``checkpoint_3``, ``step_100``) holding weights."""
    if any((p / n).is_dir() and not (p / n).is_symlink() and _has_checkpoints(p / n) for n in CHECKPOINT_FOLDERS):
        return True
    try:
        subs = [p / n for n in os.listdir(p) if _STEP_DIR_RE.match(n)]
    except OSError:
        return False
    return any(has_weights(d) and not d.is_symlink() for d in subs)


def _has_checkpoints(d: Path) -> bool:
    try:
        names = os.listdir(d)
    except OSError:
        return False
    return any(n.endswith((".safetensors", *TORCH_SUFFIXES)) and not NOT_ANALYSED_RE.match(n) for n in names) or \
        any(has_weights(d / n) for n in names)


def read_checkpoints(path: str | os.PathLike[str], *, warnings: DataWarnings | None = None) -> Run:
    """A bare checkpoint file, an HF model folder, or a folder of checkpoints (files, checkpoint
    folders such as accelerate's ``checkpoint_N/``, or a ``checkpoints/`` sub-folder) -> ``Run``
    with checkpoints only (no loss curves), each at the step it records
    (``loaders.checkpoint_layout``). A torch file shaped like nanoGPT's ``ckpt.pt`` is read as a
    nanoGPT run."""
    p = Path(path)
    warnings = warnings if warnings is not None else DataWarnings()
    notes = ["checkpoints only: no training log, so no loss curves"]
    ckpts: list[CheckpointRef] = []
    skipped: list[str] = []
    if p.is_file():
        if p.name.lower().endswith(TORCH_SUFFIXES):
            obj = load_torch_object(p, warnings=warnings)
            from loaders.formats.nanogpt import is_nanogpt_dict, read_nanogpt
            if is_nanogpt_dict(obj):
                del obj
                return read_nanogpt(p, warnings=warnings)
            del obj
        step, _ = recorded_step(p)
        if step is None:
            notes.append(f"{p.name} records no step: shown as step 0")
        ckpts.append(CheckpointRef(step or 0, p, checkpoint_kind(p)))
    elif has_weights(p):
        skipped.extend(not_analysed(p))
        step, _ = recorded_step(p)
        if step is None:
            notes.append(f"{p.name} records no step: shown as step 0")
        ckpts.append(CheckpointRef(step or 0, p, checkpoint_kind(p)))
    else:
        ckpts = dedupe([*find_checkpoints(p, warnings=warnings, skipped=skipped),
                        *checkpoints_beside([p], root=p, warnings=warnings, skipped=skipped)], warnings)
    if not ckpts:
        raise TrainauditError(p, "no checkpoints found")
    run = build_run(p, "checkpoint", train=Triples(), evals=Triples(), warnings=warnings,
                    checkpoints=ckpts, notes=notes)
    run.not_analysed = skipped
    return run


def _read_rundir(p: Path) -> Run:
    from loaders import rundir
    return rundir.read_run_dir(p)


_LOG_READERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmc": ("read_llmc", (".log", ".txt")),
    "jsonl": ("read_jsonl", (".jsonl", ".ndjson", ".json")),
    "csv": ("read_csv_log", (".csv",)),
    "json": ("read_json_log", (".json",)),
}


def _read_log(fmt: str, target: Path | dict[int, Path], folder: Path | None, warnings: DataWarnings) -> Run:
    """One plain log (or one per rank) with the reader of ``fmt``; files must stay in ``folder``."""
    from loaders.formats import textlogs

    reader = getattr(textlogs, _LOG_READERS[fmt][0])
    if isinstance(target, dict):
        assert folder is not None
        return textlogs.read_rank_logs(folder, target, lambda r, f, w: reader(f, warnings=w, root=folder),
                                       warnings)
    return reader(target, warnings=warnings, root=folder)


def _readers() -> dict[str, Callable[[Path, DataWarnings], Run]]:
    from loaders.formats.hf_trainer import read_hf
    from loaders.formats.lightning_csv import read_lightning
    from loaders.formats.nanogpt import read_nanogpt
    from loaders.formats.tensorboard import read_tensorboard

    def log(fmt: str) -> Callable[[Path, DataWarnings], Run]:
        def read(p: Path, w: DataWarnings) -> Run:
            return _read_log(fmt, _single_log(p, _LOG_READERS[fmt][1], w), p if p.is_dir() else None, w)
        return read

    return {
        "rundir": lambda p, w: _read_rundir(p),
        "hf": lambda p, w: read_hf(p, warnings=w),
        "lightning": lambda p, w: read_lightning(p, warnings=w),
        "tensorboard": lambda p, w: read_tensorboard(p, warnings=w),
        "nanogpt": lambda p, w: read_nanogpt(p, warnings=w),
        "llmc": log("llmc"),
        "jsonl": log("jsonl"),
        "csv": log("csv"),
        "json": log("json"),
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
    warnings = DataWarnings()
    if format is not None:
        run = _readers()[format](p, warnings)
        fmt = format
    else:
        found = _detect(p, warnings)
        fmt = found.format
        if fmt in _LOG_READERS and p.is_dir():  # the log (or per-rank logs) detection already chose
            run = _read_log(fmt, found.ranks if found.ranks is not None else found.path, p, warnings)
        else:
            run = _readers()[fmt](found.path, warnings)
    run.meta.setdefault("detected_format", fmt)
    return run
