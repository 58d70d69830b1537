"""One rule for a non-finite example loss in the per-class statistics (§8), in the logger and in the
analysis: the example is left out (and counted), so one NaN never turns a window's tau into NaN.
References are plain numpy over the finite examples."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analyze.config import AnalysisConfig
from analyze.metrics.losses import ClassLossState
from analyze.pipeline.analysis import analyze_run
from loaders import RunLogger, load_run
from loaders.logger import class_welford_state
from loaders.run import Run

NAMES = ["regular", "irregular"]


def _tau_ref(values: dict[int, list[np.ndarray]]) -> tuple[float, float]:
    """tau = mean_I - mean_R and its Welch SE over the finite examples (§8)."""
    irr = np.concatenate(values[1])
    reg = np.concatenate(values[0])
    irr, reg = irr[np.isfinite(irr)], reg[np.isfinite(reg)]
    return irr.mean() - reg.mean(), math.sqrt(irr.var(ddof=1) / len(irr) + reg.var(ddof=1) / len(reg))


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 1] * 4)
    return [(1.0 + 0.5 * ids + 0.3 * torch.randn(8, generator=g, dtype=torch.float64), ids) for _ in range(steps)]


def test_logger_leaves_a_nan_example_out_and_the_window_tau_stays_finite(tmp_path: Path) -> None:
    batches = _batches(60)
    batches[7][0][3] = math.nan  # one irregular example of step 7
    with RunLogger(tmp_path / "r", class_names=NAMES, flush_every=16) as log:
        for step, (loss, ids) in enumerate(batches):
            log.log_step(step, loss=float(torch.nanmean(loss)))
            log.log_class_losses(step, loss, ids)
    run = load_run(tmp_path / "r")
    row = run.class_losses[(run.class_losses["step"] == 7) & (run.class_losses["cls"] == "irregular")].iloc[0]
    kept = batches[7][0][1::2].numpy()
    kept = kept[np.isfinite(kept)]
    assert row["count"] == 3 and row["loss_sum"] == pytest.approx(kept.sum(), rel=1e-12)
    events = [json.loads(x) for x in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "nonfinite_class_losses"] == [
        {"event": "nonfinite_class_losses", "time": pytest.approx(events[0]["time"], abs=3600), "n": 1,
         "steps": {"7": 1}}]
    tau = analyze_run(run).tables["tau"]
    first = tau[(tau["source"] == "train") & (tau["step"] == 49)].iloc[0]
    ref_tau, ref_se = _tau_ref({c: [b[0][b[1] == c].numpy() for b in batches[:50]] for c in (0, 1)})
    assert first["n_a"] == 199 and first["n_b"] == 200
    assert first["tau"] == pytest.approx(ref_tau, rel=1e-12) and first["se"] == pytest.approx(ref_se, rel=1e-9)


def test_logger_eval_record_counts_the_nonfinite_examples(tmp_path: Path) -> None:
    loss = torch.tensor([1.0, 2.0, math.inf, 4.0, math.nan, 6.0], dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 1, 1, 0])
    with RunLogger(tmp_path / "r", class_names=NAMES) as log:
        log.log_eval(5, split="val", loss=1.0, per_example_loss=loss, class_ids=ids)
    rec = json.loads((tmp_path / "r" / "eval.jsonl").read_text())
    assert rec["n_nonfinite"] == 2
    assert rec["classes"]["regular"] == {"count": 2, "loss_sum": 7.0, "loss_m2": 12.5}
    assert rec["classes"]["irregular"] == {"count": 2, "loss_sum": 6.0, "loss_m2": 2.0}


def test_logger_kernel_and_class_loss_state_agree_on_nonfinite_losses() -> None:
    rng = np.random.default_rng(1)
    loss = rng.gamma(2.0, 1.0, size=40)
    loss[[3, 17, 18]] = [np.nan, np.inf, -np.inf]
    ids = rng.integers(0, 3, size=40)
    logged = class_welford_state(torch.from_numpy(loss), torch.from_numpy(ids), 3)
    st = ClassLossState.from_batch(torch.from_numpy(loss), torch.from_numpy(ids), 3)
    torch.testing.assert_close(logged, torch.stack([st.count.double(), st.loss_sum, st.loss_m2]), rtol=0, atol=0)
    for c in range(3):
        v = loss[(ids == c) & np.isfinite(loss)]
        assert int(st.count[c]) == len(v) and float(st.loss_m2[c]) == pytest.approx(((v - v.mean()) ** 2).sum())
    assert st.n_skipped.tolist() == [int(((ids == c) & ~np.isfinite(loss)).sum()) for c in range(3)]


def _run_with_rows(tmp: Path, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Run:
    """A run whose class rows are each step's (count, sum, M2) over all its examples, NaN included
    (what a logger without the skip rule wrote), and an evaluation with the same rule."""
    rows = []
    for step, (loss, ids) in enumerate(batches):
        for c, name in enumerate(NAMES):
            v = loss[ids == c].numpy()
            rows.append({"step": step, "cls": name, "count": len(v), "loss_sum": v.sum(),
                         "loss_m2": ((v - v.mean()) ** 2).sum()})
    ev_rows = [{"step": 50, "series": "val", "cls": "regular", "count": 4, "loss_sum": 4.0, "loss_m2": 0.5},
               {"step": 50, "series": "val", "cls": "irregular", "count": 1, "loss_sum": math.nan, "loss_m2": math.nan}]
    return Run(path=tmp, name="rows", source_format="synthetic", class_losses=pd.DataFrame(rows),
               eval_class_losses=pd.DataFrame(ev_rows),
               evals=pd.DataFrame({"step": [50], "series": ["val"], "loss": [1.0]}), class_names=list(NAMES))


def test_analysis_leaves_a_nonfinite_row_out_of_its_window_and_says_so(tmp_path: Path) -> None:
    batches = _batches(100, seed=2)
    batches[12][0][1] = math.nan  # step 12's irregular row has loss_sum NaN
    res = analyze_run(_run_with_rows(tmp_path, batches), AnalysisConfig(workers=1))
    tau = res.tables["tau"]
    train = tau[tau["source"] == "train"].set_index("step")
    # window 0: step 12's irregular row (4 examples) left out; window 1 untouched
    kept = [(b if s != 12 else (b[0][b[1] == 0], b[1][b[1] == 0])) for s, b in enumerate(batches[:50])]
    ref0 = _tau_ref({c: [b[0][b[1] == c].numpy() for b in kept] for c in (0, 1)})
    ref1 = _tau_ref({c: [b[0][b[1] == c].numpy() for b in batches[50:]] for c in (0, 1)})
    assert train.loc[49, "n_a"] == 196 and train.loc[49, "n_b"] == 200
    assert train.loc[49, "tau"] == pytest.approx(ref0[0], rel=1e-12) and train.loc[49, "se"] == pytest.approx(ref0[1], rel=1e-9)
    assert train.loc[99, "tau"] == pytest.approx(ref1[0], rel=1e-12) and train.loc[99, "se"] == pytest.approx(ref1[1], rel=1e-9)
    # the evaluation: the irregular row with a NaN sum is left out (no rows, no NaN mean for it)
    cl = res.tables["class_losses"]
    ev = cl[cl["source"] == "eval:val"].set_index("cls")
    assert ev.loc["regular", "count"] == 4 and "irregular" not in ev.index
    assert any("non-finite loss left out" in n and "train: 4" in n and "eval:val: 1" in n for n in res.notes)
