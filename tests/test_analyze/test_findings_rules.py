"""Every finding rule (analyze.pipeline.findings) on both sides of its threshold, on planted tables.

Each threshold is taken from the AnalysisConfig the rule is given: a test moves the config's value
across the planted number and the finding must appear or vanish with it. The expected values are
computed here by hand from the planted numbers.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analyze.config import AnalysisConfig
from analyze.metrics.overfitting import analyze_overfitting
from analyze.pipeline import findings as F
from analyze.pipeline.log_tables import frame
from analyze.pipeline.tables import SPECTRAL_COLUMNS, TABLE_COLUMNS, finding_counts

CFG = AnalysisConfig()


def empty_tables() -> dict[str, pd.DataFrame]:
    return {name: frame(name, []) for name in TABLE_COLUMNS}


def ctx(cfg: AnalysisConfig = CFG, **kw) -> F.Context:
    base = dict(cfg=cfg, run_name="planted", is_builtin_corpus=False, overfitting=None, val_series="val",
                n_data_warnings=0, last_step=0)
    base.update(kw)
    return F.Context(**base)


def derive(cfg: AnalysisConfig = CFG, c: F.Context | None = None, **tables: pd.DataFrame):
    t = empty_tables()
    t.update(tables)
    return F.derive(t, c or ctx(cfg))


def codes(found) -> list[str]:
    return [f.code for f in found]


def test_empty_tables_give_no_finding():
    assert derive() == []


# --------------------------------------------------------------------------- data warnings


def test_data_warnings_finding_counts_them():
    assert derive(c=ctx(n_data_warnings=0)) == []
    (f,) = derive(c=ctx(n_data_warnings=3))
    assert f.code == "data_warnings" and f.value == 3 and f.severity == "warning"


# --------------------------------------------------------------------------- spikes (§9)


def spike_rows(series: str, kinds: list[str]) -> pd.DataFrame:
    rows = []
    for i, k in enumerate(kinds):
        h = None if k == "non-finite" else 14.826 * (i + 1)
        rows.append({"series": series, "kind": k, "first_step": 100 * (i + 1), "peak_step": 100 * (i + 1) + 1,
                     "height_mad": h, "height_sigma": None if h is None else h / 1.4826, "length": 2})
    return frame("spikes", rows)


def test_spike_findings_quote_both_units_and_severity_by_series():
    found = derive(spikes=pd.concat([spike_rows("loss", ["spike", "non-finite"]), spike_rows("grad_norm", ["spike"])]))
    by = {f.code: f for f in found}
    assert set(by) == {"loss_spike", "nonfinite_loss", "grad_norm_spike"}
    assert by["nonfinite_loss"].severity == "error" and by["loss_spike"].severity == "warning"
    assert by["grad_norm_spike"].severity == "info"
    f = by["loss_spike"]
    # value and threshold in one unit: robust sigmas (k); the message gives MAD units beside them
    assert f.value == pytest.approx(10.0) and f.threshold == CFG.spike_k and f.step == 101
    assert "14.8 MAD units" in f.message and "10.0 robust sigmas" in f.message
    assert found[0].code == "nonfinite_loss"  # errors first


def test_capped_spikes_count_every_event():
    found = derive(spikes=spike_rows("loss", ["spike"] * 8))
    assert len(found) == F.MAX_PER_KIND + 1
    more = found[-1]
    assert more.n == 8 - F.MAX_PER_KIND and more.message.startswith("3 more")
    assert finding_counts(found) == {"error": 0, "warning": 8, "info": 0}
    assert more.to_json()["n"] == 3


# --------------------------------------------------------------------------- overfitting and memorisation (§10)


EV = np.arange(1, 8) * 50


def of_ctx(val: np.ndarray, cfg: AnalysisConfig = CFG, train: np.ndarray | None = None) -> tuple[F.Context, object]:
    tr = np.linspace(2.0, 0.5, EV.size) if train is None else train
    of = analyze_overfitting(EV, tr, EV, val, alpha=cfg.gl_alpha, delta=cfg.divergence_delta,
                             min_spearman=cfg.divergence_spearman, min_after=cfg.divergence_min_evals,
                             trend_evals=cfg.overfit_trend_evals)
    return ctx(cfg, overfitting=of), of


def test_sustained_rise_is_overfitting_with_the_gl_of_its_own_row():
    val = np.array([2.0, 1.5, 1.0, 1.1, 1.2, 1.25, 1.3])  # min at step 150, ends 30 % above, rising
    c, of = of_ctx(val)
    (f,) = [f for f in derive(c=c) if f.code in ("overfitting", "overfitting_recovered")]
    assert f.code == "overfitting" and f.severity == "warning"
    # step and value of one evaluation: the last, with its own GL (1.3 / 1.0 - 1 = 30 %)
    assert f.step == 350 and f.value == pytest.approx(30.0) and f.threshold == CFG.gl_alpha
    assert "Rule:" in f.message and not f.message.lower().startswith("overfitting: overfitting")
    # the same history held against gl_alpha = 35 %: no rise above it, no finding
    c, _ = of_ctx(val, AnalysisConfig(gl_alpha=35.0))
    assert not {"overfitting", "overfitting_recovered"} & set(codes(derive(c=c)))


def test_bump_the_run_recovered_from_is_not_overfitting():
    # GL 32 % at step 200, back to 2.6 % above the best at the end and falling (the demo's shape)
    val = np.array([2.0, 1.5, 1.0, 1.32, 1.1, 1.05, 1.026])
    c, of = of_ctx(val)
    found = derive(c=c)
    assert "overfitting" not in codes(found)
    (f,) = [f for f in found if f.code == "overfitting_recovered"]
    assert f.severity == "info" and f.step == 200 and f.value == pytest.approx(32.0)
    assert of.verdict == "recovered" and "recovered" in of.headline
    # a trend window of 2 with the end still rising -> the same end GL (2.6 %) is below alpha: recovered
    # but with gl_alpha = 2 the end (2.6 %) is above it; falling over the last 3 -> still recovered
    c, of = of_ctx(val, AnalysisConfig(gl_alpha=2.0))
    assert of.verdict == "recovered"
    # ... and rising over the last 3 evaluations at 2.6 % with gl_alpha = 2 -> sustained
    c, of = of_ctx(np.array([2.0, 1.5, 1.0, 1.32, 1.01, 1.02, 1.026]), AnalysisConfig(gl_alpha=2.0))
    assert of.verdict == "overfitting" and "overfitting" in codes(derive(c=c))


def overfit_table(train: float, val: float) -> pd.DataFrame:
    return frame("overfitting", [
        {"step": 100, "val_series": "val", "val_loss": 1.0, "train_loss": 0.9, "gap": 0.1, "gap_smoothed": 0.1,
         "gl": 0.0},
        {"step": 200, "val_series": "val", "val_loss": val, "train_loss": train, "gap": val - train,
         "gap_smoothed": val - train, "gl": 0.0},
        {"step": 300, "val_series": "val", "val_loss": 0.5, "train_loss": math.nan, "gap": math.nan,
         "gap_smoothed": math.nan, "gl": 0.0}])  # last evaluation without a training loss: not used


@pytest.mark.parametrize("train, val, cfg, expected", [
    (0.0027, 0.177, CFG, True),                              # the demo's end
    (0.0027, 0.177, AnalysisConfig(memorisation_ratio=0.01), False),  # ratio 0.015 > 0.01
    (0.0027, 0.177, AnalysisConfig(memorisation_min_gap=0.2), False),  # gap 0.174 < 0.2
    (0.24, 1.0, CFG, True),                                  # ratio 0.24 <= 0.25
    (0.26, 1.0, CFG, False),                                 # ratio 0.26 > 0.25
    (0.02, 0.11, CFG, False),                                # ratio 0.18 but gap 0.09 < 0.1
])
def test_memorisation_both_sides(train, val, cfg, expected):
    found = [f for f in derive(cfg, c=ctx(cfg), overfitting=overfit_table(train, val)) if f.code == "memorisation"]
    assert bool(found) is expected
    if found:
        (f,) = found
        assert f.step == 200 and f.value == pytest.approx(train / val) and f.threshold == cfg.memorisation_ratio
        assert "Rule:" in f.message


# --------------------------------------------------------------------------- spectral (§4, §12)


def spectral(rows: list[dict]) -> pd.DataFrame:
    base = {c: math.nan for c in SPECTRAL_COLUMNS}
    out = []
    for r in rows:
        d = dict(base, shape="8x8", method="lanczos", warm_start=False, power_warm_start=False,
                 power_converged=True, finite=True, iterations=5, power_iterations=10)
        d.update(r)
        out.append(d)
    return frame("spectral", out)


def growth_rows(g_a: float, g_b: float) -> pd.DataFrame:
    rows = []
    for step, fa, fb in ((0, 0.5, 0.5), (500, 1.0, 1.0), (1000, g_a, g_b)):  # reference = step 500
        rows += [{"step": step, "tensor": "a.weight", "sigma_est": fa, "sigma_exact": fa, "rel_err": 0.0,
                  "power_rel_err": 0.0},
                 {"step": step, "tensor": "b.weight", "sigma_est": fb, "sigma_exact": fb, "rel_err": 0.0,
                  "power_rel_err": 0.0}]
    return spectral(rows)


def test_spectral_growth_both_sides_of_the_config_factor():
    found = derive(spectral=growth_rows(2.1, 1.9))
    (f,) = [f for f in found if f.code == "spectral_growth"]
    assert f.tensor == "a.weight" and f.value == pytest.approx(2.1) and f.threshold == 2.0 and f.step == 1000
    found = derive(AnalysisConfig(spectral_growth=1.8), spectral=growth_rows(2.1, 1.9))
    assert sorted(f.tensor for f in found if f.code == "spectral_growth") == ["a.weight", "b.weight"]
    assert not [f for f in derive(AnalysisConfig(spectral_growth=2.2), spectral=growth_rows(2.1, 1.9))
                if f.code == "spectral_growth"]


def test_estimator_error_both_sides():
    t = spectral([{"step": 10, "tensor": "a", "sigma_est": 1.0, "sigma_exact": 1.002, "rel_err": 2e-3,
                   "err_bound": 1e-5, "power_rel_err": 0.0},
                  {"step": 10, "tensor": "b", "sigma_est": 1.0, "sigma_exact": 1.0005, "rel_err": 5e-4,
                   "err_bound": 1e-5, "power_rel_err": 0.0}])
    (f,) = [f for f in derive(spectral=t) if f.code == "estimator_error"]
    assert f.tensor == "a" and f.value == 2e-3 and f.threshold == CFG.estimator_rel_tol
    assert {f.tensor for f in derive(AnalysisConfig(estimator_rel_tol=4e-4), spectral=t)
            if f.code == "estimator_error"} == {"a", "b"}
    assert not [f for f in derive(AnalysisConfig(estimator_rel_tol=3e-3), spectral=t) if f.code == "estimator_error"]


def test_power_iteration_finding_quotes_the_ratio_of_the_matrix_it_names():
    t = spectral([{"step": 10, "tensor": "worst", "power_rel_err": 5e-2, "sigma_ratio": 0.960, "rel_err": 0.0},
                  {"step": 10, "tensor": "other", "power_rel_err": 2e-3, "sigma_ratio": 0.992, "rel_err": 0.0},
                  {"step": 10, "tensor": "fine", "power_rel_err": 1e-4, "sigma_ratio": 0.999, "rel_err": 0.0}])
    (f,) = [f for f in derive(spectral=t) if f.code == "power_iteration_error"]
    assert f.tensor == "worst" and f.value == 5e-2
    assert "0.960" in f.message and "0.992" not in f.message and "2 of 3" in f.message
    assert not [f for f in derive(AnalysisConfig(estimator_rel_tol=0.1), spectral=t)
                if f.code == "power_iteration_error"]


def test_nonfinite_weights_is_an_error():
    t = spectral([{"step": 10, "tensor": "a", "finite": False, "rel_err": math.nan, "power_rel_err": math.nan},
                  {"step": 10, "tensor": "b", "finite": True, "rel_err": 0.0, "power_rel_err": 0.0}])
    (f,) = [f for f in derive(spectral=t) if f.code == "nonfinite_weights"]
    assert f.tensor == "a" and f.severity == "error"
    t.loc[:, "finite"] = True
    assert not [f for f in derive(spectral=t) if f.code == "nonfinite_weights"]


# --------------------------------------------------------------------------- dead units and heads (§5, §6)


def dead(count: int, d_ff: int = 100, step: int = 10) -> dict:
    return {"step": step, "layer": "block0", "d_ff": d_ff, "dead_count": count, "dead_fraction": count / d_ff,
            "near_dead_count": count, "n_tokens": 1000, "eps": 1e-3, "activation": "gelu",
            "activation_sparsity": 0.1}


def test_dead_units_severity_by_the_config_fraction_and_only_the_last_checkpoint():
    assert derive(dead_neurons=frame("dead_neurons", [dead(0)])) == []
    (f,) = derive(dead_neurons=frame("dead_neurons", [dead(4)]))  # 4 % < 5 %
    assert (f.code, f.severity, f.value, f.threshold) == ("dead_neurons", "info", 0.04, CFG.dead_fraction_warn)
    (f,) = derive(dead_neurons=frame("dead_neurons", [dead(6)]))  # 6 % >= 5 %
    assert f.severity == "warning"
    (f,) = derive(AnalysisConfig(dead_fraction_warn=0.07), dead_neurons=frame("dead_neurons", [dead(6)]))
    assert f.severity == "info"
    # units dead at an earlier checkpoint but not at the last one: nothing
    assert derive(dead_neurons=frame("dead_neurons", [dead(9, step=5), dead(0, step=10)])) == []


def head(dead_: bool, step: int = 10) -> dict:
    return {"step": step, "layer": 0, "head": 1, "mean_entropy": 0.3, "mean_norm_entropy": 0.1, "dead": dead_,
            "dead_ge4": True, "share_2_3_keys": 0.1, "sink_mass": 0.5, "offset_mode": 0, "offset_share": 0.9,
            "label": "first-token sink"}


def test_dead_heads_at_the_last_checkpoint():
    (f,) = derive(attention=frame("attention", [head(True)]))
    assert f.code == "dead_head" and f.tensor == "layer 0 head 1" and f.threshold == pytest.approx(math.log(2))
    assert derive(attention=frame("attention", [head(False)])) == []
    assert derive(attention=frame("attention", [head(True, step=5), head(False, step=10)])) == []


# --------------------------------------------------------------------------- grad-to-weight ratio (§11)


def rho_rows(*rhos: float, status: str = "healthy") -> pd.DataFrame:
    return frame("grad_ratio", [{"step": 10, "tensor": f"t{i}", "rho": r, "grad_norm": r, "weight_norm": 1.0,
                                 "status": status, "source": "training"} for i, r in enumerate(rhos)])


def test_rho_band_both_sides_read_from_the_config_not_the_cached_status():
    found = derive(grad_ratio=rho_rows(5e-5, 1e-3, 0.2))  # below, inside, above the default band
    got = {f.tensor: f for f in found}
    assert set(got) == {"t0", "t2"}
    assert got["t0"].threshold == CFG.rho_low and "below" in got["t0"].message
    assert got["t2"].threshold == CFG.rho_high and "above" in got["t2"].message
    assert "logged in training" in got["t0"].message
    # a narrower band from the config flags the middle one too (the rows' status says "healthy")
    assert {f.tensor for f in derive(AnalysisConfig(rho_low=2e-3), grad_ratio=rho_rows(5e-5, 1e-3, 0.2))} == \
        {"t0", "t1", "t2"}
    assert derive(AnalysisConfig(rho_low=1e-5, rho_high=0.5), grad_ratio=rho_rows(5e-5, 1e-3, 0.2)) == []


# --------------------------------------------------------------------------- attention logits (§12)


def logits(first: float, last: float) -> pd.DataFrame:
    return frame("attention_logits", [{"step": 0, "layer": 0, "max_logit": first},
                                      {"step": 100, "layer": 0, "max_logit": last}])


def test_logit_growth_needs_both_the_factor_and_the_floor():
    (f,) = derive(attention_logits=logits(6.0, 12.6))  # 2.1x and above 10
    assert f.code == "attention_logit_growth" and f.value == 12.6
    assert derive(attention_logits=logits(6.0, 11.4)) == []  # 1.9x
    assert derive(attention_logits=logits(4.0, 9.0)) == []  # 2.25x but below 10
    assert derive(AnalysisConfig(logit_growth_min=8.0), attention_logits=logits(4.0, 9.0))
    assert derive(AnalysisConfig(logit_growth=1.8), attention_logits=logits(6.0, 11.4))


# --------------------------------------------------------------------------- tau (§8)


def tau_rows(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    return frame("tau", [{"source": s, "step": st, "class_a": "irregular", "class_b": "regular", "tau": t, "se": se,
                          "n_a": 50, "n_b": 50} for s, st, t, se in rows])


def test_tau_band_at_the_end_of_a_full_length_builtin_run():
    lo, hi = CFG.expected_tau_end
    c = ctx(is_builtin_corpus=True, last_step=CFG.tau_band_min_steps)
    assert derive(c=c, tau=tau_rows([("train", 1000, (lo + hi) / 2, 0.01)])) == []
    (f,) = derive(c=c, tau=tau_rows([("train", 1000, hi + 0.1, 0.01)]))
    assert f.code == "tau_band" and f.threshold == hi
    (f,) = derive(c=c, tau=tau_rows([("train", 1000, lo - 0.1, 0.01)]))
    assert f.threshold == lo
    # a shorter run, or not the built-in corpus: not judged
    assert derive(c=ctx(is_builtin_corpus=True, last_step=CFG.tau_band_min_steps - 1),
                  tau=tau_rows([("train", 999, hi + 0.1, 0.01)])) == []
    assert derive(c=ctx(is_builtin_corpus=False, last_step=5000), tau=tau_rows([("train", 1000, hi + 0.1, 0.01)])) == []


def test_tau_disagreement_at_the_combined_se():
    se_t, se_c = 0.03, 0.04  # combined SE 0.05
    def rows(diff: float) -> pd.DataFrame:
        return tau_rows([("train", 149, 0.1, 0.01), ("train", 199, 0.0, se_t), ("checkpoint", 200, diff, se_c),
                         ("train", 249, 0.0, se_t)])
    (f,) = derive(tau=rows(0.105))  # 2.1 combined SE
    assert f.code == "tau_disagreement" and f.step == 200 and f.value == pytest.approx(2.1)
    assert f.threshold == CFG.tau_disagreement_se and "199" in f.message  # paired with the window ending at 199
    assert derive(tau=rows(0.095)) == []  # 1.9 combined SE
    assert derive(AnalysisConfig(tau_disagreement_se=1.5), tau=rows(0.095))
    # evaluation tau ('eval:...') is not the checkpoint's: never compared
    assert derive(tau=tau_rows([("train", 199, 0.0, se_t), ("eval:val", 200, 1.0, se_c)])) == []
    # a training window ending a full class_window before the checkpoint is not "the same point"
    assert derive(tau=tau_rows([("train", 150, 0.0, se_t), ("checkpoint", 200, 1.0, se_c)])) == []


# --------------------------------------------------------------------------- checkpoint to keep


def test_checkpoint_to_keep_by_hand():
    t = empty_tables()
    t["evals"] = frame("evals", [{"step": s, "series": "val", "loss": v} for s, v in
                                 ((50, 3.0), (100, 2.0), (150, 1.5), (250, 1.2), (300, 1.6))]
                       + [{"step": 300, "series": "other", "loss": 0.1}])
    # checkpoint 200 has no evaluation at its step: the latest before it (150: 1.5); 300 -> 1.6; 250 -> 1.2
    keep = F.checkpoint_to_keep(t, [100, 200, 250, 300], "val")
    assert keep == {"best_val_step": 250, "last_stable_step": 300}
    t["spikes"] = spike_rows("grad_norm", ["spike"])  # first event at step 100
    assert F.checkpoint_to_keep(t, [100, 200, 250, 300], "val")["last_stable_step"] is None
    assert F.checkpoint_to_keep(t, [50, 100, 200], "val")["last_stable_step"] == 50
    t["spikes"] = frame("spikes", [])
    t["spectral"] = spectral([{"step": 250, "tensor": "a", "finite": False}])
    assert F.checkpoint_to_keep(t, [100, 200, 250, 300], "val")["last_stable_step"] == 200
    # no validation series: the checkpoints' own eval-set losses
    t["evals"] = frame("evals", [])
    t["eval_set"] = frame("eval_set", [{"step": s, "loss": v, "n_tokens": 1, "n_examples": 1, "mean_log_z": 0.0}
                                       for s, v in ((100, 2.0), (200, 1.0), (300, 1.0))])
    assert F.checkpoint_to_keep(t, [100, 200, 300], None)["best_val_step"] == 200  # first on ties
    assert F.checkpoint_to_keep(empty_tables(), [], None) == {"best_val_step": None, "last_stable_step": None}
