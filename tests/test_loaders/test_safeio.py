"""loaders.safeio, loaders.lines, loaders.steps: regular files only, bounded reads, atomic writes,
streamed lines, step values and the rewind policy.

bad-inputs.md rows A12-A14 (escapes), D1, D4, D6-D9, D11, D14. References are independent:
``bytes.split`` for line streaming, a dictionary timeline replayed row by row for rewinds.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loaders.lines as lines_mod
import loaders.safeio as safeio
from loaders.errors import DataWarnings, TrainauditError
from loaders.lines import iter_lines, parse_json_line
from loaders.safeio import check_regular, open_regular, read_bounded
from loaders.steps import coerce_steps, resolve_rewinds

# --------------------------------------------------------------------------- open_regular


def test_regular_file_opens_and_reads_its_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.bin"
    p.write_bytes(b"abc\x00def")
    with open_regular(p, root=tmp_path) as f:
        assert f.read() == b"abc\x00def"
        assert f.snapshot_size == 7


def test_a12_symlink_leaving_the_run_dir_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(secret, run / "metrics.jsonl")
    with pytest.raises(TrainauditError, match="symlink leaves run dir; skipped"):
        open_regular(run / "metrics.jsonl", root=run)
    with pytest.raises(TrainauditError, match="symlink leaves run dir"):
        list(iter_lines(run / "metrics.jsonl", DataWarnings(), root=run))


def test_symlink_inside_the_run_dir_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real.jsonl").write_text('{"step": 1}\n')
    os.symlink(tmp_path / "real.jsonl", tmp_path / "link.jsonl")
    assert list(iter_lines(tmp_path / "link.jsonl", DataWarnings(), root=tmp_path)) == [(1, '{"step": 1}')]


def test_dotdot_path_out_of_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "run").mkdir()
    with pytest.raises(TrainauditError, match="leaves run dir"):
        open_regular(tmp_path / "run" / ".." / "outside.txt", root=tmp_path / "run")


def _in_thread_with_timeout(fn, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - hand the exception to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call blocked (a FIFO must never be opened for reading)"
    return box


def test_a13_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    box = _in_thread_with_timeout(lambda: open_regular(fifo, root=tmp_path))
    assert isinstance(box.get("error"), TrainauditError)
    assert "not a regular file (a FIFO); skipped" in str(box["error"])
    # Control: the FIFO really would block a plain open() for reading (no writer).
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)  # only O_NONBLOCK returns at once; plain open(fifo) waits for a writer


def test_a14_symlink_to_dev_zero_terminates(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "events.out.tfevents.1")
    box = _in_thread_with_timeout(lambda: read_bounded(tmp_path / "events.out.tfevents.1"))
    assert isinstance(box.get("error"), TrainauditError)
    assert "not a regular file (a device)" in str(box["error"])


@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "missing", "file not found"),
    (lambda d: d, "not a regular file (a directory)"),
])
def test_other_refusals(tmp_path: Path, make, problem: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainauditError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        check_regular(make(tmp_path))


def test_read_bounded_limit_and_contents(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(bytes(range(256)) * 10)
    assert read_bounded(p) == bytes(range(256)) * 10
    with pytest.raises(TrainauditError, match="file too large"):
        read_bounded(p, max_bytes=100)


# --------------------------------------------------------------------------- iter_lines


def test_d1_torn_final_line(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step":1,"loss":2}\n{"step":2,"lo')
    w = DataWarnings()
    assert list(iter_lines(p, w)) == [(1, '{"step":1,"loss":2}')]
    assert w == [f"{p}:2: incomplete final line ignored"]


def test_d1_keep_unterminated_option(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_text("a\nb")
    w = DataWarnings()
    assert list(iter_lines(p, w, keep_unterminated=True)) == [(1, "a"), (2, "b")]
    assert w == []


def test_d4_bom_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"step":1}\r\n{"step":2}\r\n')
    w = DataWarnings()
    lines = list(iter_lines(p, w))
    assert lines == [(1, '{"step":1}'), (2, '{"step":2}')]
    assert [json.loads(t)["step"] for _, t in lines] == [1, 2]
    assert w == []


def test_nul_tail_is_ignored_with_a_warning(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"step":1}\n' + b"\x00" * 4096)
    w = DataWarnings()
    assert list(iter_lines(p, w)) == [(1, '{"step":1}')]
    assert len(w) == 1 and "NUL bytes at end of file ignored" in w[0]


def test_d9_overlong_line_is_skipped_with_its_number(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    long = b"{" + b" " * (3 * (1 << 20))   # 3 MiB, spanning several read chunks
    p.write_bytes(b'{"step":1}\n' + long + b'\n{"step":3}\n')
    w = DataWarnings()
    assert list(iter_lines(p, w)) == [(1, '{"step":1}'), (3, '{"step":3}')]
    assert w == [f"{p}: line 2 exceeds 1 MiB, skipped"]


def test_d9_overlong_unterminated_tail(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"step":1}\n' + b"x" * 5000)
    w = DataWarnings()
    assert list(iter_lines(p, w, max_line=1000)) == [(1, '{"step":1}')]
    assert w == [f"{p}: line 2 exceeds 1000 bytes, skipped"]


def test_invalid_utf8_is_replaced_and_reported(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"ok\nbad \xff\xfe here\n")
    w = DataWarnings()
    lines = list(iter_lines(p, w))
    assert lines[0] == (1, "ok") and lines[1][0] == 2 and "\ufffd" in lines[1][1]
    assert w == [f"{p}:2: invalid UTF-8 bytes replaced"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b
                                                     and b"\x00" not in b), max_size=30),
       chunk=st.integers(1, 64), cap=st.integers(1, 200), final_newline=st.booleans())
def test_streaming_matches_split_for_any_chunking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  lines: list[bytes], chunk: int, cap: int,
                                                  final_newline: bool) -> None:
    """Property: for any chunk size, the streamer equals a whole-file split with the same rules."""
    monkeypatch.setattr(lines_mod, "_CHUNK", chunk)
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    p = tmp_path / "prop.log"
    p.write_bytes(data)
    w = DataWarnings()
    got = list(iter_lines(p, w, max_line=cap))
    # Reference: split the whole file at once (a leading UTF-8 BOM is not part of line 1).
    ref = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    parts = ref.split(b"\n")
    tail = parts.pop()
    tail_raw = len(tail) + (3 if not parts and ref is not data else 0)
    expected, skipped = [], []
    for i, b in enumerate(parts, 1):
        if len(b) + (3 if i == 1 and ref is not data else 0) > cap:  # the cap counts raw bytes
            skipped.append(i)
        else:
            expected.append((i, b.decode("utf-8", errors="replace")))
    assert got == expected
    overlong = [x for x in w if "exceeds" in x]
    assert overlong == [f"{p}: line {i} exceeds {cap} bytes, skipped" for i in skipped] + (
        [f"{p}: line {len(parts) + 1} exceeds {cap} bytes, skipped"] if tail_raw > cap else [])
    torn = [x for x in w if "incomplete final line" in x]  # a blank torn tail loses nothing: no warning
    assert torn == ([f"{p}:{len(parts) + 1}: incomplete final line ignored"] if tail.strip() and tail_raw <= cap
                    else [])


def test_d14_concurrent_appends_read_a_consistent_snapshot(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(2000)))
    stop = threading.Event()

    def writer() -> None:
        i = 2000
        with open(p, "a") as f:
            while not stop.is_set():
                f.write(json.dumps({"step": i, "loss": 0.5}) + "\n")
                f.flush()
                i += 1
                time.sleep(0.001)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.02)
        for _ in range(3):
            w = DataWarnings()
            recs = [parse_json_line(text, w, p, n) for n, text in iter_lines(p, w)]
            steps = [r["step"] for r in recs if r is not None]
            assert steps == list(range(len(steps))) and len(steps) >= 2000
            assert all("incomplete final line" in x for x in w)  # only a torn tail, never a bad record
    finally:
        stop.set()
        t.join()


# --------------------------------------------------------------------------- parse_json_line


def test_d6_nan_and_infinity_tokens_are_kept() -> None:
    text = json.dumps({"step": 1, "loss": float("nan"), "g": float("inf"), "h": float("-inf")})
    assert "NaN" in text and "Infinity" in text
    rec = parse_json_line(text, DataWarnings(), "m.jsonl", 1)
    assert rec is not None and np.isnan(rec["loss"]) and rec["g"] == np.inf and rec["h"] == -np.inf


def test_d11_duplicate_keys_warned_last_kept() -> None:
    w = DataWarnings()
    rec = parse_json_line('{"loss":1,"loss":2}', w, "m.jsonl", 7)
    assert rec == {"loss": 2}
    assert w == ["m.jsonl:7: duplicate keys loss (last value kept)"]


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "not a JSON object (list), skipped"),
    ('{"a": 1', "not valid JSON"),
    ("[" * 100000, "not valid JSON"),
])
def test_bad_json_lines(text: str, problem: str) -> None:
    w = DataWarnings()
    assert parse_json_line(text, w, "m.jsonl", 3) is None
    assert len(w) == 1 and w[0].startswith("m.jsonl:3: ") and problem in w[0]


def test_blank_line_is_silently_none() -> None:
    w = DataWarnings()
    assert parse_json_line("   ", w, "m.jsonl", 3) is None and w == []


# --------------------------------------------------------------------------- steps and rewinds


def test_d5_d8_step_coercion() -> None:
    w = DataWarnings()
    vals = np.array([1, "2", 3.0, 2.5, None, "x", -1, 2**64 + 1, float("inf")], dtype=object)
    steps, keep = coerce_steps(vals, "m.jsonl", w)
    assert keep.tolist() == [True, True, True, False, False, False, False, False, False]
    assert steps[keep].tolist() == [1, 2, 3]
    text = " | ".join(w)
    assert "1 row with a non-integer step skipped" in text
    assert "2 rows with a missing or non-numeric step skipped" in text
    assert "1 row with a negative step dropped" in text
    assert "2 rows with step out of range (beyond int64) skipped" in text


def test_float_step_column_vectorised() -> None:
    w = DataWarnings()
    steps, keep = coerce_steps(np.array([0.0, 1.0, np.nan, 2.5, 1e30, -3.0]), "f", w)
    assert keep.tolist() == [True, True, False, False, False, False]
    assert steps[:2].tolist() == [0, 1]
    assert len(w) == 4


def test_d7_resume_later_wins() -> None:
    steps = list(range(10)) + list(range(5, 13)) + [-1]
    df = pd.DataFrame({"step": steps, "v": [float(i) for i in range(len(steps))]})
    w = DataWarnings()
    out = resolve_rewinds(df, "m.jsonl", w)
    assert out["step"].tolist() == list(range(13))
    # steps 0-4 from the first segment (values 0-4), 5-12 from the second (values 10-17)
    assert out["v"].tolist() == [0, 1, 2, 3, 4] + [float(x) for x in range(10, 18)]
    assert out["step"].dtype == np.int64
    assert "m.jsonl: resume at step 5 (overlap 5-9)" in w
    assert "m.jsonl: 1 row with a negative step dropped" in w
    assert len(w) == 2


def _replay(steps: list[int], groups: list[int]) -> list[int]:
    """Reference: replay rows; each row erases its group's kept rows at steps >= its step."""
    kept: list[int] = []
    for i, (s, g) in enumerate(zip(steps, groups, strict=True)):
        kept = [j for j in kept if not (groups[j] == g and steps[j] >= s)]
        kept.append(i)
    return kept


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2)), max_size=60))
def test_rewind_policy_matches_replay(rows: list[tuple[int, int]]) -> None:
    steps = [s for s, _ in rows]
    groups = [g for _, g in rows]
    df = pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "series": [f"s{g}" for g in groups],
                       "row": range(len(rows))})
    out = resolve_rewinds(df, "f", DataWarnings(), by="series")
    assert sorted(out["row"].tolist()) == _replay(steps, groups)


# --------------------------------------------------------------------------- prefetched


def test_prefetched_yields_everything_in_order_and_reads_ahead() -> None:
    produced: list[int] = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    it = safeio.prefetched(items(), depth=1)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:  # the producer runs ahead of the consumer
        time.sleep(0.01)
    assert len(produced) >= 2
    assert [0, *it] == list(range(50))


def test_prefetched_reraises_the_producers_error_after_the_items_before_it() -> None:
    def items():
        yield 1
        yield 2
        raise TrainauditError("x.safetensors", "truncated while reading tensor w")

    got = []
    with pytest.raises(TrainauditError, match="truncated"):
        for x in safeio.prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_prefetched_closed_early_stops_its_thread() -> None:
    before = threading.active_count()
    it = safeio.prefetched(iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name == "trainaudit-prefetch"]
