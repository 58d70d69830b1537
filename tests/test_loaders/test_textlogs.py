"""Plain loss logs: llm.c text, JSONL, CSV and JSON arrays (bad-inputs.md D1, D2, D5-D8, D11)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from loaders.errors import TrainauditError
from loaders.formats.textlogs import read_csv_log, read_json_log, read_jsonl, read_llmc


def test_llmc_main_format(tmp_path: Path) -> None:
    p = tmp_path / "main.log"
    lines = ["s:0 tel:11.0092"]
    for s in range(0, 30):
        lines.append(f"s:{s} trl:{10 - s / 10:.4f} lr:{s * 1e-6:.6f} norm:{15 - s / 3:.2f}")
        if s % 10 == 9:
            lines.append(f"s:{s + 1} tel:{9 - s / 10:.4f}")
    p.write_text("\n".join(lines) + "\n")
    run = read_llmc(p)
    assert run.series("loss")["value"].tolist() == pytest.approx([10 - s / 10 for s in range(30)])
    assert run.series("lr")["value"].tolist() == pytest.approx([float(f"{s * 1e-6:.6f}") for s in range(30)])
    assert run.series("grad_norm")["step"].tolist() == list(range(30))
    assert run.evals["step"].tolist() == [0, 10, 20, 30]
    assert run.evals["series"].unique().tolist() == ["val_loss"]
    assert run.meta["val_series_preferred"] == "val_loss"
    assert run.warnings == []


def test_llmc_old_and_modded_and_stdout_formats(tmp_path: Path) -> None:
    p = tmp_path / "old.log"
    p.write_text("s:0 tel:10.9\ns:0 trl:10.96\ns:1 trl:10.81\n")
    r = read_llmc(p)
    assert r.series("loss")["value"].tolist() == [10.96, 10.81] and r.evals["loss"].tolist() == [10.9]
    q = tmp_path / "modded.txt"
    q.write_text("import torch  # script text first\n"
                 "step:0/100 val_loss:10.8 train_time:0ms step_avg:nanms\n"
                 "step:1/100 train_loss:10.7 train_time:100ms step_avg:nanms\n"
                 "step:2/100 train_loss:9.5 train_time:200ms step_avg:100ms\n")
    r = read_llmc(q)
    assert r.series("loss")["step"].tolist() == [1, 2] and r.evals["loss"].tolist() == [10.8]
    assert any("1 lines that are not loss records" in n for n in r.notes)
    s = tmp_path / "stdout.log"
    s.write_text("step    1/50 | train loss 11.009735 | norm 15.3707 | lr 1.00e-06 | 123.45 ms | 1.2% MFU\n"
                 "step    2/50 | train loss 10.959820 | norm 15.2400 | lr 2.00e-06 | 120.00 ms | 1.2% MFU\n"
                 "val loss 10.5\n")
    r = read_llmc(s)
    assert r.series("loss")["value"].tolist() == [11.009735, 10.95982]
    assert r.series("grad_norm")["value"].tolist() == [15.3707, 15.24]


def test_llmc_without_records_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "x.log"
    p.write_text("hello\nworld\n")
    with pytest.raises(TrainauditError, match="no loss records found"):
        read_llmc(p)


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    recs = [json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(5)]
    recs[2] = "garbage{"                                             # D2: corrupt line in the middle
    recs.append('{"step": 5, "loss": NaN, "loss": 0.1}')             # D6 + D11
    recs.append('{"step": "6", "loss": "0.25", "lr": null}')         # D5 mixed types
    recs.append('{"step": 7.0, "loss": [1]}')                        # D5: a list is not a value
    recs.append('{"step": 18446744073709551617, "loss": 1}')         # D8
    recs.append('{"step": -1, "loss": 1}')                           # D7 negative
    text = "\n".join(recs) + '\n{"step": 9, "lo'                     # D1 torn tail
    p.write_text(text)
    run = read_jsonl(p)
    loss = run.series("loss")
    assert loss["step"].tolist() == [0, 1, 3, 4, 5, 6]
    assert loss["value"].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.2, 0.1, 0.25])
    w = " | ".join(run.warnings)
    assert f"{p}:3: not valid JSON" in w
    assert f"{p}:6: duplicate keys loss (last value kept)" in w
    assert f"{p}:11: incomplete final line ignored" in w
    assert f"{p}: 1 non-numeric value of loss skipped" in w
    assert "step out of range" in w and "negative step" in w


def test_jsonl_nan_kept_not_dropped(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": i, "loss": float("nan") if i == 2 else 1.0}) + "\n" for i in range(4)))
    vals = read_jsonl(p).series("loss")["value"].tolist()
    assert len(vals) == 4 and math.isnan(vals[2])


def test_jsonl_resume(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    steps = list(range(10)) + list(range(5, 13))
    p.write_text("".join(json.dumps({"step": s, "loss": float(i), "val_loss": float(i) + 0.5}) + "\n"
                         for i, s in enumerate(steps)))
    run = read_jsonl(p)
    assert run.series("loss")["value"].tolist() == [0, 1, 2, 3, 4] + [float(x) for x in range(10, 18)]
    assert run.evals["step"].tolist() == list(range(13))
    assert f"{p}: resume at step 5 (overlap 5-9)" in run.warnings


def test_jsonl_without_step_uses_order(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"loss": 3}\n{"loss": 2}\n')
    run = read_jsonl(p)
    assert run.series("loss")["step"].tolist() == [0, 1]
    assert any("row number is used as the step" in n for n in run.notes)


def test_plain_csv_sparse(tmp_path: Path) -> None:
    p = tmp_path / "log.csv"
    p.write_text("step,train_loss,val_loss,train_time_ms\n0,,22.5,315\n1,22.6,,83992\n2,9.65,,85695\n"
                 "125,,4.1,9000\n")
    run = read_csv_log(p)
    assert run.source_format == "csv"
    assert run.series("loss")["value"].tolist() == [22.6, 9.65]
    assert run.evals["step"].tolist() == [0, 125] and run.evals["loss"].tolist() == [22.5, 4.1]


def test_json_variants(tmp_path: Path) -> None:
    a = tmp_path / "losses.json"
    a.write_text(json.dumps([3.0, 2.5, float("nan"), 2.0]))
    r = read_json_log(a)
    vals = r.series("loss")["value"].tolist()
    assert r.series("loss")["step"].tolist() == [0, 1, 2, 3] and vals[:2] == [3.0, 2.5] and math.isnan(vals[2])
    b = tmp_path / "records.json"
    b.write_text(json.dumps([{"iter": 10, "loss": 1.0}, {"iter": 20, "loss": 0.5, "val_loss": 0.7}]))
    r = read_json_log(b)
    assert r.series("loss")["step"].tolist() == [10, 20] and r.evals["loss"].tolist() == [0.7]
    c = tmp_path / "lists.json"
    c.write_text(json.dumps({"steps": [0, 100, 200], "train_loss": [3, 2, 1], "val_loss": [3.5, 2.5, 1.5]}))
    r = read_json_log(c)
    assert r.series("loss")["step"].tolist() == [0, 100, 200] and r.evals["loss"].tolist() == [3.5, 2.5, 1.5]
    d = tmp_path / "bad.json"
    d.write_text('{"x": "y"}')
    with pytest.raises(TrainauditError, match="no loss lists"):
        read_json_log(d)
    e = tmp_path / "torn.json"
    e.write_text("[1.0, 2.0, 3")
    with pytest.raises(TrainauditError, match="not valid JSON"):
        read_json_log(e)


# ----------------------------------------------------------------------------- JSONL fast path
# parse_flat_json_block parses a whole block of flat numeric records at once; anything else goes
# line by line. The reference is the per-line path alone (the block parser switched off).

_KEYS = ["step", "loss", "val_loss", "lr", "global_step", "epoch", "my loss", "ünï", "grad_norm",
         # bytes the number rules look at, inside keys; keys of one length that differ past 8 bytes
         "lr.0", "a-b", "x+y", " 01", "e-01", "0", "", "optimizer/param_group_0_lr", "optimizer/param_group_1_lr"]
_NUMS = ["0", "7", "-3", "12", "2.5", "1e-3", "1E400", "-0", "9007199254740993", "18446744073709551617",
         "1" + "0" * 400, "NaN", "Infinity", "-Infinity", "3.0", "0.1", "1e05", "1E+2", "-0.0e-0", "1e-05",
         "2.4703282292062328e-324", "0.30000000000000004441", " 1", "\t2", "1 ", " " * 9 + "3", "-00.5e01",
         # numbers JSON refuses (pandas' reader would take most of them)
         "+1", ".5", "5.", "01", "-01", "00", "1.e5", "-.5", "inf", "0.", "- 1", "1e5.5", "nan", "0x10", "1e", ""]
_ODD = ["", "   ", "garbage{", '{"step": 1, "loss": true}', '{"step": 2, "loss": null}', '{"step": "3", "loss": "0.5"}',
        '{"step": 4, "loss": [1]}', '{"eval": {"loss": 2.0}, "step": 5}', '{"step": 6, "loss": 1, "loss": 2}',
        '{"step": 7, "rank": 1, "loss": 3}', ' {"step": 8, "loss": 1}', '{"step": 9, "loss": .5}',
        '{"step": 10, "loss": 01}', '{"step" : 11, "loss": 1}', '{"step": 12 "loss": 1}', '{}', "[1, 2]",
        '{"step": 13, "loss": 1} x', '{"st\\u0065p": 14, "loss": 1}', '{"step": 15, "loss": +1}',
        '{"a\tb": 1}', '{"step": 16,, "loss": 1}', '{"step": 18, "loss": 0.5, "flag": true}',
        # valid JSON, taken by the block parser (the last two)
        '{"step":17,"loss":2}', '{"step": 19,\r"loss": 1}']


def _record(draw_keys: list[str], nums: list[str], sep: str) -> str:
    return "{" + ", ".join(f'{json.dumps(k, ensure_ascii=False)}:{sep}{v}' for k, v in zip(draw_keys, nums)) + "}"


def _lines_strategy():
    from hypothesis import strategies as st

    rec = st.builds(_record, st.lists(st.sampled_from(_KEYS), min_size=1, max_size=4, unique=True),
                    st.lists(st.sampled_from(_NUMS), min_size=4, max_size=4), st.sampled_from([" ", ""]))
    return st.lists(st.one_of(rec, rec, rec, st.sampled_from(_ODD)), min_size=1, max_size=60)


def _frames_equal(a, b) -> None:
    import pandas as pd

    for t in ("scalars", "evals"):
        pd.testing.assert_frame_equal(getattr(a, t), getattr(b, t), check_exact=True)
        for col, dtype in getattr(a, t).dtypes.items():   # -0.0 and 0.0 compare equal above
            if dtype.kind == "f":
                assert (np.signbit(getattr(a, t)[col]) == np.signbit(getattr(b, t)[col])).all(), col
    pd.testing.assert_frame_equal(a.meta["extra_scalars"], b.meta["extra_scalars"], check_exact=True)
    assert a.notes == b.notes and list(a.warnings) == list(b.warnings)
    assert {k: v for k, v in a.meta.items() if k != "extra_scalars"} == \
        {k: v for k, v in b.meta.items() if k != "extra_scalars"}


def _both_paths(p: Path, monkeypatch: pytest.MonkeyPatch):
    import loaders.formats.textlogs as textlogs

    try:
        fast = read_jsonl(p)
    except TrainauditError as e:
        fast = e
    with monkeypatch.context() as m:
        m.setattr(textlogs, "parse_flat_json_block", lambda block: None)
        try:
            slow = read_jsonl(p)
        except TrainauditError as e:
            slow = e
    return fast, slow


def test_jsonl_block_parser_gives_the_per_line_rows(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Property: on generated logs of flat records mixed with odd lines (blank, torn, nested,
    duplicate keys, booleans, ranks, not-JSON numbers, ...), read in small blocks so both paths
    meet, the block parser gives exactly the per-line path's tables, warnings and notes."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import loaders.lines as lines_mod

    @settings(max_examples=150, deadline=None)
    @given(_lines_strategy(), st.sampled_from([64, 256, 1 << 20]), st.booleans())
    def check(lines: list[str], chunk: int, torn: bool) -> None:
        p = tmp_path_factory.mktemp("jsonl") / "metrics.jsonl"
        p.write_text("\n".join(lines) + ("" if torn else "\n"), encoding="utf-8")
        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(lines_mod, "_CHUNK", chunk)
            fast, slow = _both_paths(p, mp)
        finally:
            mp.undo()
        if isinstance(slow, TrainauditError):
            assert isinstance(fast, TrainauditError) and str(fast) == str(slow)
        else:
            _frames_equal(fast, slow)

    check()


def test_jsonl_block_parser_takes_common_logs_and_refuses_odd_lines() -> None:
    """The fast path really runs on what loggers write, and declines each kind of odd block."""
    from loaders.lines import parse_flat_json_block

    good = b'{"step": 0, "loss": 2.5, "val_loss": NaN}\n{"step":1,"loss":-Infinity}\n{"loss": 1e400, "step": 2}'
    fb = parse_flat_json_block(good)
    assert fb is not None and fb.n == 3 and list(fb.keys) == ["step", "loss", "val_loss"]
    lines, at = fb.keys["loss"]
    assert lines.tolist() == [0, 1, 2] and fb.values[at].tolist() == [2.5, -math.inf, math.inf]
    assert fb.keys["val_loss"][0].tolist() == [0] and math.isnan(fb.values[fb.keys["val_loss"][1]][0])
    assert [fb.raw[i] for i in fb.keys["step"][1]] == [0, 1, 2]
    for odd in _ODD[:-2]:
        assert parse_flat_json_block(good + b"\n" + odd.encode()) is None, odd
    for fine in _ODD[-2:]:
        assert parse_flat_json_block(good + b"\n" + fine.encode()) is not None, fine


def test_jsonl_block_parser_reads_plain_numbers_without_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of plain numbers go through the vectorised reader (json is not called) and give
    json's values bit for bit, big integers exact."""
    import random

    import loaders.lines as lines_mod

    rng = random.Random(3)
    nums = [repr(rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300)) for _ in range(500)]
    nums += [format(rng.random(), ".25e") for _ in range(500)] + ["0", "-0", "1e05", "9007199254740993"]
    block = "\n".join(f'{{"step": {i}, "loss": {v}}}' for i, v in enumerate(nums)).encode()
    monkeypatch.setattr(lines_mod, "_numbers_by_json", lambda *a: pytest.fail("json path taken"))
    fb = lines_mod.parse_flat_json_block(block)
    assert fb is not None
    lines, at = fb.keys["loss"]
    assert lines.tolist() == list(range(len(nums)))
    assert fb.values[at].tobytes() == np.array([json.loads(v) for v in nums], dtype=np.float64).tobytes()
    assert fb.raw[int(at[-1])] == 9007199254740993 and type(fb.raw[int(at[-2])]) is float


def test_jsonl_big_steps_stay_exact(tmp_path: Path) -> None:
    """Steps above 2^53 keep every digit through the block parser (a float would round them)."""
    p = tmp_path / "m.jsonl"
    big = 2**60 + 1
    p.write_text("".join(f'{{"step": {big + i}, "loss": {i}.5}}\n' for i in range(5)))
    assert read_jsonl(p).series("loss")["step"].tolist() == [big + i for i in range(5)]


def test_jsonl_blocks_and_odd_lines_keep_file_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record read line by line (it has a boolean) before and after whole blocks: its cells
    take their place in file order (out of order they would read as a resume)."""
    import loaders.lines as lines_mod

    monkeypatch.setattr(lines_mod, "_CHUNK", 64)
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "loss": 0.5, "flag": true}\n' + "".join(f'{{"step": {i}, "loss": {i}}}\n' for i in range(1, 6))
                 + '{"step": 6, "loss": 6.5, "flag": false}\n{"step": 7, "loss": 7}\n')
    run = read_jsonl(p)
    assert run.series("loss")["step"].tolist() == list(range(8))
    assert run.series("loss")["value"].tolist() == [0.5, 1, 2, 3, 4, 5, 6.5, 7]
    assert not any("resume" in w for w in run.warnings)


def test_more_records_than_the_row_numbers_hold_is_one_clear_error(tmp_path, monkeypatch):
    """WideLog keeps row numbers as int32: past its limit the log is refused, naming the file."""
    from loaders.errors import TrainauditError
    from loaders.longtables import WideLog
    from loaders.rundir import load_run

    monkeypatch.setattr(WideLog, "MAX_RECORDS", 50)
    log = tmp_path / "big.jsonl"
    log.write_text("".join(f'{{"step": {i}, "loss": 1.5}}\n' for i in range(80)))
    with pytest.raises(TrainauditError, match="big.jsonl.*more than 50 records"):
        load_run(log)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(f'{{"step": {i}, "loss": 1.5}}\n' for i in range(50)))
    assert load_run(ok).steps_logged == 50
