"""Panels and the page head drawn from a planted result: what the panels choose to draw (tau boxes
by run length), what they write beside it (spike score, rho source, band edges), and the key facts
a reader sees first (verdict, worst finding, checkpoint to keep)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import Rectangle

from analyze.config import AnalysisConfig
from analyze.pipeline.tables import TABLE_COLUMNS, Finding
from reports import figures as F
from reports import html as H
from reports import page as P
from reports.panels import PANEL_SPECS, build_panels


def result(only: tuple[str, ...], *, tables: dict | None = None, **kw) -> SimpleNamespace:
    """A result whose panels other than `only` are marked not computed."""
    T = {k: pd.DataFrame({c: [] for c in cols}) for k, cols in TABLE_COLUMNS.items()}
    T.update(tables or {})
    base = dict(tables=T, findings=[], notes=[], summary={}, run_info={"name": "r"}, headlines={},
                panels={pid: ("" if pid in only else "not in this test") for pid, *_ in PANEL_SPECS},
                data_warnings=[], config=AnalysisConfig(), counts={}, headline={}, not_analysed=[])
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def drawn(monkeypatch):
    """draw name -> the matplotlib Figure it drew (instead of a PNG); closed after the test."""
    figs: dict = {}
    orig = P.draw_figure

    def capture(draw: str, *args, **kwargs) -> str:
        monkeypatch.setattr(F, "fig_to_data_uri", lambda fig: figs.setdefault(draw, fig) and "data:image/png;base64,")
        return orig(draw, *args, **kwargs)

    monkeypatch.setattr(P, "draw_figure", capture)
    yield figs
    plt.close("all")


def tau_tables(last: int) -> dict:
    s = np.arange(49, last, 50)
    tau = pd.DataFrame({"source": "train", "step": s, "class_a": "irregular", "class_b": "regular", "tau": 0.3,
                        "se": 0.05, "n_a": 30, "n_b": 60})
    cl = pd.DataFrame([{"source": "train", "step": x, "step_start": x - 49, "cls": c, "count": 30, "mean": m,
                        "std": 0.1} for x in s for c, m in (("irregular", 0.6), ("regular", 0.3))])
    train = pd.DataFrame({"step": np.arange(last + 1), "series": "loss", "value": 1.0, "spike": False,
                          "spike_kind": ""})
    return {"tau": tau, "class_losses": cl, "train": train}


@pytest.mark.parametrize("last, boxes", [(600, 0), (2000, 3)])
def test_expected_tau_boxes_only_on_a_run_as_long_as_the_sheets(drawn, last: int, boxes: int) -> None:
    r = result(("class_losses",), tables=tau_tables(last), run_info={"name": "r", "builtin_corpus": True})
    (p,) = [p for p in build_panels(r) if p.pid == "class_losses"]
    ax = drawn["plot_tau"].axes[0]
    got = [b for b in ax.patches if isinstance(b, Rectangle) and b.get_alpha() == 0.25]
    assert len(got) == boxes
    text = " ".join(p.lines)
    if boxes:
        assert max(b.get_x() + b.get_width() for b in got) <= last
        assert "Grey boxes" in text and "0.2 to 0.5 nats over the last 20% of the run" in text
    else:
        assert f"ends at step {last}" in text and "1000 steps" in text


def test_spike_panel_writes_the_spike_score_and_both_height_units(drawn) -> None:
    sp = pd.DataFrame({"series": ["loss"], "kind": ["spike"], "first_step": [10], "peak_step": [10],
                       "height_mad": [14.826], "height_sigma": [10.0], "length": [1]})
    r = result(("spikes",), tables={"train": tau_tables(100)["train"], "spikes": sp},
               summary={"spike_score": {"loss": 0.0125, "grad_norm": None}})
    (p,) = [p for p in build_panels(r) if p.pid == "spikes"]
    assert "Spike score (§9: share of logged points flagged): loss 1.25%, grad norm not logged." in p.lines
    heads = [h for _, h, _ in p.tables[0].columns]
    assert "height (MAD units)" in heads and "height (robust sigmas, 1.4826 MAD)" in heads


@pytest.mark.parametrize("source, says", [("training", "recorded during training"),
                                          ("evaluation batch", "offline fallback")])
def test_grad_ratio_panel_says_where_rho_comes_from(drawn, source: str, says: str) -> None:
    gr = pd.DataFrame({"step": [0, 100], "tensor": "w", "rho": [1e-3, 2e-3], "grad_norm": 1.0, "weight_norm": 1.0,
                       "status": "ok", "source": source})
    (p,) = [p for p in build_panels(result(("grad_ratio",), tables={"grad_ratio": gr})) if p.pid == "grad_ratio"]
    assert any(says in line for line in p.lines)
    assert p.tables[0].rows[0]["source"] == source


def test_key_facts_lead_the_page_and_the_verdict_is_not_labelled_twice() -> None:
    worst = Finding("warning", "memorisation", "train loss 0.0027 is far below validation loss 0.177", step=600)
    sp = pd.DataFrame({"series": ["grad_norm", "loss"], "kind": "spike", "first_step": [170, 130], "peak_step": 0,
                       "height_mad": 9.0, "length": 1})
    r = result((), tables={"spikes": sp}, findings=[worst, Finding("info", "x", "minor")],
               headlines={"overfitting": "no overfitting: validation loss ended 2.6% above its best, still falling"},
               headline={"verdict": "recovered", "verdict_text": "no overfitting: validation loss ended 2.6% above "
                         "its best, still falling", "memorisation": True, "worst_finding": worst,
                         "checkpoint_to_keep": {"best_val_step": 250, "last_stable_step": 100}},
               counts={"error": 0, "warning": 10, "info": 9})
    doc = H.render_report(r)
    facts = doc.index('<dl class="facts">')
    assert facts < doc.index("<table")  # before the findings table
    block = doc[facts: doc.index("</dl>", facts)]
    assert "no overfitting: validation loss ended 2.6%" in block
    assert "warning: train loss 0.0027 is far below validation loss 0.177" in block
    assert "step 250 (lowest validation loss)" in block
    assert "step 100 (last stable: the last saved before the first spike or non-finite value, at step 130)" in block
    assert "<dt>memorisation</dt>" not in block  # the worst finding is the memorisation: not repeated
    r.headline["worst_finding"] = Finding("error", "nonfinite", "NaN loss at step 5")
    assert "<dt>memorisation</dt>" in H.render_report(r)
    assert "overfitting: overfitting" not in doc and "<strong>overfitting:</strong>" not in doc
    assert doc.count("validation loss ended 2.6% above its best") == 1  # shown once, as the verdict
    assert "10 warning(s)" in doc and "9 note(s)" in doc  # the analysis' counts, "N more" rows counted as N


def test_key_facts_without_a_checkpoint_before_the_first_instability() -> None:
    r = result((), summary={"checkpoint_to_keep": {"best_val_step": 300, "last_stable_step": None}})
    facts = dict(H.key_facts(r))
    assert facts["worst finding"] == "none: every check passed"
    assert "step 300 (lowest validation loss)" in facts["checkpoint to keep"]
    assert "no checkpoint was saved before the first spike" in facts["checkpoint to keep"]
    r = result((), summary={"checkpoint_to_keep": {"best_val_step": 300, "last_stable_step": 400}})
    assert "step 400 (last stable: no spike or non-finite value in the run)" in dict(H.key_facts(r))["checkpoint to keep"]


def test_update_ratio_band_text_and_shading_agree(drawn) -> None:
    cfg = AnalysisConfig(update_ratio_low=3e-6, update_ratio_high=4e-3)
    ur = pd.DataFrame({"step": [100, 200], "prev_step": [0, 100], "tensor": "w", "update_ratio": [0.1, 0.1],
                       "update_ratio_per_step": [1e-3, 1e-3]})
    (p,) = [p for p in build_panels(result(("grad_ratio",), tables={"update_ratio": ur}, config=cfg))
            if p.pid == "grad_ratio"]
    ax = drawn["plot_update_ratio"].axes[0]
    (span,) = [b for b in ax.patches if isinstance(b, Rectangle)]
    assert (span.get_y(), span.get_y() + span.get_height()) == pytest.approx((3e-6, 4e-3))
    assert span.get_label() == "typical range 3e-6 to 4e-3 per step"
    assert "inside the shaded 3e-6 to 4e-3" in p.healthy


def test_validation_table_in_model_order_and_slowest_cases_by_iterations() -> None:
    from reports.panels import _spectral_tables

    names = ["blocks.10.w", "blocks.2.w", "blocks.1.w", "tok.weight"]
    its = [7, 40, 12, 3]
    errs = [5e-3, 1e-5, 2e-2, 0.0]  # the largest error is not the slowest case
    t = pd.DataFrame({c: 0.0 for c in TABLE_COLUMNS["spectral"]}, index=range(4)).assign(
        step=9, tensor=names, shape="4x4", method="lanczos", power_iterations=its, power_rel_err=errs,
        rel_err=1e-9, finite=True, warm_start=False, power_warm_start=False)
    (valid, slow), _ = _spectral_tables(t)
    assert [r["tensor"] for r in valid.rows] == ["blocks.1.w", "blocks.2.w", "blocks.10.w", "tok.weight"]
    assert [r["tensor"] for r in slow.rows] == [n for _, n in sorted(zip(its, names), reverse=True)]
    assert len(valid.columns) <= 12  # fits the page (headers wrap)
