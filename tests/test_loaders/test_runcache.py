"""The loaded-run cache: a run read back from the cache equals the run its loader returns, field
by field and table by table (dtypes included); its key follows the files, not the report folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loaders import runcache
from loaders.rundir import load_run
from loaders.runcache import cached_loader, load_cached_run, run_cache_key, store_run


def _assert_same_run(a, b) -> None:
    for field in ("path", "name", "source_format", "checkpoints", "class_names", "model", "eval_set_path",
                  "window_averaged", "notes", "not_analysed"):
        assert getattr(a, field) == getattr(b, field), field
    assert list(a.warnings) == list(b.warnings)
    for t in ("scalars", "evals", "class_losses", "eval_class_losses", "grad_norms"):
        pd.testing.assert_frame_equal(getattr(a, t), getattr(b, t), check_dtype=True, obj=t)
    assert a.meta.keys() == b.meta.keys()
    for k, v in a.meta.items():
        if isinstance(v, pd.DataFrame):
            pd.testing.assert_frame_equal(v, b.meta[k], obj=k)
        else:
            assert v == b.meta[k] or (v != v and b.meta[k] != b.meta[k]), k


def _jsonl(path: Path, n: int = 300) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        rec = {"step": i, "loss": float(3 - i / n + rng.normal(0, 0.05)), "lr": 1e-3, "tokens_seen": i * 512}
        if i % 50 == 0:
            rec["val_loss"] = float(3.1 - i / n)
        if i == 7:
            rec["loss"] = float("nan")
        lines.append(json.dumps(rec))
    lines.insert(40, "{not json")  # a data warning that must come back from the cache too
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def _cache_small_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runcache, "MIN_ROWS", 0)


def test_a_jsonl_log_comes_back_equal(tmp_path: Path) -> None:
    log = _jsonl(tmp_path / "log.jsonl")
    fresh = load_run(log)
    assert len(fresh.warnings) == 1 and isinstance(fresh.meta.get("extra_scalars"), pd.DataFrame)
    key = run_cache_key(log, None)
    assert store_run(fresh, key, tmp_path / "cache")
    _assert_same_run(fresh, load_cached_run(key, tmp_path / "cache"))


def test_a_run_directory_with_checkpoints_comes_back_equal(tiny_demo_run: Path, tmp_path: Path) -> None:
    fresh = load_run(tiny_demo_run)
    assert fresh.checkpoints and len(fresh.class_losses)
    key = run_cache_key(tiny_demo_run, None)
    assert store_run(fresh, key, tmp_path)
    _assert_same_run(fresh, load_cached_run(key, tmp_path))


def test_the_key_follows_the_files_but_not_the_report_folder_inside_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _jsonl(run / "log.jsonl")
    key = run_cache_key(run, None, skip=run / "report")
    (run / "report").mkdir()
    (run / "report" / "report.html").write_text("x")
    assert run_cache_key(run, None, skip=run / "report") == key
    assert run_cache_key(run, "jsonl", skip=run / "report") != key  # the --format override counts
    st = (run / "log.jsonl").stat()
    os.utime(run / "log.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert run_cache_key(run, None, skip=run / "report") != key


def test_a_changed_log_is_parsed_again_and_a_broken_entry_is_ignored(tmp_path: Path) -> None:
    log = _jsonl(tmp_path / "log.jsonl", 200)
    calls = []

    def load():
        calls.append(1)
        return load_run(log)

    first = cached_loader(load, log, None, tmp_path / "cache")
    again = cached_loader(load, log, None, tmp_path / "cache")
    assert len(calls) == 1
    _assert_same_run(first, again)
    _jsonl(log, 260)  # the log grew: parsed again, and the new rows are there
    grown = cached_loader(load, log, None, tmp_path / "cache")
    assert len(calls) == 2 and grown.scalars["step"].max() == 259
    assert len(list((tmp_path / "cache").glob("run-*.json"))) == 1  # the stale entry is gone
    for npy in (tmp_path / "cache").glob("run-*-scalars-*.npy"):
        npy.write_bytes(npy.read_bytes()[:60])  # torn column files: read from the log instead
    again = cached_loader(load, log, None, tmp_path / "cache")
    assert len(calls) == 3
    _assert_same_run(grown, again)


def test_small_runs_and_fields_the_format_cannot_hold_are_not_stored(tmp_path: Path, monkeypatch) -> None:
    run = load_run(_jsonl(tmp_path / "log.jsonl"))
    run.meta["odd"] = {1, 2}  # a set has no exact JSON form
    assert not store_run(run, "k", tmp_path / "cache")
    assert load_cached_run("k", tmp_path / "cache") is None
    del run.meta["odd"]
    monkeypatch.setattr(runcache, "MIN_ROWS", 10_000)
    assert not store_run(run, "k", tmp_path / "cache")
