"""Spectral-norm growth (analyze.metrics.growth, §4 §12): one definition, mid-run checkpoint to the
last, held against AnalysisConfig.spectral_growth by the findings and the comparison page alike;
and the other rule thresholds read from AnalysisConfig."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analyze.config import AnalysisConfig
from analyze.metrics.growth import growth_reference_step, spectral_growth
from analyze.pipeline.audit import audit_checkpoint
from analyze.pipeline.compare import spectral_growth as comparison_growth
from analyze.pipeline.findings import Context, derive
from analyze.pipeline.tables import TABLE_COLUMNS

THRESHOLD = AnalysisConfig().spectral_growth


def _table(sigmas: dict[str, dict[int, float]], exact: bool = True) -> pd.DataFrame:
    """A spectral table: tensor -> step -> sigma_1 (in sigma_exact, or only in sigma_est)."""
    rows = []
    for name, by_step in sigmas.items():
        for step, s in by_step.items():
            rows.append({"step": step, "tensor": name, "finite": True, "sigma_est": s * (1 - 1e-6),
                         "sigma_exact": s if exact else math.nan})
    return pd.DataFrame(rows)


def _growth_findings(spectral: pd.DataFrame, cfg: AnalysisConfig) -> dict[str, float]:
    tables = {k: pd.DataFrame({c: pd.Series(dtype="object") for c in cols}) for k, cols in TABLE_COLUMNS.items()}
    tables["spectral"] = spectral.reindex(columns=TABLE_COLUMNS["spectral"])
    tables["spectral"]["finite"] = True
    ctx = Context(cfg, "t", False, None, None, 0)
    return {f.tensor: f.value for f in derive(tables, ctx) if f.code == "spectral_growth"}


# at step 0 every norm is tiny (initialisation): first-to-last growth would flag everything
TABLE = {"at": {0: 0.01, 100: 1.5, 200: 1.5 * THRESHOLD},          # exactly the threshold: not flagged
         "above": {0: 0.01, 100: 1.0, 200: THRESHOLD + 1e-9},      # just above it: flagged
         "below": {0: 0.01, 100: 1.0, 200: THRESHOLD - 1e-9},
         "shrinks": {0: 0.01, 100: 3.0, 200: 1.0}}


def test_growth_is_mid_run_to_last_and_the_threshold_is_strict() -> None:
    g = spectral_growth(_table(TABLE))
    assert g is not None and (g.ref_step, g.last_step) == (100, 200)
    want = {k: v[200] / v[100] for k, v in TABLE.items()}  # by hand, from the mid-run checkpoint
    assert g.ratio.to_dict() == pytest.approx(want, rel=1e-15)
    assert g.ratio["at"] == THRESHOLD
    assert list(g.flagged(THRESHOLD).index) == ["above"]
    assert _growth_findings(_table(TABLE), AnalysisConfig()) == pytest.approx({"above": want["above"]})
    # the threshold comes from the config: lower it and "below" and "at" are flagged too
    lower = AnalysisConfig(spectral_growth=THRESHOLD - 1e-6)
    assert set(_growth_findings(_table(TABLE), lower)) == {"at", "above", "below"}


def test_comparison_page_uses_the_findings_definition_and_threshold() -> None:
    # Was: the comparison page measured first -> last (here 150x on "at", from initialisation).
    cmp = comparison_growth(_table(TABLE))
    assert cmp is not None and (cmp.first_step, cmp.last_step) == (100, 200)
    assert cmp.tensor == "above" and cmp.ratio == THRESHOLD + 1e-9 and cmp.flagged
    assert cmp.threshold == THRESHOLD and cmp.to_json()["flagged"] is True
    at = comparison_growth(_table({k: TABLE[k] for k in ("at", "below", "shrinks")}))
    assert at is not None and at.tensor == "at" and at.ratio == THRESHOLD and not at.flagged
    assert at.to_json()["threshold"] == THRESHOLD and at.to_json()["flagged"] is False
    assert set(_growth_findings(_table(TABLE), AnalysisConfig())) == {"above"}


def test_estimate_stands_in_where_exact_did_not_run_and_edge_cases() -> None:
    g = spectral_growth(_table(TABLE, exact=False))
    assert g is not None
    assert g.ratio["above"] == pytest.approx((THRESHOLD + 1e-9) / 1.0, rel=1e-12)  # sigma_est ratio
    assert spectral_growth(_table({"a": {5: 1.0}})) is None                      # one checkpoint
    two = spectral_growth(_table({"a": {0: 1.0, 10: 3.0}}))                       # two: from the first
    assert two is not None and (two.ref_step, two.ratio["a"]) == (0, 3.0)
    zero = spectral_growth(_table({"a": {0: 1.0, 10: 0.0, 20: 3.0}, "b": {0: 1.0, 10: 1.0, 20: 2.0}}))
    assert zero is not None and list(zero.ratio.index) == ["b"]                   # sigma_ref = 0: no ratio


@pytest.mark.parametrize(("steps", "ref"), [([0, 100, 200], 100), ([0, 30, 160, 200], 160), ([0, 10], 0),
                                            ([0, 50, 150, 200], 50), ([0, 10, 20, 1000], 20)])
def test_reference_step_is_nearest_half_the_last_step(steps: list[int], ref: int) -> None:
    assert growth_reference_step(steps) == ref


def test_the_sheets_drill_is_flagged() -> None:
    # The sheet's drill: QKV spectral norm 1.2 at init, 14.0 by step 500 (mid-run here: 3.0).
    g = spectral_growth(_table({"qkv": {0: 1.2, 250: 3.0, 500: 14.0}}))
    assert g is not None and g.ratio["qkv"] == pytest.approx(14.0 / 3.0) and not g.flagged(THRESHOLD).empty


def test_audit_thresholds_come_from_the_config(tmp_path: Path) -> None:
    w = torch.eye(4) * 50.0
    p = tmp_path / "ck.safetensors"
    save_file({"w": w}, str(p))
    codes = {f.code for f in audit_checkpoint(p).findings}
    assert "large_weights" not in codes and "large_spectral_norm" not in codes
    strict = audit_checkpoint(p, AnalysisConfig(max_abs_warn=49.0, sigma_warn=49.0))
    by_code = {f.code: f for f in strict.findings}
    assert by_code["large_weights"].threshold == 49.0 and by_code["large_spectral_norm"].value == pytest.approx(50.0)
    assert by_code["stable_rank"].value == pytest.approx(4.0, rel=1e-12)  # ||I||_F^2 / 1 for I * 50


def test_grad_ratio_status_and_findings_follow_the_configured_band(tiny_demo_run: Path) -> None:
    from analyze.pipeline.analysis import analyze_run

    base = analyze_run(tiny_demo_run, AnalysisConfig(workers=1)).tables["grad_ratio"]
    assert len(base)
    rho = base["rho"].astype(float).to_numpy()
    want = np.where(~np.isfinite(rho) | (rho > 1e-1), "unstable", np.where(rho < 1e-4, "barely training", "healthy"))
    assert list(base["status"]) == list(want)  # the §11 band, independently
    tight = analyze_run(tiny_demo_run, AnalysisConfig(workers=1, rho_low=1e-9, rho_high=1e-8))
    assert set(tight.tables["grad_ratio"]["status"]) == {"unstable"}
    flagged = [f for f in tight.findings if f.code == "grad_ratio"]
    assert flagged and all(f.threshold == 1e-8 for f in flagged if f.value is not None)


def test_finding_thresholds_come_from_the_config() -> None:
    """Dead-unit warning, attention-logit growth and the end-of-run tau band, each at its default
    and with the config moved past the value."""
    tables = {k: pd.DataFrame({c: pd.Series(dtype="object") for c in cols}) for k, cols in TABLE_COLUMNS.items()}
    tables["dead_neurons"] = pd.DataFrame([{"step": 9, "layer": "blocks.0", "d_ff": 100, "dead_count": 5,
                                            "dead_fraction": 0.05, "n_tokens": 10, "eps": 1e-3, "activation": "gelu"}])
    tables["attention_logits"] = pd.DataFrame({"step": [0, 9], "layer": [0, 0], "max_logit": [6.0, 12.5]})
    tables["tau"] = pd.DataFrame({"source": ["train"], "step": [2000], "tau": [0.6], "se": [0.05]})

    def found(cfg: AnalysisConfig) -> dict[str, object]:
        ctx = Context(cfg, "t", True, None, None, 0, last_step=2000)
        return {f.code: (f.severity, f.threshold) for f in derive(tables, ctx)}

    base = found(AnalysisConfig())
    assert base["dead_neurons"] == ("warning", 0.05)        # 0.05 >= 0.05: a warning
    assert "attention_logit_growth" in base                 # 12.5 > 2 x 6 and > 10
    assert base["tau_band"] == ("info", 0.5)                # 0.6 above the end band (0.2, 0.5)
    moved = found(AnalysisConfig(dead_fraction_warn=0.06, logit_growth=2.1, tau_band_min_steps=2001))
    assert moved["dead_neurons"] == ("info", 0.06)
    assert "attention_logit_growth" not in moved and "tau_band" not in moved
    assert "attention_logit_growth" not in found(AnalysisConfig(logit_growth_min=12.5))
    wide = AnalysisConfig(expected_tau_bands=((None, None, 0.2, 0.7),))
    assert "tau_band" not in found(wide)
