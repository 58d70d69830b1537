"""The training table (§9 flags per logged point) is the same whether it shares the run's own
long columns (a big log is not held twice) or is assembled series by series."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analyze.config import AnalysisConfig
from analyze.pipeline.log_tables import train_table
from loaders.rundir import load_run


def _log(path: Path) -> Path:
    rng = np.random.default_rng(3)
    lines = []
    for i in range(3000):
        loss = 2.0 + rng.normal(0, 0.02) + (5.0 if i in (700, 2100) else 0.0)
        rec = {"step": i, "loss": loss, "grad_norm": abs(rng.normal(1, 0.1)), "lr": 1e-3}
        if i == 1500:
            rec["loss"] = float("inf")
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shared_and_assembled_tables_agree(tmp_path: Path) -> None:
    run = load_run(_log(tmp_path / "log.jsonl"))
    cfg = AnalysisConfig()
    shared, reports = train_table(run, cfg)
    assert np.shares_memory(shared["value"].to_numpy(), run.scalars["value"].to_numpy())
    blocks = run.series_blocks()
    assert list(blocks) == ["grad_norm", "loss", "lr"] and blocks["loss"] == (3000, 6000)
    assert np.shares_memory(run.series("loss")["value"].to_numpy(), run.scalars["value"].to_numpy())
    # The same run with its series as plain strings and its rows shuffled: the table is assembled.
    run.scalars = run.scalars.sample(frac=1.0, random_state=0).astype({"series": object}).reset_index(drop=True)
    assert run.series_blocks() is None
    assembled, reports2 = train_table(run, cfg)
    assert not np.shares_memory(assembled["value"].to_numpy(), run.scalars["value"].to_numpy())
    pd.testing.assert_frame_equal(shared.reset_index(drop=True), assembled.reset_index(drop=True))
    assert [e.peak_step for e in reports["loss"].events if e.kind == "spike"] == [700, 2100]
    assert [(e.kind, e.first_step) for e in reports2["loss"].events] == [(e.kind, e.first_step)
                                                                      for e in reports["loss"].events]
    flagged = shared[(shared["series"] == "loss") & shared["spike"]]
    assert flagged["step"].tolist() == [700, 1500, 2100]
    assert flagged["spike_kind"].astype(str).tolist() == ["spike", "non-finite", "spike"]
