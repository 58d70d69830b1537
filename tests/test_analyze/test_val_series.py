"""One chooser of the validation series behind the overfitting verdict (§10): the loader's recorded
choice and the report's series are the same, whatever the run format."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run
from loaders import load_run
from loaders.longtables import PREFERRED_VAL, preferred_val_series
from loaders.run import Run


def _trainer_state(folder: Path) -> Path:
    """A Hugging Face trainer_state.json whose evaluations log `val/loss` and `eval_g0_loss`."""
    history = [{"step": s, "loss": 3.0 - s / 100, "learning_rate": 1e-3} for s in range(10, 201, 10)]
    history += [{"step": s, "val/loss": 2.5 + abs(s - 120) / 200, "eval_g0_loss": 2.0 + s / 1000}
                for s in range(20, 201, 20)]
    folder.mkdir()
    p = folder / "trainer_state.json"
    p.write_text(json.dumps({"global_step": 200, "log_history": sorted(history, key=lambda e: e["step"])}))
    return p


def test_loader_and_report_use_the_same_validation_series(tmp_path: Path) -> None:
    run = load_run(_trainer_state(tmp_path / "hf"))
    assert set(run.evals["series"]) == {"val/loss", "eval_g0_loss"}
    assert run.meta["val_series_preferred"] == "val/loss"  # listed in PREFERRED_VAL; eval_g0_loss is not
    res = analyze_run(run, AnalysisConfig(workers=1))
    assert res.summary["overfitting"]["val_series"] == "val/loss"
    assert res.run_info["val_series"] == "val/loss"
    assert set(res.tables["overfitting"]["val_series"]) == {"val/loss"}
    assert any("validation series 'val/loss' is used" in n and "'eval_g0_loss'" in n for n in res.notes)


@pytest.mark.parametrize(("names", "expected"), [
    ({"val/loss", "eval_g0_loss"}, "val/loss"),
    ({"val_loss", "eval_loss"}, "eval_loss"),
    ({"train", "val"}, "val"),
    ({"train", "eval_train", "zeta", "alpha"}, "alpha"),  # none preferred: the first in sorted order
    ({"train", "train_eval"}, None),                      # eval-mode losses on a training subset only
    (set(), None),
])
def test_preferred_val_series(names: set[str], expected: str | None) -> None:
    assert preferred_val_series(names) == expected
    assert preferred_val_series(sorted(names, reverse=True)) == expected  # order of the input is irrelevant


def test_a_native_run_uses_the_same_chooser(tmp_path: Path) -> None:
    # our run directory records no choice: the analysis applies the same chooser to its evaluations
    steps = list(range(0, 100, 10))
    evals = pd.concat([pd.DataFrame({"step": steps, "series": s, "loss": 2.0}) for s in ("test", "val", "train")])
    run = Run(path=tmp_path, name="n", source_format="synthetic", evals=evals.reset_index(drop=True))
    res = analyze_run(run, AnalysisConfig(workers=1))
    assert res.summary["overfitting"]["val_series"] == preferred_val_series(evals["series"]) == "val"
    assert "val" in PREFERRED_VAL
