"""Safe file access for untrusted runs: regular files only, bounded reads, atomic writes.

Every reader, the logger, the cache and the report writer go through this module (bad-inputs.md
rows A12-A14). Standard library only: the in-loop logger imports it.

* ``check_regular`` / ``open_regular`` refuse symlinks that leave the run folder, FIFOs,
  devices, sockets and directories by raising ``TrainauditError`` (callers that scan a folder
  turn it into a warning and skip the file). The type is checked with ``lstat``/``stat`` before
  ``open`` and again with ``fstat`` after an ``O_NONBLOCK`` open, so a FIFO can never block and
  a file swapped between the two checks is still refused.
* ``read_bounded`` reads at most the size seen at open (``st_size`` snapshot), so
  ``/dev/zero`` or a log still being appended to cannot make a read run forever.
* ``write_atomic`` / ``atomic_path`` write a temp file in the same folder, fsync it and
  ``os.replace`` it onto the final name: a kill leaves the old file or the new one.
* Line streaming is ``loaders.lines``; step values and the resume policy are ``loaders.steps``.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import re
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from loaders.errors import TrainauditError

__all__ = [
    "TEMP_MARK",
    "atomic_path",
    "check_regular",
    "fsync_dir",
    "is_temp_name",
    "open_regular",
    "prefetched",
    "read_bounded",
    "write_atomic",
]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _stat(stat_fn: Any, p: Path, missing: str) -> os.stat_result:
    """``stat_fn(p)`` (``os.stat`` or ``os.lstat``) with its errors as ``TrainauditError``."""
    try:
        return stat_fn(p)
    except FileNotFoundError:
        raise TrainauditError(p, missing) from None
    except PermissionError:
        raise TrainauditError(p, "permission denied") from None
    except OSError as e:
        raise TrainauditError(p, f"cannot stat ({e.strerror or e})") from None


def check_regular(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> os.stat_result:
    """Stat ``path`` without opening it; raise ``TrainauditError`` unless it is a safe regular file.

    Refused: a missing file, a symlink (or ``..`` path) that resolves outside ``root``, anything
    that is not a regular file after following links (FIFO, device, socket, directory).
    Returns the ``stat`` of the target.
    """
    p = Path(path)
    lst = _stat(os.lstat, p, "file not found")
    if root is not None:
        real_root = Path(os.path.realpath(root))
        real = Path(os.path.realpath(p))
        if not _inside(real, real_root):
            what = "symlink leaves run dir" if stat.S_ISLNK(lst.st_mode) else "path leaves run dir"
            raise TrainauditError(p, f"{what}; skipped")
    st = _stat(os.stat, p, "dangling symlink; skipped")
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


# safetensors' own writer (Rust `tempfile`) first writes ".tmp" + 6 random characters beside the
# target; a kill at that moment leaves one behind.
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_temp_name(name: str) -> bool:
    """True for the name of an unfinished atomic write (a process killed while writing)."""
    return name.startswith(".") and (TEMP_MARK in name or _SAFETENSORS_TEMP.fullmatch(name) is not None)


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
    with atomic_path(path, what=what) as tmp, open(tmp, "xb") as f:
        f.write(raw)
    return Path(path)


_T = TypeVar("_T")
_DONE = object()


def prefetched(items: Iterable[_T], depth: int = 1) -> Iterator[_T]:
    """The items of `items`, produced up to `depth` ahead by a background thread.

    Overlaps reading the next tensor (pread releases the GIL) with computing on this one, so a
    weight analysis costs about max(read, compute) instead of their sum.
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
