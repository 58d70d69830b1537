"""Plain loss logs: llm.c text, JSONL, CSV and JSON arrays (bad-inputs.md D1, D2, D5-D8, D11)."""
from __future__ import annotations

import json
import math
from pathlib import Path

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
