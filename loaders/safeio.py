"""Safe file access for untrusted runs: regular files only, bounded reads, streamed lines.

Every reader in ``loaders/`` opens user files through this module (bad-inputs.md rows A12-A14,
D1-D14):

* ``open_regular`` refuses symlinks that leave the run folder, FIFOs, devices, sockets and
  directories by raising ``TrainauditError`` (callers that scan a folder turn it into a warning
  and skip the file). The type is checked with ``lstat``/``stat`` before ``open`` and again with
  ``fstat`` after an ``O_NONBLOCK`` open, so a FIFO can never block and a file swapped between
  the two checks is still refused.
* ``read_bounded`` and ``iter_lines`` read at most the size seen at open (``st_size`` snapshot),
  so ``/dev/zero`` or a log still being appended to cannot make a read run forever or change the
  result.
* ``iter_lines`` streams one line at a time with a length cap, handles a UTF-8 BOM, CRLF, NUL
  padding and a torn final line, and reports each repair in ``DataWarnings``.
* ``resolve_rewinds`` applies the resume policy ("later wins") shared by every log reader.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import stat
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pandas as pd

from loaders.errors import DataWarnings, TrainauditError

__all__ = [
    "MAX_LINE",
    "check_regular",
    "open_regular",
    "prefetched",
    "read_bounded",
    "iter_lines",
    "iter_line_batches",
    "parse_json_line",
    "coerce_step",
    "coerce_steps",
    "STEP_REASONS",
    "resolve_rewinds",
    "rewind_groups",
    "rewind_keep",
    "warn_rewinds",
    "TEMP_MARK",
    "atomic_path",
    "fsync_dir",
    "is_temp_name",
    "write_atomic",
]

MAX_LINE = 1 << 20          # longest accepted log line (bytes); longer lines are skipped
_CHUNK = 1 << 20            # read size of the line streamer
_MAX_REWIND_WARNINGS = 20   # further rewinds are summarised in one warning
_INT64_MAX = 2**63 - 1
_BOM = b"\xef\xbb\xbf"


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_regular(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> os.stat_result:
    """Stat ``path`` without opening it; raise ``TrainauditError`` unless it is a safe regular file.

    Refused: a missing file, a symlink (or ``..`` path) that resolves outside ``root``, anything
    that is not a regular file after following links (FIFO, device, socket, directory).
    Returns the ``stat`` of the target.
    """
    p = Path(path)
    try:
        lst = os.lstat(p)
    except FileNotFoundError:
        raise TrainauditError(p, "file not found") from None
    except PermissionError:
        raise TrainauditError(p, "permission denied") from None
    except OSError as e:
        raise TrainauditError(p, f"cannot stat ({e.strerror or e})") from None
    if root is not None:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(p))
        if not _inside(real, real_root):
            what = "symlink leaves run dir" if stat.S_ISLNK(lst.st_mode) else "path leaves run dir"
            raise TrainauditError(p, f"{what}; skipped")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise TrainauditError(p, "dangling symlink; skipped") from None
    except PermissionError:
        raise TrainauditError(p, "permission denied") from None
    except OSError as e:
        raise TrainauditError(p, f"cannot stat ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise TrainauditError(p, f"not a regular file ({kind}); skipped")
    return st


def open_regular(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> BinaryIO:
    """Open a regular file for binary reading, or raise ``TrainauditError`` (never blocks).

    Policy (documented choice): refusal is an exception, not ``None``; a folder scanner catches
    it and records ``"<path>: symlink leaves run dir; skipped"`` / ``"not a regular file"`` as a
    warning. The returned file's ``st_size`` at open is available as ``f.snapshot_size``.
    """
    p = Path(path)
    before = check_regular(p, root)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except PermissionError:
        raise TrainauditError(p, "permission denied") from None
    except OSError as e:
        raise TrainauditError(p, f"cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_dev) != (before.st_ino, before.st_dev):
            raise TrainauditError(p, "file changed while being opened; skipped")
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    f = io.BufferedReader(f, buffer_size=1 << 16)  # type: ignore[arg-type]
    f.snapshot_size = st.st_size  # type: ignore[attr-defined]
    return f  # type: ignore[return-value]


TEMP_MARK = ".tmp-"              # a temp file of an atomic write: ".<name>.tmp-<pid>-<n>"
_TEMP_IDS = itertools.count()


def is_temp_name(name: str) -> bool:
    """True for the name of an unfinished atomic write (a process killed while writing)."""
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in folder `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, what: str = "file") -> Iterator[Path]:
    """A temp path in `path`'s folder to write; on success it is fsynced and renamed onto `path`.

    A kill at any moment leaves the old file or the new one under the final name, never a torn
    one. On failure the temp file is removed and the old file stays; an ``OSError`` becomes
    ``TrainauditError("<path>: cannot write <what>: <reason>")``.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}-{next(_TEMP_IDS)}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TrainauditError(final, f"cannot write {what}: {(exc.strerror or str(exc)).lower()}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, what: str = "file") -> Path:
    """Write `data` (a str as UTF-8) to `path` atomically (``atomic_path``); returns the path.

    Raises ``TrainauditError`` naming the file when it cannot be written.
    """
    raw = data.encode("utf-8", errors="replace") if isinstance(data, str) else data
    with atomic_path(path, what=what) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return Path(path)


_T = TypeVar("_T")
_DONE = object()


def prefetched(items: Iterable[_T], depth: int = 1) -> Iterator[_T]:
    """The items of `items`, produced up to `depth` ahead by a background thread.

    Overlaps reading the next tensor (pread releases the GIL) with computing on this one, so a
    weight analysis costs about max(read, compute) instead of their sum (issue 7, target 2).
    At most ``depth + 2`` items are alive at once (the caller's, ``depth`` queued, one being
    produced). An exception in the producer is re-raised here, after the items before it;
    closing this iterator early stops the producer.
    """
    import queue

    slots: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((False, exc))
            return
        put((True, _DONE))

    worker = threading.Thread(target=produce, name="trainaudit-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = slots.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def read_bounded(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
                 max_bytes: int | None = None) -> bytes:
    """Whole contents of a regular file, at most its size at open (and at most ``max_bytes``).

    A file larger than ``max_bytes`` raises ``TrainauditError`` instead of being read.
    """
    with open_regular(path, root) as f:
        size = f.snapshot_size  # type: ignore[attr-defined]
        if max_bytes is not None and size > max_bytes:
            raise TrainauditError(path, f"file too large ({size} bytes; limit {max_bytes})")
        chunks: list[bytes] = []
        left = size
        while left > 0:
            b = f.read(min(left, 1 << 24))
            if not b:
                break  # the file shrank after the snapshot: keep what is there
            chunks.append(b)
            left -= len(b)
    return b"".join(chunks)


def _decode(raw: bytes, lineno: int, path: Path, warnings: DataWarnings, state: dict[str, Any]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if not state.get("bad_utf8"):
            warnings.add(path, "invalid UTF-8 bytes replaced", line=lineno)
        state["bad_utf8"] = True
        return raw.decode("utf-8", errors="replace")


def _slow_lines(block: bytes, lineno: int, p: Path, warnings: DataWarnings, max_line: int,
                state: dict[str, Any], nul_lines: list[int]) -> list[tuple[int, list[str]]]:
    """Complete lines of ``block`` one by one: overlong lines, NUL bytes, bad UTF-8, CR, BOM."""
    out: list[tuple[int, list[str]]] = []
    cur: list[str] = []
    start = lineno + 1
    for part in block.split(b"\n"):
        lineno += 1
        if len(part) > max_line:
            if cur:
                out.append((start, cur))
            cur, start = [], lineno + 1
            warnings.add(p, f"line {lineno} exceeds {_human(max_line)}, skipped")
            continue
        if part.endswith(b"\r"):
            part = part[:-1]
        if lineno == 1 and part.startswith(_BOM):
            part = part[3:]
        if b"\x00" in part:
            nul_lines.append(lineno)
            part = part.replace(b"\x00", b"")
            if not part:
                if cur:
                    out.append((start, cur))
                cur, start = [], lineno + 1
                continue
        cur.append(_decode(part, lineno, p, warnings, state))
    if cur:
        out.append((start, cur))
    return out


def _block_lines(block: bytes, lineno: int, p: Path, warnings: DataWarnings, max_line: int,
                 state: dict[str, Any], nul_lines: list[int]) -> list[tuple[int, list[str]]]:
    """Complete lines of ``block`` (newline-separated, no trailing newline) after ``lineno``.

    Fast path: one decode and one split for the whole block when it has no NUL byte, valid
    UTF-8 and no line that could exceed the cap; otherwise line by line.
    """
    if b"\x00" not in block:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            strs = text.split("\n")
            if max(map(len, strs)) * 4 <= max_line:  # a char is at most 4 UTF-8 bytes
                if "\r" in text:
                    strs = [x[:-1] if x.endswith("\r") else x for x in strs]
                if lineno == 0 and strs[0].startswith("\ufeff"):
                    strs[0] = strs[0][1:]
                return [(lineno + 1, strs)]
    return _slow_lines(block, lineno, p, warnings, max_line, state, nul_lines)


def iter_line_batches(path: str | os.PathLike[str], warnings: DataWarnings, *,
                      root: str | os.PathLike[str] | None = None, max_line: int = MAX_LINE,
                      keep_unterminated: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Stream a text file as batches of lines: ``(first_line_number, [line, ...])``.

    Lines are numbered from 1 and a batch holds consecutive lines only (a skipped line starts a
    new batch). See ``iter_lines`` for the repairs; this form saves a Python call per line.
    """
    p = Path(path)
    state: dict[str, Any] = {}
    nul_lines: list[int] = []
    with open_regular(p, root) as f:
        left = f.snapshot_size  # type: ignore[attr-defined]
        carry = b""            # partial line so far (at most max_line bytes)
        skipping = False       # inside an overlong line whose start was dropped
        lineno = 0             # number of the last completed line
        while left > 0:
            data = f.read(min(_CHUNK, left))
            if not data:
                break  # the file shrank after the snapshot
            left -= len(data)
            nl = data.rfind(b"\n")
            if nl < 0:  # no line ends in this chunk
                if not skipping:
                    if len(carry) + len(data) > max_line:
                        skipping, carry = True, b""
                    else:
                        carry += data
                continue
            head, tail = data[:nl], data[nl + 1:]
            block: bytes | None
            if skipping:
                lineno += 1
                warnings.add(p, f"line {lineno} exceeds {_human(max_line)}, skipped")
                skipping = False
                k = head.find(b"\n")
                block = None if k < 0 else head[k + 1:]
            else:
                block = carry + head
            carry = b""
            if block is not None:
                batches = _block_lines(block, lineno, p, warnings, max_line, state, nul_lines)
                lineno += block.count(b"\n") + 1
                yield from batches
            if len(tail) > max_line:
                skipping = True
            else:
                carry = tail
        if nul_lines:
            span = f"{nul_lines[0]}" if len(nul_lines) == 1 else f"{nul_lines[0]}-{nul_lines[-1]}"
            warnings.add(p, f"NUL bytes ignored (line{'s' if len(nul_lines) > 1 else ''} {span})")
        if skipping:
            warnings.add(p, f"line {lineno + 1} exceeds {_human(max_line)}, skipped")
        elif carry:
            lineno += 1
            if carry.endswith(b"\r"):
                carry = carry[:-1]
            if lineno == 1 and carry.startswith(_BOM):
                carry = carry[3:]
            body = carry.replace(b"\x00", b"")
            if not body.strip():
                if b"\x00" in carry:
                    warnings.add(p, "NUL bytes at end of file ignored", line=lineno)
            elif keep_unterminated:
                yield lineno, [_decode(body, lineno, p, warnings, state)]
            else:
                warnings.add(p, "incomplete final line ignored", line=lineno)


def iter_lines(path: str | os.PathLike[str], warnings: DataWarnings, *,
               root: str | os.PathLike[str] | None = None, max_line: int = MAX_LINE,
               keep_unterminated: bool = False) -> Iterator[tuple[int, str]]:
    """Stream ``(line_number, text)`` pairs of a text log with bounded memory.

    Repairs, each reported in ``warnings``: a line longer than ``max_line`` bytes is skipped
    ("line N exceeds 1 MiB, skipped"); a UTF-8 BOM and CR of CRLF are removed; NUL bytes
    (preallocated or torn tails) are dropped; a final line without newline is ignored
    ("<file>:<N>: incomplete final line ignored") unless ``keep_unterminated``. Only the bytes
    present at open are read (a concurrent writer cannot change the result). Empty lines are
    yielded as "" so callers can count them.
    """
    for start, lines in iter_line_batches(path, warnings, root=root, max_line=max_line,
                                          keep_unterminated=keep_unterminated):
        yield from enumerate(lines, start)


class _DupKeys:
    """``object_pairs_hook`` that records duplicate keys (Python keeps the last silently)."""

    __slots__ = ("dups",)

    def __init__(self) -> None:
        self.dups: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.dups.append(k)
                seen.add(k)
        return d


_LOCAL = threading.local()
_SLOW = object()  # parse_json_line: the fast path gave no value


def _decoder() -> tuple[json.JSONDecoder, _DupKeys]:
    """One decoder per thread: ``json.loads(..., object_pairs_hook=)`` would build one per call."""
    d = getattr(_LOCAL, "decoder", None)
    if d is None:
        hook = _DupKeys()
        d = _LOCAL.decoder = (json.JSONDecoder(object_pairs_hook=hook), hook)
    return d


def parse_json_line(text: str, warnings: DataWarnings, path: str | os.PathLike[str],
                    lineno: int | None) -> dict[str, Any] | None:
    """Parse one JSONL record; ``None`` (with a warning naming file and line) if unusable.

    A blank line gives ``None`` without a warning.
    ``NaN``, ``Infinity`` and ``-Infinity`` tokens are accepted (Python's json and Transformers
    write them); duplicate keys keep the last value and are warned about.
    """
    decoder, hook = _decoder()
    hook.dups.clear()
    try:  # the C scanner directly: JSONDecoder.decode adds two whitespace regexes per line
        obj, end = decoder.scan_once(text, 0)
        if end != len(text) and text[end:].strip():
            obj = _SLOW
    except (StopIteration, ValueError, RecursionError):
        obj = _SLOW
    if obj is _SLOW:  # leading blanks, a blank line or an error: the documented way, for its message
        if not text.strip():
            return None
        hook.dups.clear()
        try:
            obj = decoder.decode(text)
        except json.JSONDecodeError as e:
            warnings.add(path, f"not valid JSON ({e.msg} at column {e.colno}), skipped", line=lineno)
            return None
        except (ValueError, RecursionError) as e:
            warnings.add(path, f"not valid JSON ({type(e).__name__}), skipped", line=lineno)
            return None
    if type(obj) is not dict:
        warnings.add(path, f"not a JSON object ({type(obj).__name__}), skipped", line=lineno)
        return None
    if hook.dups:
        names = ", ".join(sorted(set(hook.dups)))
        warnings.add(path, f"duplicate keys {names} (last value kept)", line=lineno)
    return obj


def coerce_step(v: Any) -> tuple[int | None, str | None]:
    """One step value -> (int, None) or (None, reason)."""
    if isinstance(v, bool) or v is None:
        return None, "non-numeric"
    if isinstance(v, (int, np.integer)):
        v = int(v)
    elif isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return None, "non-numeric"
        if math.isinf(v) or abs(v) > _INT64_MAX:
            return None, "out of range"
        if not float(v).is_integer():
            return None, "non-integer"
        v = int(v)
    elif isinstance(v, str):
        s = v.strip()
        try:
            v = int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                return None, "non-numeric"
            return coerce_step(f)
    else:
        return None, "non-numeric"
    if v > _INT64_MAX or v < -_INT64_MAX - 1:
        return None, "out of range"
    if v < 0:
        return None, "negative"
    return v, None


STEP_REASONS = {
    "non-numeric": "with a missing or non-numeric step skipped",
    "non-integer": "with a non-integer step skipped",
    "out of range": "with step out of range (beyond int64) skipped",
    "negative": "with a negative step dropped",
}


def coerce_steps(values: Any, path: str | os.PathLike[str], warnings: DataWarnings) -> tuple[np.ndarray, np.ndarray]:
    """Steps as int64 plus a keep mask; bad steps are counted into one warning per kind.

    Accepted: integers and integer-valued floats or strings ("2", 3.0) in 0..2^63-1. Dropped
    with a warning: missing/non-numeric, non-integer (2.5), negative, beyond int64 (D5, D7, D8).
    """
    arr = np.asarray(values)
    n = arr.shape[0]
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u":
            big = arr > _INT64_MAX
            steps = np.where(big, 0, arr).astype(np.int64)
            keep = ~big
            reasons = {"out of range": int(big.sum())}
        else:
            steps = arr.astype(np.int64)
            keep = steps >= 0
            reasons = {"negative": int((~keep).sum())}
    elif arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(arr)
            inrange = finite & (np.abs(np.where(finite, arr, 0.0)) <= float(_INT64_MAX) * (1 - 1e-15))
            whole = inrange & (np.floor(np.where(inrange, arr, 0.0)) == np.where(inrange, arr, 0.0))
            neg = whole & (arr < 0)
        steps = np.where(whole, arr, 0.0).astype(np.int64)
        keep = whole & ~neg
        reasons = {"non-numeric": int(np.isnan(arr).sum()),
                   "out of range": int((~np.isnan(arr) & ~inrange).sum()),
                   "non-integer": int((inrange & ~whole).sum()), "negative": int(neg.sum())}
    else:
        values_list = arr.tolist()
        kinds = set(map(type, values_list))
        if kinds and (kinds <= {int} or kinds <= {str}):
            try:  # fast path: all Python ints or all integer strings
                steps = np.array(values_list, dtype=np.int64)
                keep = steps >= 0
                n_neg = int((~keep).sum())
                if n_neg:
                    warnings.add(path, f"{n_neg} row{'s' if n_neg > 1 else ''} {STEP_REASONS['negative']}")
                return steps, keep
            except (ValueError, OverflowError, TypeError):
                pass
        steps = np.zeros(n, dtype=np.int64)
        keep = np.zeros(n, dtype=bool)
        reasons = {}
        for i, v in enumerate(values_list):
            s, why = coerce_step(v)
            if why is None:
                steps[i] = s
                keep[i] = True
            else:
                reasons[why] = reasons.get(why, 0) + 1
    for why, count in reasons.items():
        if count:
            warnings.add(path, f"{count} row{'s' if count > 1 else ''} {STEP_REASONS[why]}")
    return steps, keep


def _rewinds(steps: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Keep mask ("later wins") and (resume step, last overwritten step) per rewind."""
    n = steps.shape[0]
    if n == 0:
        return np.ones(0, dtype=bool), []
    if n == 1 or bool((steps[1:] > steps[:-1]).all()):  # the usual log: no copies, no events
        return np.ones(n, dtype=bool), []
    # A row survives iff every later row has a larger step: the later timeline overwrites it.
    later_min = np.empty(n, dtype=np.int64)
    later_min[-1] = np.iinfo(np.int64).max
    if n > 1:
        later_min[:-1] = np.minimum.accumulate(steps[::-1])[::-1][1:]
    keep = steps < later_min
    points = np.flatnonzero(steps[1:] <= steps[:-1]) + 1  # the step goes back or repeats
    # The timeline just before a resume is the segment since the previous resume (older rows at
    # or above that segment's first step were overwritten already), so its maximum ends the overlap.
    starts = np.concatenate(([0], points))[:-1]
    events = [(int(steps[p]), int(steps[a:p].max())) for a, p in zip(starts, points, strict=True)]
    return keep, events


def rewind_keep(steps_raw: Any, codes: np.ndarray | None, path: str | os.PathLike[str],
                warnings: DataWarnings) -> tuple[np.ndarray, np.ndarray]:
    """Numpy core of ``resolve_rewinds``: (indices of surviving rows in file order, their int64 steps).

    ``codes``: an int group code per row (e.g. the series), or None for one group.
    """
    steps, ok = coerce_steps(steps_raw, path, warnings)
    idx_ok = np.flatnonzero(ok)
    s = steps[idx_ok]
    events: list[tuple[int, int]] = []
    if codes is None:
        keep, events = _rewinds(s)
    else:
        c = np.asarray(codes)[idx_ok]
        keep = np.ones(s.shape[0], dtype=bool)
        merged: Counter[tuple[int, int]] = Counter()
        for g in np.unique(c):
            idx = np.flatnonzero(c == g)
            k, ev = _rewinds(s[idx])
            keep[idx] = k
            merged |= Counter(ev)  # the same resume seen by several series is reported once
        events = sorted(merged.elements())
    warn_rewinds(events, path, warnings)
    return idx_ok[keep], s[keep]


def rewind_groups(groups: list[np.ndarray], path: str | os.PathLike[str],
                  warnings: DataWarnings) -> list[np.ndarray | None]:
    """The resume policy applied to several series of valid int64 steps (file order each), one
    series at a time (no concatenated copy): per series the keep mask, or None when every row is
    kept. A resume seen by several series is reported once."""
    merged: Counter[tuple[int, int]] = Counter()
    out: list[np.ndarray | None] = []
    for steps in groups:
        keep, events = _rewinds(steps)
        merged |= Counter(events)
        out.append(None if not events else keep)
    warn_rewinds(sorted(merged.elements()), path, warnings)
    return out


def warn_rewinds(events: list[tuple[int, int]], path: str | os.PathLike[str], warnings: DataWarnings) -> None:
    """One warning per resume, ``"resume at step 5 (overlap 5-9)"`` (the first 20, then a count)."""
    for a, b in events[:_MAX_REWIND_WARNINGS]:
        warnings.add(path, f"resume at step {a} (overlap {a}-{b})" if a != b else
                     f"resume at step {a} (overlap {a})")
    if len(events) > _MAX_REWIND_WARNINGS:
        warnings.add(path, f"{len(events) - _MAX_REWIND_WARNINGS} more resumes (later values kept)")


def resolve_rewinds(df: pd.DataFrame, path: str | os.PathLike[str], warnings: DataWarnings, *,
                    by: str | None = None, step_col: str = "step") -> pd.DataFrame:
    """Apply the resume policy to a table in file order (bad-inputs.md D7, D8, D16).

    Steps are coerced to int64 (``coerce_steps``). When a step goes back (a resumed run) or
    repeats, the later timeline wins: earlier rows at steps >= the resume step are dropped and
    one warning per resume says ``"resume at step 5 (overlap 5-9)"``. With ``by`` (e.g.
    ``"series"``) the policy is applied within each group and identical warnings are merged.
    Returns a new frame in file order with an int64 step column.
    """
    codes = None if by is None else pd.factorize(df[by], use_na_sentinel=False)[0]
    rows, steps = rewind_keep(df[step_col].to_numpy(), codes, path, warnings)
    out = df.iloc[rows].reset_index(drop=True)
    out[step_col] = steps
    return out
