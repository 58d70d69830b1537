"""The one atomic write (loaders.safeio.write_atomic / atomic_path) and its users: the logger's
run.json and checkpoints, and the analysis cache. A failed write leaves the previous file and no
temp file, and says which file in one line; the cache swallows the failure (it only saves time).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import loaders.safeio as safeio
from loaders.errors import TrainauditError
from loaders.safeio import atomic_path, is_temp_name, write_atomic


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes(b"old")
    assert write_atomic(p, "h\u00e9 \ud800") == p            # str: UTF-8, a lone surrogate replaced
    assert p.read_bytes() == "h\u00e9 ?".encode()
    assert write_atomic(p, b"\x00\xff") == p
    assert p.read_bytes() == b"\x00\xff"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_a_failed_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "summary.json"
    p.write_bytes(b"previous")
    monkeypatch.setattr(safeio.os, "fsync", _no_space)
    with pytest.raises(TrainauditError) as err:
        write_atomic(p, b"new", what="report")
    assert str(err.value) == f"{p}: cannot write report: no space left on device"
    monkeypatch.undo()
    assert p.read_bytes() == b"previous" and os.listdir(tmp_path) == ["summary.json"]


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrainauditError, match=r"nope/x\.bin: cannot write file: no such file or directory$"):
        write_atomic(tmp_path / "nope" / "x.bin", b"1")


def test_an_exception_inside_atomic_path_removes_the_temp(tmp_path: Path) -> None:
    with pytest.raises(KeyError), atomic_path(tmp_path / "ck.safetensors") as tmp:
        tmp.write_bytes(b"half")
        assert is_temp_name(tmp.name) and tmp.parent == tmp_path
        raise KeyError("interrupted")
    assert os.listdir(tmp_path) == []


def test_temp_names_are_unique_per_write(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x") as a, atomic_path(tmp_path / "x") as b:
        assert a != b                      # two threads of one process never share a temp file
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert (tmp_path / "x").read_bytes() == b"a"    # the outer write finishes last


def test_logger_checkpoint_write_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loaders import RunLogger

    with RunLogger(tmp_path / "run") as log:
        first = log.save_checkpoint(1, {"w": torch.ones(3)})
        old = first.read_bytes()
        monkeypatch.setattr(safeio.os, "replace", _no_space)
        with pytest.raises(TrainauditError, match=r"step_00000001\.safetensors: cannot write checkpoint: no space"):
            log.save_checkpoint(1, {"w": torch.zeros(3)})
        monkeypatch.undo()
    assert first.read_bytes() == old
    assert not [n for n in os.listdir(first.parent) if is_temp_name(n)]


def test_logger_removes_stale_temp_files_on_open(tmp_path: Path) -> None:
    from loaders import RunLogger

    run = tmp_path / "run"
    with RunLogger(run):
        pass
    stale = [run / ".run.json.tmp-123-0", run / "checkpoints" / ".step_00000005.safetensors.tmp-9-4"]
    for p in stale:
        p.write_bytes(b"torn")
    keep = [run / "checkpoints" / "notes.tmp-1", run / "checkpoints" / ".tmpABCDEFG"]  # not temp names: kept
    for p in keep:
        p.write_bytes(b"x")
    with RunLogger(run):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_safetensors_own_temp_file_left_by_a_kill_is_removed(tmp_path: Path) -> None:
    """safetensors writes ".tmp" + 6 random characters beside its target first (seen with strace);
    a SIGKILL during a checkpoint save leaves that file behind, and a restart removes it."""
    from loaders import RunLogger

    run = tmp_path / "run"
    with RunLogger(run):
        pass
    left = run / "checkpoints" / ".tmpdEvsOy"                      # the name a SIGKILL left in CI
    left.write_bytes(b"torn")
    assert is_temp_name(left.name)
    with RunLogger(run):
        pass
    assert not left.exists()


def test_cache_write_failure_does_not_abort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from analyze.pipeline.cache import CheckpointCache

    cache = CheckpointCache(tmp_path / "cache")
    monkeypatch.setattr(safeio.os, "fsync", _no_space)
    cache.store(10, "k" * 20, {"spectral": [{"a": 1.0}]}, {"v": torch.ones(2)}, [])   # no exception
    cache.store_doc("class_tables", "k" * 20, {"x": 1})
    monkeypatch.undo()
    assert os.listdir(tmp_path / "cache") == []                 # nothing half-written, no temp left
    cache.store_doc("class_tables", "k" * 20, {"x": 1})
    assert cache.load_doc("class_tables", "k" * 20) == {"x": 1}
