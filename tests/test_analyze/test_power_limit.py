"""The sheet's power iteration runs only on checkpoints up to `power_iteration_max_params`
parameters (§4): a planted pair of matrices one parameter under / over the limit, through
analyze_run, against numpy's SVD; the default estimator and its bound stay on every row."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analyze.config import AnalysisConfig
from analyze.pipeline.analysis import analyze_run
from loaders.run import CheckpointRef, Run

LIMIT = 30 * 20 + 20 * 20  # the pair of matrices below: 1,000 parameters


def _run(folder: Path, extra: int) -> tuple[Run, dict[str, np.ndarray]]:
    """One checkpoint: a.weight (30x20) + b.weight (20x20), plus `extra` parameters in a 1-D scale."""
    g = torch.Generator().manual_seed(5)
    tensors = {"a.weight": torch.randn(30, 20, generator=g), "b.weight": torch.randn(20, 20, generator=g)}
    if extra:
        tensors["scale"] = torch.ones(extra)
    folder.mkdir(parents=True)
    p = folder / "step_00000010.safetensors"
    save_file(tensors, str(p))
    scalars = pd.DataFrame({"step": np.arange(10), "series": "loss", "value": np.linspace(3, 1, 10)})
    run = Run(path=folder, name="planted", source_format="synthetic", scalars=scalars,
              checkpoints=[CheckpointRef(10, p, "safetensors")])
    return run, {k: v.double().numpy() for k, v in tensors.items() if v.ndim == 2}


@pytest.mark.parametrize("extra, power_on", [(0, True), (1, False)])
def test_power_iteration_runs_up_to_the_limit_and_not_above(tmp_path: Path, extra: int, power_on: bool) -> None:
    run, mats = _run(tmp_path / "run", extra)
    cfg = AnalysisConfig(exact_svd=False, power_iteration_max_params=LIMIT, power_max_iter=1000, power_tol=1e-9)
    res = analyze_run(run, cfg, cache_dir=tmp_path / "cache")
    sp = res.tables["spectral"].set_index("tensor")
    assert sorted(sp.index) == sorted(mats)
    for name, w in mats.items():
        s1 = np.linalg.svd(w, compute_uv=False)[0]
        row = sp.loc[name]
        # the default estimator with its bound on every row, either side of the limit
        assert row["method"] == "lanczos"
        assert abs(row["sigma_est"] - s1) <= row["err_bound"] * row["sigma_est"] + 1e-9 * s1
        if power_on:
            assert row["power_iterations"] >= 1 and row["sigma_power"] == pytest.approx(s1, rel=1e-3)
        else:
            assert math.isnan(row["sigma_power"]) and math.isnan(row["power_rel_err"])
            assert row["power_iterations"] == 0
    said = [n for n in res.notes if "power iteration off" in n]
    assert bool(said) is not power_on
    if said:
        assert f"{LIMIT + 1:,} parameters" in said[0] and f"on up to {LIMIT:,}" in said[0]


def test_power_limit_none_is_any_size_and_negative_is_refused() -> None:
    assert AnalysisConfig(power_iteration_max_params=None).use_power_iteration(10**12)
    assert not AnalysisConfig(power_iteration=False).use_power_iteration(1)
    cfg = AnalysisConfig()  # the default keeps GPT-2-small (124,439,808 parameters) and stops at 1.1B
    assert cfg.use_power_iteration(124_439_808) and not cfg.use_power_iteration(1_100_048_384)
    with pytest.raises(ValueError, match="power_iteration_max_params"):
        AnalysisConfig(power_iteration_max_params=-1)
