"""open_run: format detection for folders and files, --format override, unknown inputs (D12)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loaders.detect import FORMATS, detect_format, open_run
from loaders.errors import TrainauditError
from loaders.run import Run


def _hf_state(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    hist = [{"epoch": 0.1, "loss": 2.0, "step": 10}, {"epoch": 0.2, "eval_loss": 1.5, "step": 20}]
    p.write_text(json.dumps({"log_history": hist, "global_step": 20, "logging_steps": 10}, indent=2))
    return p


def _lightning(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train_loss", "val_loss"])
        w.writerow([0, 9, 1.0, ""])
        w.writerow([0, 9, "", 2.0])
    return p


def _tb(d: Path) -> Path:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(log_dir=str(d))
    w.add_scalar("train/loss", 1.0, 1)
    w.close()
    return next(d.glob("events.out.tfevents.*"))


def test_formats_tuple() -> None:
    assert set(FORMATS) == {"rundir", "hf", "lightning", "tensorboard", "nanogpt", "llmc", "jsonl", "csv", "json",
                            "checkpoint"}


def test_rundir_is_dispatched_to_the_run_dir_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loaders.rundir as rundir
    (tmp_path / "run.json").write_text(json.dumps({"format_version": 1, "name": "x"}))
    seen = []
    monkeypatch.setattr(rundir, "read_run_dir", lambda p: seen.append(p) or Run(path=Path(p), name="x",
                                                                                  source_format="trainaudit"))
    assert detect_format(tmp_path) == "rundir"
    run = open_run(tmp_path)
    assert seen == [tmp_path] and run.source_format == "trainaudit"


def test_folder_kinds(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    _hf_state(hf / "checkpoint-20" / "trainer_state.json")
    save_file({"w": torch.ones(2, 2)}, hf / "checkpoint-20" / "model.safetensors")
    assert detect_format(hf) == "hf"
    assert [c.step for c in open_run(hf).checkpoints] == [20]
    pl = tmp_path / "pl"
    _lightning(pl / "lightning_logs" / "version_0" / "metrics.csv")
    assert detect_format(pl) == "lightning"
    tb = tmp_path / "tb"
    _tb(tb / "runs" / "Mar24")
    assert detect_format(tb) == "tensorboard"
    assert open_run(tb).series("loss")["value"].tolist() == [1.0]
    ng = tmp_path / "out"
    ng.mkdir()
    torch.save({"model": {"w": torch.ones(1)}, "model_args": {"n_layer": 1}, "iter_num": 7}, ng / "ckpt.pt")
    assert detect_format(ng) == "nanogpt" and open_run(ng).checkpoints[0].step == 7
    ck = tmp_path / "ckpts"
    ck.mkdir()
    save_file({"w": torch.ones(1)}, ck / "a.safetensors", metadata={"step": "300"})
    save_file({"w": torch.ones(1)}, ck / "step_100.safetensors")
    torch.save({"w": torch.ones(1)}, ck / "iter_200.pt")
    run = open_run(ck)
    assert run.source_format == "checkpoint"
    assert [(c.step, c.kind) for c in run.checkpoints] == [(100, "safetensors"), (200, "torch"), (300, "safetensors")]
    model = tmp_path / "bert"
    model.mkdir()
    save_file({"w": torch.ones(1)}, model / "model.safetensors")
    assert open_run(model).checkpoints[0].kind == "hf-dir"
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train.log").write_text("s:0 trl:1.0\n")
    assert detect_format(logs) == "llmc"


def test_file_kinds(tmp_path: Path) -> None:
    assert detect_format(_hf_state(tmp_path / "trainer_state.json")) == "hf"
    assert detect_format(_hf_state(tmp_path / "state_copy.json")) == "hf"
    assert detect_format(_lightning(tmp_path / "metrics.csv")) == "lightning"
    (tmp_path / "a.csv").write_text("step,loss\n1,2\n")
    assert detect_format(tmp_path / "a.csv") == "csv"
    (tmp_path / "a.jsonl").write_text('{"step": 1, "loss": 2}\n')
    assert detect_format(tmp_path / "a.jsonl") == "jsonl"
    (tmp_path / "a.json").write_text("[1, 2, 3]")
    assert detect_format(tmp_path / "a.json") == "json"
    (tmp_path / "main.log").write_text("s:0 trl:1\n")
    assert detect_format(tmp_path / "main.log") == "llmc"
    (tmp_path / "noext").write_text('{"step": 1, "loss": 2}\n')
    assert detect_format(tmp_path / "noext") == "jsonl"
    assert detect_format(_tb(tmp_path / "tb")) == "tensorboard"
    save_file({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    assert detect_format(tmp_path / "m.safetensors") == "checkpoint"
    torch.save({"model": {"w": torch.ones(1)}, "model_args": {}, "iter_num": 3}, tmp_path / "renamed.pt")
    run = open_run(tmp_path / "renamed.pt")      # a nanoGPT-shaped dict under another name
    assert run.source_format == "nanogpt" and run.checkpoints[0].step == 3


def test_format_override(tmp_path: Path) -> None:
    p = tmp_path / "odd.txt"
    p.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n')
    assert open_run(p, format="jsonl").series("loss")["value"].tolist() == [2.0, 1.0]
    with pytest.raises(TrainauditError, match="unknown format 'nope'"):
        open_run(p, format="nope")


def test_d12_empty_and_unknown_folders(tmp_path: Path) -> None:
    with pytest.raises(TrainauditError, match=r"no run data found \(empty folder\)"):
        open_run(tmp_path)
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(TrainauditError) as err:
        open_run(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: no run data found (looked for: ")
    for looked in ("trainer_state.json", "metrics.csv", "tfevents", "ckpt.pt", "*.safetensors", "*.jsonl"):
        assert looked in msg
    with pytest.raises(TrainauditError, match="no such file or folder"):
        open_run(tmp_path / "missing")


def test_unrecognised_file(tmp_path: Path) -> None:
    p = tmp_path / "x.dat"
    p.write_bytes(b"\x00\x01binary")
    with pytest.raises(TrainauditError, match="unrecognised file"):
        open_run(p)


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    import os
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(TrainauditError, match="not a regular file"):
        open_run(tmp_path / "metrics.jsonl")


def test_one_run_is_never_a_comparison(tmp_path: Path) -> None:
    """A folder holding one run (itself, or one run sub-folder) is that run; two make a comparison."""
    from analyze.pipeline.compare import expand_runs

    parent = tmp_path / "parent"
    a = parent / "a"
    a.mkdir(parents=True)
    (a / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (parent / "notes").mkdir()
    assert expand_runs([parent]) == [a]
    b = parent / "b"
    b.mkdir()
    (b / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert expand_runs([parent]) == [a, b]


def test_checkpoints_subfolder_makes_a_checkpoint_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "global_step": 30}, run / "checkpoints" / "latest.pt")
    torch.save({"w": torch.ones(1)}, run / "checkpoints" / "optimizer.pt")
    assert detect_format(run) == "checkpoint"
    r = open_run(run)
    assert [c.step for c in r.checkpoints] == [30] and r.not_analysed == ["checkpoints/optimizer.pt"]
    assert not list(r.warnings)
