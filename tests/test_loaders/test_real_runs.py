"""Every real third-party run in the real-runs corpus ($TRAINAUDIT_REAL_RUNS) loads through open_run with sensible contents.

The expected counts come from that folder's README (written from the files by hand), not from
this code. Skips when the folder is absent (it is reference data, never copied here).
"""
from __future__ import annotations

from realruns import REAL_RUNS

from pathlib import Path

import numpy as np
import pytest

from loaders.detect import open_run

REAL = REAL_RUNS
FILES = (sorted(p.name for p in REAL.iterdir() if p.name not in ("README.md", "_provenance.json"))
         if REAL.is_dir() else [])

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="the real-runs corpus ($TRAINAUDIT_REAL_RUNS) is absent")

# file -> (format, train points of `loss`, {eval series: points}, window of the loss or None)
EXPECTED = {
    "hf_whisper_small_hi_trainer_state.json": ("hf", 200, {"eval_loss": 5}, 25),
    "hf_whisper_large_v2_ja_trainer_state.json": ("hf", 200, {"eval_loss": 5}, 25),
    "hf_dnabert2_trainer_state.json": ("hf", 22, {"eval_loss": 11}, 100),
    "hf_whisper_flemish_trainer_state.json": ("hf", 150, {"eval_loss": 15}, 100),
    "hf_cpt_checkpoint_trainer_state.json": ("hf", 10, {"eval_loss": 10}, 500),
    "hf_tinyllama_finetune_trainer_state.json": ("hf", 186, {"eval_loss": 14}, 15),
    "hf_whisper_tiny_nb_trainer_state.json": ("hf", 2000, {"eval_loss": 100}, 50),
    "hf_bashkir_asr_trainer_state.json": ("hf", 400, {"eval_loss": 20}, 25),
    "hf_star_trainer_state.json": ("hf", 2000, {}, 20),
    "hf_t5_summarization_trainer_state.json": ("hf", 430, {}, 500),
    "hf_whisper_braj_trainer_state.json": ("hf", 5, {"eval_loss": 20}, 500),
    "hf_multi_eval_trainer_state.json": ("hf", 30, {f"eval_g{i}_loss": 31 for i in range(6)}, 500),
    "pl_slm_training_metrics.csv": ("lightning", 2814, {"val_loss": 10}, None),
    "pl_discharge_v2_metrics.csv": ("lightning", 17, {"val_loss": 17}, None),
    "pl_discharge_v4_metrics.csv": ("lightning", 16, {"val_loss": 16}, None),
    "pl_mnist_cnn_metrics.csv": ("lightning", 171, {"val_loss": 5}, None),
    "tb_t5_summarization.tfevents": ("tensorboard", 430, {}, 500),
    "tb_sketch_vlm_b.tfevents": ("tensorboard", 392, {"val_loss": 8}, None),
    "tb_sketch_vlm_a.tfevents": ("tensorboard", 64, {"val_loss": 6}, None),
    "tb_mnist_cnn_lightning.tfevents": ("tensorboard", 5, {"val_loss": 5}, None),
    "llmc_gpt2_124m_main.log": ("llmc", 19560, {"val_loss": 80}, None),
    "llmc_adamw_baseline.log": ("llmc", 9536, {"val_loss": 76}, None),
    "nanogpt_modded_scaleup1b_c0078066.csv": ("csv", 15258, {"val_loss": 124}, None),
    "json_small_gpt_losses.json": ("json", 10000, {}, None),
}


@pytest.mark.parametrize("name", FILES)
def test_every_real_file_loads(name: str) -> None:
    run = open_run(REAL / name)
    assert run.checkpoints or not run.scalars.empty
    assert run.scalars["step"].dtype == np.int64 and run.evals["step"].dtype == np.int64
    for series, g in run.scalars.groupby("series"):
        assert g["step"].is_unique, f"{series}: duplicate steps"
    for series, g in run.evals.groupby("series"):
        assert g["step"].is_unique, f"{series}: duplicate steps"
    loss = run.series("loss")["value"]
    if len(loss):
        finite = loss[np.isfinite(loss)]
        assert (finite >= 0).all() and (finite < 100).all()
    if name in EXPECTED:
        fmt, n_train, evals, window = EXPECTED[name]
        assert run.source_format == fmt
        assert len(run.series("loss")) == n_train
        assert run.evals.groupby("series").size().to_dict() == evals
        assert run.window_averaged.get("loss") == window
        preferred = next((x for x in ("eval_loss", "val_loss") if x in evals), min(evals) if evals else None)
        assert run.meta["val_series_preferred"] == preferred


def test_multi_eval_has_six_series_and_picks_g0() -> None:
    run = open_run(REAL / "hf_multi_eval_trainer_state.json")
    assert sorted(run.evals["series"].unique()) == [f"eval_g{i}_loss" for i in range(6)]
    assert run.meta["val_series_preferred"] == "eval_g0_loss"
    assert len(run.series("grad_norm")) == 30


def test_llmc_main_log_series() -> None:
    run = open_run(REAL / "llmc_gpt2_124m_main.log")
    assert run.series("loss")["step"].tolist() == list(range(19560))
    assert len(run.series("grad_norm")) == 19560 and len(run.series("lr")) == 19560
    ev = run.evals["step"].to_numpy()
    assert len(ev) == 80 and ev[0] == 0 and ev[-1] == 19560 and np.all(ev[:-1] % 250 == 0)


def test_jsonl_with_restarts_keeps_the_latest_timeline() -> None:
    run = open_run(REAL / "jsonl_slm125m_legal_metrics.jsonl")
    steps = run.series("loss")["step"].to_numpy()
    assert np.all(np.diff(steps) > 0) and steps[0] == 20 and np.all(steps % 20 == 0)
    assert sum("resume at step" in w for w in run.warnings) >= 2


def test_mnist_csv_test_row_and_late_validation_ignored() -> None:
    run = open_run(REAL / "pl_mnist_cnn_metrics.csv")
    assert run.evals["step"].max() < 8595       # the validate() row after fit (step 8595) is left out
    assert any("test_loss" in n for n in run.notes)


def test_nanogpt_checkpoints() -> None:
    a = open_run(REAL / "ckpt_gpt_by_hand_nanogpt.pt")
    assert a.source_format == "nanogpt" and [c.step for c in a.checkpoints] == [2000]
    assert a.meta["best_val_loss"] == pytest.approx(1.5052, abs=1e-4)
    b = open_run(REAL / "ckpt_small_gpt_iter20.pt")
    assert [c.step for c in b.checkpoints] == [20]
    assert b.meta["model_args"]["vocab_size"] == 4096
    from loaders.checkpoints import checkpoint_info
    info = checkpoint_info(REAL / "ckpt_small_gpt_iter20.pt")
    assert info.container_key == "model" and ("transformer.wte.weight", "lm_head.weight") in info.tied
