"""Hugging Face Trainer runs: trainer_state.json written by Transformers' rules, output folders.

Transformers' ``TrainerState.save_to_json`` writes ``json.dumps(asdict(state), indent=2,
sort_keys=True) + "\\n"``; the fixture below does the same, so NaN becomes the ``NaN`` token.
Rows A6 and D18 of bad-inputs.md.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loaders.errors import TrainauditError
from loaders.formats.hf_trainer import checkpoint_dirs, read_hf, read_trainer_state


def trainer_state(logging_steps: int | None = 10, eval_names: tuple[str, ...] = ("eval_loss",),
                  nan_at: int | None = None) -> dict:  # type: ignore[type-arg]
    """A log_history shaped like Trainer's: train logs every 10 steps, evals every 20, a summary."""
    hist = []
    for step in range(10, 101, 10):
        loss = 3.0 / step if step != nan_at else float("nan")
        hist.append({"epoch": step / 100, "grad_norm": 1.0 + step / 1000, "learning_rate": 1e-3 * (1 - step / 200),
                     "loss": round(loss, 4), "step": step})
        if step % 20 == 0:
            for i, name in enumerate(eval_names):
                hist.append({"epoch": step / 100, name: 2.0 / step + i, f"{name[:-5]}_runtime": 1.5,
                             f"{name[:-5]}_samples_per_second": 100.0, "eval_wer": 30.0, "step": step})
    hist.append({"epoch": 1.0, "step": 100, "total_flos": 1e12, "train_loss": 0.123, "train_runtime": 10.0,
                 "train_samples_per_second": 5.0, "train_steps_per_second": 1.0})
    state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 1.0, "eval_steps": 20,
             "global_step": 100, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": hist, "max_steps": 100, "num_train_epochs": 1,
             "save_steps": 50, "total_flos": 1e12, "train_batch_size": 8, "trial_name": None, "trial_params": None}
    if logging_steps is not None:
        state["logging_steps"] = logging_steps
    return state


def write_state(p: Path, state: dict) -> Path:  # type: ignore[type-arg]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return p


def test_log_history_to_tables(tmp_path: Path) -> None:
    p = write_state(tmp_path / "trainer_state.json", trainer_state(nan_at=50))
    assert "NaN" in p.read_text()
    run = read_trainer_state(p)
    assert run.source_format == "hf"
    loss = run.series("loss")
    assert loss["step"].tolist() == list(range(10, 101, 10))
    expected = [round(3.0 / s, 4) if s != 50 else math.nan for s in range(10, 101, 10)]
    for got, exp in zip(loss["value"], expected, strict=True):
        assert (math.isnan(got) and math.isnan(exp)) or got == exp
    assert run.series("lr")["value"].tolist() == pytest.approx([1e-3 * (1 - s / 200) for s in range(10, 101, 10)])
    assert run.series("grad_norm")["value"].tolist() == pytest.approx([1.0 + s / 1000 for s in range(10, 101, 10)])
    assert set(run.scalars["series"]) == {"loss", "lr", "grad_norm"}  # train_loss summary is not a point
    ev = run.evals
    assert ev["series"].unique().tolist() == ["eval_loss"]
    assert ev["step"].tolist() == [20, 40, 60, 80, 100]
    assert ev["loss"].tolist() == pytest.approx([2.0 / s for s in (20, 40, 60, 80, 100)])
    assert run.window_averaged == {"loss": 10}
    assert run.meta["val_series_preferred"] == "eval_loss"
    assert run.meta["global_step"] == 100
    assert run.warnings == []


def test_several_eval_sets_and_preferred_series(tmp_path: Path) -> None:
    names = ("eval_g1_loss", "eval_g0_loss", "eval_books_loss")
    run = read_trainer_state(write_state(tmp_path / "trainer_state.json", trainer_state(eval_names=names)))
    assert sorted(run.evals["series"].unique()) == sorted(names)
    assert run.meta["val_series_preferred"] == "eval_books_loss"  # no eval_loss: first in sorted order
    run2 = read_trainer_state(write_state(tmp_path / "b" / "trainer_state.json",
                                          trainer_state(eval_names=("eval_g0_loss", "eval_loss"))))
    assert run2.meta["val_series_preferred"] == "eval_loss"


def test_logging_steps_inferred_when_absent(tmp_path: Path) -> None:
    run = read_trainer_state(write_state(tmp_path / "trainer_state.json", trainer_state(logging_steps=None)))
    assert run.window_averaged == {"loss": 10}


def _ckpt(folder: Path, state: dict | None, gadget_mark: Path | None = None) -> None:  # type: ignore[type-arg]
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2, 2) * int(folder.name.split("-")[1])}, folder / "model.safetensors")
    if state is not None:
        write_state(folder / "trainer_state.json", state)
    if gadget_mark is not None:
        class Evil:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return os.system, (f"touch {gadget_mark}",)
        torch.save(Evil(), folder / "training_args.bin")
        torch.save(Evil(), folder / "optimizer.pt")


def test_output_folder_numeric_order_and_side_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mark = tmp_path / "PWNED"
    st = trainer_state()
    for n in (900, 1000, 50):
        _ckpt(out / f"checkpoint-{n}", st, gadget_mark=mark)
    assert [s for s, _ in checkpoint_dirs(out)] == [50, 900, 1000]
    run = read_hf(out)
    assert [c.step for c in run.checkpoints] == [50, 900, 1000]
    assert all(c.kind == "hf-dir" for c in run.checkpoints)
    assert run.meta["trainer_state"].endswith("checkpoint-1000/trainer_state.json")
    assert len(run.series("loss")) == 10
    # The Trainer's own state files are listed as not analysed (never opened), not as data warnings.
    assert not list(run.warnings)
    assert run.not_analysed == [f"checkpoint-{n}/{f}" for n in (50, 900, 1000)
                                for f in ("optimizer.pt", "training_args.bin")]
    assert not mark.exists()
    from loaders.checkpoints import iter_tensors
    assert torch.equal(dict(iter_tensors(run.checkpoints[-1]))["w"], torch.ones(2, 2) * 1000)
    assert not mark.exists()


def test_d18_truncated_newest_state_falls_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _ckpt(out / "checkpoint-10", trainer_state())
    _ckpt(out / "checkpoint-20", trainer_state())
    newest = out / "checkpoint-20" / "trainer_state.json"
    text = newest.read_text()
    newest.write_text(text[: len(text) // 2])
    run = read_hf(out)
    assert [c.step for c in run.checkpoints] == [10, 20]   # the weights are still there
    assert len(run.series("loss")) == 10                     # from checkpoint-10's state
    assert any(str(newest) in w and "not valid JSON" in w for w in run.warnings)


def test_d18_truncated_file_alone_is_an_error(tmp_path: Path) -> None:
    p = write_state(tmp_path / "trainer_state.json", trainer_state(nan_at=30))
    text = p.read_text()
    p.write_text(text[: int(len(text) * 0.7)])
    with pytest.raises(TrainauditError) as err:
        read_hf(p)
    assert str(err.value).startswith(f"{p}: not valid JSON")


def test_d18_only_truncated_states_keeps_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _ckpt(out / "checkpoint-10", trainer_state())
    p = out / "checkpoint-10" / "trainer_state.json"
    p.write_text(p.read_text()[:100])
    run = read_hf(out)
    assert [c.step for c in run.checkpoints] == [10] and run.scalars.empty
    assert any("loss curves unavailable" in n for n in run.notes)


def test_not_a_trainer_state(tmp_path: Path) -> None:
    p = tmp_path / "trainer_state.json"
    p.write_text('{"a": 1}')
    with pytest.raises(TrainauditError, match="no log_history"):
        read_trainer_state(p)


def test_final_save_model_weights_step(tmp_path: Path) -> None:
    """Top-level weights from save_model() without save_state(): the newest checkpoint when they
    are the same weights (one checkpoint), else the run's max_steps (with a note)."""
    out = tmp_path / "out"
    st = dict(trainer_state(), global_step=4, max_steps=6)
    _ckpt(out / "checkpoint-4", st)
    save_file({"w": torch.ones(2, 2) * 4}, out / "model.safetensors")      # the same weights
    run = read_hf(out)
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(4, "checkpoint-4")] and not list(run.warnings)
    save_file({"w": torch.ones(2, 2) * 6}, out / "model.safetensors")      # trained on to max_steps
    run = read_hf(out)
    assert [(c.step, c.path.name) for c in run.checkpoints] == [(4, "checkpoint-4"), (6, "out")]
    assert any("max_steps" in n for n in run.notes) and not list(run.warnings)
    write_state(out / "trainer_state.json", dict(st, global_step=5))         # save_state() names the step
    assert [c.step for c in read_hf(out).checkpoints] == [4, 5]
