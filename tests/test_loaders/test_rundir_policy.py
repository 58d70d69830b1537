"""Our run directory read with the loaders' one line streamer, step bounds and resume policy.

Each test fails on the reader that had its own copies (float steps below 2**62, resumes that
split only on a strict step decrease, integer-only evaluation steps, NUL bytes passed to the
CSV parser). References are independent: a dictionary timeline replayed row by row.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loaders.rundir import is_run_dir, read_run_dir

TRAIN_HEADER = b"step,loss,grad_norm,lr,wall_time\n"
CLASS_HEADER = b"step,cls,count,loss_sum,loss_m2\n"


def _run(tmp_path: Path, **files: bytes) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"format_version": 1, "class_names": ["a", "b"]}))
    for name, data in files.items():
        (d / name.replace("_csv", ".csv").replace("_jsonl", ".jsonl")).write_bytes(data)
    return d


def _replay(rows: list[tuple[object, int, float]]) -> list[tuple[object, int, float]]:
    """Later timeline wins per series: a step at or below the last one erases the rows >= it."""
    timelines: dict[object, dict[int, float]] = {}
    for series, step, value in rows:
        t = timelines.setdefault(series, {})
        for s in [s for s in t if s >= step]:
            del t[s]
        t[step] = value
    return sorted((k, s, v) for k, t in timelines.items() for s, v in t.items())


def test_train_steps_use_the_int64_bounds_exactly(tmp_path: Path) -> None:
    big = 2**62 + 1  # refused before (bound 2**62) and, as a float, not exact
    d = _run(tmp_path, train_csv=TRAIN_HEADER + b"1,1.0,1,,1\n%d,2.0,1,,1\n%d,3.0,1,,1\n" % (big, 2**63))
    run = read_run_dir(d)
    assert run.series("loss")["step"].tolist() == [1, big]
    assert any("1 row with step out of range (beyond int64) skipped" in w for w in run.warnings), run.warnings


def test_class_log_resumed_at_the_same_step_keeps_the_later_rows(tmp_path: Path) -> None:
    rows = [(4, "a", 1.0), (4, "b", 2.0), (5, "a", 3.0), (5, "b", 4.0),   # killed after step 5
            (5, "a", 30.0), (5, "b", 40.0), (6, "a", 5.0), (3, "b", 9.0)]  # resumed at 5, then at 3
    body = b"".join(b"%d,%s,1,%r,0\n" % (s, c.encode(), v) for s, c, v in rows)
    run = read_run_dir(_run(tmp_path, class_losses_csv=CLASS_HEADER + body))
    got = sorted((c, int(s), v) for s, c, v in run.class_losses[["step", "cls", "loss_sum"]].itertuples(index=False))
    assert got == _replay([(c, s, v) for s, c, v in rows])
    assert (5, "a", 3.0) not in [(int(s), c, v) for s, c, v in run.class_losses[["step", "cls", "loss_sum"]].values]
    assert any("resume at step 5 (overlap 5)" in w for w in run.warnings), run.warnings


@pytest.mark.parametrize("step,kept", [(3.0, True), ("7", True), (2**64, False), (-1, False), (2.5, False)])
def test_eval_steps_follow_the_same_rules_as_every_reader(tmp_path: Path, step: object, kept: bool) -> None:
    recs = [{"step": step, "split": "val", "loss": 1.0}, {"step": 10, "split": "val", "loss": 2.0}]
    run = read_run_dir(_run(tmp_path, eval_jsonl="".join(json.dumps(r) + "\n" for r in recs).encode()))
    assert run.evals["step"].tolist() == ([int(float(step))] if kept else []) + [10]
    assert not [w for w in run.warnings if "resume" in w]  # 2**64 once made a bogus resume warning
    assert any("record without a valid step" in w for w in run.warnings) != kept


def test_nul_bytes_inside_a_log_are_dropped_not_parsed(tmp_path: Path) -> None:
    d = _run(tmp_path, train_csv=TRAIN_HEADER + b"1,1.0,1,,1\n\x00\x00\x00\x00\n2,2.0,1,,1\n2\x00,3.0,1,,1\n")
    run = read_run_dir(d)
    assert run.series("loss")["value"].tolist() == [1.0, 3.0]  # the NUL-damaged step 2 row is the later one
    assert [w.split(": ", 1)[1] for w in run.warnings if "train.csv" in w] == [
        "NUL bytes ignored (lines 3-5)", "resume at step 2 (overlap 2)"]


def test_one_run_folder_detector(tmp_path: Path) -> None:
    ours = _run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"name": "not ours"}')   # another tool's run.json
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"format_version": 1, ')
    assert [is_run_dir(p) for p in (ours, other, damaged, tmp_path)] == [True, False, True, False]
