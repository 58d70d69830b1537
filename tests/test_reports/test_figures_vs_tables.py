"""Every plot function against the table it draws: the data on the axes (Line2D xy, scatter
offsets, fill_between vertices, bars, error bars, boxes) is read back from the matplotlib Figure
and compared with the planted table rows, computed here independently (numpy brute force).

A figure that draws nothing fails: `lines_of` / `bands_of` find no artist and the comparison
with the planted rows fails. `test_every_plot_function_has_a_test_here` keeps the list complete.
"""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.patches import Rectangle

from reports import figures as F

matplotlib.use("Agg")
RNG = np.random.default_rng(7)
TESTED = {"plot_loss", "plot_spikes", "plot_grad_norm", "plot_activations", "plot_spectral", "plot_dead_neurons",
          "plot_attention_entropy", "plot_attention_heads", "plot_class_losses", "plot_tau", "plot_grad_ratio",
          "plot_update_ratio", "plot_logits", "plot_compare_losses"}


# --------------------------------------------------------------------------- reading a figure back


def axes(n: int = 1, ncols: int = 1):
    fig, ax = F.new_figure(n, ncols)
    return fig, list(ax.flat)


def lines_of(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Data lines by legend label (vertical/horizontal reference lines and empty proxies left out)."""
    out = {}
    for ln in ax.get_lines():
        if ln.get_transform() is not ax.transData:  # axvline/axhline live in blended axes coordinates
            continue
        x, y = np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float)
        if x.size and not ln.get_label().startswith("_"):  # "_..." : errorbar parts, caps (checked apart)
            assert ln.get_label() not in out, f"two lines labelled {ln.get_label()!r}"
            out[ln.get_label()] = (x, y)
    assert out, "the figure draws no data line"
    return out


def vlines_of(ax) -> dict[str, float]:
    return {ln.get_label(): float(np.asarray(ln.get_xdata())[0]) for ln in ax.get_lines()
            if ln.get_transform() is not ax.transData and np.ptp(np.asarray(ln.get_xdata(), float)) == 0
            and np.ptp(np.asarray(ln.get_ydata(), float)) > 0}


def bands_of(ax) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """fill_between bands as (label, x, low, high): per distinct x of the polygon, its lowest and highest y."""
    out = []
    for c in ax.collections:
        if not isinstance(c, PolyCollection) or not c.get_paths():
            continue
        v = c.get_paths()[0].vertices
        if not len(v):
            continue
        xs = np.unique(v[:, 0])
        lo = np.array([v[v[:, 0] == x, 1].min() for x in xs])
        hi = np.array([v[v[:, 0] == x, 1].max() for x in xs])
        out.append((c.get_label(), xs, lo, hi))
    assert out, "the figure draws no band"
    return out


def scatter_of(ax) -> np.ndarray:
    pts = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection) and len(c.get_offsets())]
    assert pts, "no scatter points"
    return np.concatenate([np.asarray(p, float) for p in pts])


def same(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-12, atol=0, equal_nan=True)


def rolling_mean_ref(y: np.ndarray, w: int) -> np.ndarray:
    return np.array([np.nanmean(y[max(0, i - w + 1): i + 1]) for i in range(len(y))])


def rolling_median_ref(y: np.ndarray, w: int) -> np.ndarray:
    return np.array([np.nanmedian(y[max(0, i - w + 1): i + 1]) for i in range(len(y))])


# --------------------------------------------------------------------------- planted tables


def train_table(n: int = 300, *, spikes: tuple[int, ...] = (150,), nan_at: tuple[int, ...] = (200,)) -> pd.DataFrame:
    steps = np.arange(n) * 2
    loss = 4.0 * np.exp(-steps / 150.0) + 0.01 + RNG.uniform(0, 0.002, n)
    kind = np.array([""] * n, dtype=object)
    for i in spikes:
        loss[i] *= 6
        kind[i] = "spike"
    for i in nan_at:
        loss[i] = np.nan
        kind[i] = "non-finite"
    gn = np.exp(RNG.normal(0, 0.3, n))
    gkind = np.array([""] * n, dtype=object)
    gn[40] = 50.0
    gkind[40] = "spike"
    lr = np.full(n, 1e-3)
    rows = [pd.DataFrame({"step": steps, "series": "loss", "value": loss, "spike": kind == "spike", "spike_kind": kind}),
            pd.DataFrame({"step": steps, "series": "grad_norm", "value": gn, "spike": gkind == "spike",
                          "spike_kind": gkind}),
            pd.DataFrame({"step": steps, "series": "lr", "value": lr, "spike": False, "spike_kind": ""})]
    return pd.concat(rows, ignore_index=True).sample(frac=1.0, random_state=3)  # row order must not matter


def evals_table() -> pd.DataFrame:
    s = np.arange(0, 600, 50)
    return pd.concat([pd.DataFrame({"step": s, "series": "val", "loss": 3.0 * np.exp(-s / 200) + 0.2}),
                      pd.DataFrame({"step": s[::2], "series": "test", "loss": 3.1 * np.exp(-s[::2] / 220) + 0.25})],
                     ignore_index=True).sample(frac=1.0, random_state=4)


def by_series(t: pd.DataFrame, series: str, value: str = "value") -> tuple[np.ndarray, np.ndarray]:
    g = t[t["series"] == series].sort_values("step")
    return g["step"].to_numpy(float), g[value].to_numpy(float)


# --------------------------------------------------------------------------- panel 1-3


def test_loss_figure_draws_the_train_and_every_validation_series() -> None:
    t, ev = train_table(), evals_table()
    fig, (ax,) = axes()
    F.plot_loss(t, ev, ax, divergence_step=120, val_min_step=300, gl_step=450, val_series="val")
    got = lines_of(ax)
    x, y = by_series(t, "loss")
    same(got["train (raw)"][0], x)
    same(got["train (raw)"][1], y)
    w = len(x) // 100
    same(got[f"train (mean of {w})"][1], rolling_mean_ref(y, w))
    for name in ("val", "test"):
        ex, ey = by_series(ev, name, "loss")
        same(got[f"val: {name}"][0], ex)
        same(got[f"val: {name}"][1], ey)
    assert set(got) == {"train (raw)", f"train (mean of {w})", "val: val", "val: test"}  # no grad norm, no lr
    assert vlines_of(ax) == {"divergence (step 120)": 120, "val min (step 300)": 300, "GL5 (step 450)": 450}
    F.fig_to_data_uri(fig)


def test_spike_figure_draws_both_series_every_flag_and_each_nonfinite_step() -> None:
    t = train_table()
    fig, (a_loss, a_gn) = axes(2)
    F.plot_spikes(t, [a_loss, a_gn])
    for ax, series in ((a_loss, "loss"), (a_gn, "grad_norm")):
        x, y = by_series(t, series)
        got = lines_of(ax)[series]
        same(got[0], x)
        same(got[1], y)
        g = t[(t["series"] == series) & (t["spike_kind"] == "spike")].sort_values("step")
        pts = scatter_of(ax)
        same(pts[:, 0], g["step"])
        same(pts[:, 1], g["value"])
    nf = t[(t["series"] == "loss") & (t["spike_kind"] == "non-finite")]["step"].tolist()
    assert sorted(vlines_of(a_loss).values()) == sorted(float(s) for s in nf)
    F.fig_to_data_uri(fig)


def test_a_late_loss_spike_stands_out_on_the_spike_panel() -> None:
    """Loss falls from ~4 to 0.01; a spike to 0.06 late in the run must be visibly above the curve."""
    t = train_table(spikes=(280,), nan_at=())
    fig, (a_loss, a_gn) = axes(2)
    F.plot_spikes(t, [a_loss, a_gn])
    fig.canvas.draw()
    x, y = by_series(t, "loss")
    assert [x[280], y[280]] in scatter_of(a_loss).tolist()  # the ring is drawn at the spike
    same(lines_of(a_loss)["loss"][1], y)
    to_px = a_loss.transData.transform
    spike = to_px([[x[280], y[280]]])[0, 1]
    before = to_px([[x[279], y[279]]])[0, 1]
    assert spike - before > 25, "the flagged spike is within a few pixels of the curve"
    lo, hi = a_loss.get_ylim()
    assert lo <= y[280] <= hi


def test_grad_norm_figure_draws_the_raw_norm_and_its_rolling_median() -> None:
    t = train_table()
    fig, (ax,) = axes()
    F.plot_grad_norm(t, ax)
    x, y = by_series(t, "grad_norm")
    got = lines_of(ax)
    same(got["grad norm (raw)"][0], x)
    same(got["grad norm (raw)"][1], y)
    w = max(5, len(x) // 50)
    same(got[f"rolling median ({w} logged points)"][1], rolling_median_ref(y, w))
    assert ax.get_yscale() == "log"


# --------------------------------------------------------------------------- panel 4-6


def activations_table() -> pd.DataFrame:
    steps = [0, 100, 200, 300]
    rows = [{"step": s, "layer": f"blocks.{i}", "mean_abs": 0.5 + i + 0.001 * s, "std": (2.0 if i == 0 else 0.1) * (1 + s / 300),
             "n_batches": 5} for s in steps for i in range(3)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=5)


def test_activation_figure_draws_each_block_and_a_band_clipped_at_zero() -> None:
    t = activations_table()
    fig, (ax,) = axes()
    F.plot_activations(t, ax)
    got = lines_of(ax)
    bands = [b for b in bands_of(ax)]
    assert len(bands) == 3
    for layer, g in t.groupby("layer"):
        g = g.sort_values("step")
        same(got[layer][0], g["step"])
        same(got[layer][1], g["mean_abs"])
        m, s = g["mean_abs"].to_numpy(), g["std"].to_numpy()
        match = [b for b in bands if np.allclose(b[3], m + s)]
        assert len(match) == 1
        same(match[0][1], g["step"])
        same(match[0][2], np.maximum(m - s, 0))  # |A| >= 0: never a band below zero
    assert min(b[2].min() for b in bands) == 0.0  # block 0's std > mean: the clip is exercised
    assert any("sigma" in lab for lab in ax.get_legend_handles_labels()[1])


def spectral_table(steps=(0, 100, 200), n_tensors: int = 4) -> pd.DataFrame:
    rows = []
    for s in steps:
        for j in range(n_tensors):
            exact = 1.0 + j + s / 100 if j != 1 else np.nan  # tensor 1: no exact value, the estimate is drawn
            rows.append({"step": s, "tensor": f"w{j}", "sigma_est": 1.0 + j + s / 100 + 1e-3, "sigma_exact": exact,
                         "finite": not (j == 2 and s == 100)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=6)


def test_spectral_figure_draws_exact_sigma_else_the_estimate_and_skips_nonfinite_rows() -> None:
    t = spectral_table()
    fig, (ax,) = axes()
    F.plot_spectral(t, ax)
    got = lines_of(ax)
    for name, g in t.groupby("tensor"):
        g = g[g["finite"]].sort_values("step")
        ref = np.where(np.isfinite(g["sigma_exact"]), g["sigma_exact"], g["sigma_est"])
        same(got[name][0], g["step"])
        same(got[name][1], ref)
    assert set(got) == {"w0", "w1", "w2", "w3"}


def test_spectral_figure_of_one_checkpoint_draws_a_bar_per_matrix() -> None:
    t = spectral_table(steps=(50,), n_tensors=35)
    t["finite"] = True
    fig, (ax,) = axes()
    F.plot_spectral(t, ax)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    sig = np.where(np.isfinite(t["sigma_exact"]), t["sigma_exact"], t["sigma_est"])
    top = np.sort(sig)[-30:]
    assert len(bars) == 30
    same(sorted(b.get_width() for b in bars), top)
    names = [x.get_text() for x in ax.get_yticklabels()]
    expect = t.assign(sig=sig).sort_values("sig").tail(30)["tensor"].tolist()
    assert names == expect


def test_dead_unit_figure_draws_dead_and_near_dead_fractions_per_layer() -> None:
    rows = [{"step": s, "layer": f"ffn.{i}", "d_ff": 64, "dead_count": i * s // 100, "dead_fraction": i * s / 6400,
             "near_dead_count": i * s // 100 + 3} for s in (0, 100, 200) for i in range(2)]
    t = pd.DataFrame(rows)
    fig, (ax,) = axes()
    F.plot_dead_neurons(t, ax)
    got = lines_of(ax)
    for layer, g in t.groupby("layer"):
        g = g.sort_values("step")
        same(got[f"{layer} dead"][1], g["dead_fraction"])
        same(got[f"{layer} near-dead"][1], g["near_dead_count"] / g["d_ff"])
        same(got[f"{layer} near-dead"][0], g["step"])


def test_attention_entropy_figure_draws_one_line_per_head() -> None:
    rows = [{"step": s, "layer": la, "head": h, "mean_norm_entropy": (la * 3 + h + 1) / 10 - s / 1000}
            for s in (0, 50, 100) for la in range(2) for h in range(3)]
    t = pd.DataFrame(rows).sample(frac=1.0, random_state=8)
    fig, (ax,) = axes()
    F.plot_attention_entropy(t, ax)
    got = lines_of(ax)
    assert len(got) == 6
    for (la, h), g in t.groupby(["layer", "head"]):
        g = g.sort_values("step")
        same(got[f"L{la} H{h}"][0], g["step"])
        same(got[f"L{la} H{h}"][1], g["mean_norm_entropy"])


def test_attention_heat_map_draws_the_last_checkpoint() -> None:
    """The detailed cell-by-cell check is in test_figures.py; here: an empty drawing fails too."""
    from matplotlib.collections import QuadMesh

    rows = [{"step": s, "layer": la, "head": h, "mean_entropy": la + h / 10 + s, "dead": h == 0}
            for s in (0, 9) for la in range(2) for h in range(3)]
    t = pd.DataFrame(rows)
    fig, (ax,) = axes()
    F.plot_attention_heads(t, ax)
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    same(np.asarray(meshes[0].get_array()).reshape(2, 3),
         t[t["step"] == 9].pivot(index="layer", columns="head", values="mean_entropy"))


# --------------------------------------------------------------------------- panel 7


def class_table() -> pd.DataFrame:
    rows = []
    for s in range(0, 500, 50):
        for cls, m in (("irregular", 1.2 - s / 1000), ("regular", 0.3 - s / 2000)):
            rows.append({"source": "train", "step": s + 49, "step_start": s, "cls": cls, "count": 40,
                         "mean": m, "std": 0.5})  # std > mean for "regular" late: the clip is exercised
    for s in (0, 200, 400):
        for cls, m in (("irregular", 1.0), ("regular", 0.2)):
            rows.append({"source": "checkpoint", "step": s, "step_start": s, "cls": cls, "count": 160,
                         "mean": m + s / 1e4, "std": 0.1})
            rows.append({"source": "eval:val", "step": s, "step_start": s, "cls": cls, "count": 30,
                         "mean": m + 0.05, "std": 0.2})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=9)


def test_class_loss_figure_draws_each_class_a_band_clipped_at_zero_and_a_legend_for_it() -> None:
    t = class_table()
    fig, (ax,) = axes()
    F.plot_class_losses(t, ax)
    got = lines_of(ax)
    bands = bands_of(ax)
    for cls in ("irregular", "regular"):
        g = t[(t["cls"] == cls) & (t["source"] == "train")].sort_values("step")
        same(got[f"{cls} (train)"][0], g["step"])
        same(got[f"{cls} (train)"][1], g["mean"])
        m, s = g["mean"].to_numpy(), g["std"].to_numpy()
        (b,) = [b for b in bands if np.allclose(b[3], m + s)]
        same(b[2], np.maximum(m - s, 0.0))  # a loss is >= 0
        for src, lab in (("checkpoint", f"{cls} (checkpoint, eval set)"), ("eval:val", f"{cls} (logged eval)")):
            e = t[(t["cls"] == cls) & (t["source"] == src)].sort_values("step")
            same(got[lab][0], e["step"])
            same(got[lab][1], e["mean"])
    assert min(b[2].min() for b in bands) == 0.0
    labels = ax.get_legend_handles_labels()[1]
    assert any("sigma" in lab and "clipped at 0" in lab for lab in labels)  # the band has a legend entry


def tau_table(last: int = 2000) -> pd.DataFrame:
    s = np.arange(49, last, 50)
    tr = pd.DataFrame({"source": "train", "step": s, "class_a": "irregular", "class_b": "regular",
                       "tau": 0.3 + 0.1 * np.sin(s / 300), "se": 0.02 + s / 1e5, "n_a": 30, "n_b": 60})
    c = np.arange(0, last + 1, last // 4)
    ck = pd.DataFrame({"source": "checkpoint", "step": c, "class_a": "irregular", "class_b": "regular",
                       "tau": 0.25 + c / 1e4, "se": 0.05, "n_a": 100, "n_b": 220})
    return pd.concat([tr, ck], ignore_index=True).sample(frac=1.0, random_state=10)


def test_tau_figure_draws_tau_its_2se_band_and_checkpoint_error_bars() -> None:
    t = tau_table()
    fig, (ax,) = axes()
    F.plot_tau(t, ax, bands=((0, 100, -0.1, 0.1), (400, 600, 0.5, 1.0), (None, None, 0.2, 0.5)), last_step=2000)
    tr = t[t["source"] == "train"].sort_values("step")
    got = lines_of(ax)
    same(got["tau (training windows)"][0], tr["step"])
    same(got["tau (training windows)"][1], tr["tau"])
    (b,) = [b for b in bands_of(ax) if b[0] == "+-2 SE"]
    same(b[2], tr["tau"] - 2 * tr["se"])
    same(b[3], tr["tau"] + 2 * tr["se"])
    ck = t[t["source"] == "checkpoint"].sort_values("step")
    (cont,) = ax.containers
    data_line, _, (bars,) = cont.lines
    same(data_line.get_xdata(), ck["step"])
    same(data_line.get_ydata(), ck["tau"])
    segs = np.array([np.asarray(sg) for sg in bars.get_segments()])
    same(segs[:, 0, 1], ck["tau"] - 2 * ck["se"])
    same(segs[:, 1, 1], ck["tau"] + 2 * ck["se"])
    boxes = sorted((p.get_x(), p.get_x() + p.get_width(), p.get_y(), p.get_y() + p.get_height())
                   for p in ax.patches if isinstance(p, Rectangle) and p.get_alpha() == 0.25)
    np.testing.assert_allclose(boxes, [(0, 100, -0.1, 0.1), (400, 600, 0.5, 1.0), (1600, 2000, 0.2, 0.5)])


@pytest.mark.parametrize("last, expect", [(2000, [(0, 100), (400, 600), (1600, 2000)]),
                                          (500, [(0, 100), (400, 500)]),
                                          (90, [(72, 90)])])
def test_expected_tau_boxes_lie_inside_the_run(last: int, expect: list) -> None:
    bands = ((0, 100, -0.1, 0.1), (400, 600, 0.5, 1.0), (None, None, 0.2, 0.5))
    got = [(a, b) for a, b, _, _ in F.expected_tau_boxes(bands, last)]
    # (400, 600) on a 500-step run reaches past its end: left out, not cut to (400, 500); the end band
    # (no steps) is the last 20% of the run
    assert got == [(float(a), float(b)) for a, b in expect]


@pytest.mark.parametrize("draw, column, band, legend", [
    ("plot_grad_ratio", "rho", (1e-4, 1e-1), "healthy 1e-4 to 1e-1"),
    ("plot_update_ratio", "update_ratio_per_step", (1e-5, 1e-2), "typical range 1e-5 to 1e-2 per step")])
def test_ratio_figures_draw_every_positive_value_per_tensor(draw: str, column: str, band: tuple, legend: str) -> None:
    rows = [{"step": s, "tensor": f"t{j}", column: 10.0 ** (-1 - j - s / 200) if (j, s) != (2, 100) else 0.0}
            for s in (0, 100, 200) for j in range(3)]
    t = pd.DataFrame(rows).sample(frac=1.0, random_state=11)
    fig, (ax,) = axes()
    getattr(F, draw)(t, ax, healthy=band)
    got = lines_of(ax)
    for name, g in t.groupby("tensor"):
        g = g[g[column] > 0].sort_values("step")
        same(got[name][0], g["step"])
        same(got[name][1], g[column])
    (span,) = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert (span.get_y(), span.get_y() + span.get_height()) == pytest.approx(band)
    assert span.get_label() == legend  # the legend names the band it shades


def test_logit_figure_draws_max_logit_per_layer_and_log_z() -> None:
    al = pd.DataFrame([{"step": s, "layer": la, "max_logit": 3.0 + la + s / 50} for s in (0, 100, 200) for la in range(2)])
    es = pd.DataFrame({"step": [0, 100, 200], "mean_log_z": [4.2, 3.1, 2.9], "loss": [1, 0.5, 0.4]})
    fig, (a1, a2) = axes(1, 2)
    F.plot_logits(al.sample(frac=1.0, random_state=2), es.iloc[::-1], [a1, a2])
    got = lines_of(a1)
    for la, g in al.groupby("layer"):
        same(got[f"layer {la}"][1], g.sort_values("step")["max_logit"])
    z = lines_of(a2)["mean log Z"]
    same(z[0], es["step"])
    same(z[1], es["mean_log_z"])


def test_compare_figure_draws_every_runs_train_mean_and_validation() -> None:
    rows = []
    for r, scale in (("run-a", 1.0), ("run-b", 1.5)):
        s = np.arange(0, 1000, 5)
        rows.append(pd.DataFrame({"run": r, "curve": "train", "step": s, "value": scale * np.exp(-s / 300) + 0.1
                                  + RNG.uniform(0, 0.05, s.size)}))
        v = np.arange(0, 1000, 100)
        rows.append(pd.DataFrame({"run": r, "curve": "val", "step": v, "value": scale * np.exp(-v / 300) + 0.2}))
    c = pd.concat(rows, ignore_index=True)
    fig, (a1, a2) = axes(1, 2)
    F.plot_compare_losses(c, [a1, a2])
    tr, va = lines_of(a1), lines_of(a2)
    for r in ("run-a", "run-b"):
        g = c[(c["run"] == r) & (c["curve"] == "train")].sort_values("step")
        same(tr[r][0], g["step"])
        same(tr[r][1], rolling_mean_ref(g["value"].to_numpy(), len(g) // 100))
        g = c[(c["run"] == r) & (c["curve"] == "val")].sort_values("step")
        same(va[r][1], g["value"])


def test_every_plot_function_has_a_test_here() -> None:
    assert {n for n in F.__all__ if n.startswith("plot_")} == TESTED


def test_a_figure_with_nothing_drawn_fails_these_readers() -> None:
    fig, (ax,) = axes()
    ax.set_xlabel("step")
    ax.text(0.5, 0.5, "text only")
    with pytest.raises(AssertionError):
        lines_of(ax)
    with pytest.raises(AssertionError):
        bands_of(ax)
    with pytest.raises(AssertionError):
        scatter_of(ax)


# --------------------------------------------------------------------------- decimation of long series


def test_decimate_keeps_each_buckets_extremes_and_the_flagged_points() -> None:
    n = 1_000_003
    y = np.cumsum(RNG.normal(0, 1, n))
    y[RNG.integers(0, n, 50)] = np.nan
    keep = np.zeros(n, bool)
    keep[[17, 500_000, 999_999]] = True
    idx = F.decimate(y, keep=keep)
    assert np.all(np.diff(idx) > 0) and idx[0] == 0 and idx[-1] == n - 1
    assert len(idx) <= F.MAX_POINTS + 2 + keep.sum()
    assert set(np.flatnonzero(keep)) <= set(idx)
    # the envelope: for any window of the series at least one bucket wide, the drawn points reach its extremes
    size = -(-n // (F.MAX_POINTS // 2))
    chosen = np.zeros(n, bool)
    chosen[idx] = True
    b = np.arange(n) // size
    full = pd.DataFrame({"b": b, "y": y}).groupby("b")["y"].agg(["min", "max"])
    drawn = pd.DataFrame({"b": b[chosen], "y": y[chosen]}).groupby("b")["y"].agg(["min", "max"])
    pd.testing.assert_frame_equal(drawn, full)


def test_short_series_are_drawn_whole() -> None:
    y = RNG.normal(size=F.MAX_POINTS)
    assert np.array_equal(F.decimate(y), np.arange(F.MAX_POINTS))


def test_a_spike_in_a_million_point_log_survives_in_every_figure_that_draws_the_loss() -> None:
    n = 1_000_000
    steps = np.arange(n, dtype=np.int64)
    y = 3.0 * np.exp(-steps / 2e5) + 0.05 + RNG.uniform(0, 0.01, n)
    kind = np.array([""], dtype=object).repeat(n)
    # two flagged spikes in one bucket: the smaller is no bucket maximum and must still be drawn
    for i, f in ((700_001, 8.0), (700_003, 4.0), (123_457, 5.0)):
        y[i] *= f
        kind[i] = "spike"
    t = pd.DataFrame({"step": steps, "series": "loss", "value": y, "spike": kind == "spike", "spike_kind": kind})

    def rows_of_table(xd: np.ndarray, yd: np.ndarray) -> bool:  # steps are 0..n-1: row i is (i, y[i])
        i = xd.astype(np.int64)
        return bool(np.array_equal(xd, i) and np.array_equal(yd, y[i]))

    fig, (a1, a2) = axes(2)
    F.plot_spikes(t, [a1, a2])
    x_d, y_d = lines_of(a1)["loss"]
    assert len(x_d) <= F.MAX_POINTS + 2 + 3
    assert rows_of_table(x_d, y_d)  # a subset of the table's rows
    for i in (700_001, 700_003, 123_457):
        assert i in x_d
    assert y_d.max() == y.max() and y_d.min() == y.min()
    fig2, (ax,) = axes()
    F.plot_loss(t, pd.DataFrame({"step": [0, n - 1], "series": "val", "loss": [3.0, 0.1]}), ax)
    x_r, y_r = lines_of(ax)["train (raw)"]
    assert len(x_r) <= F.MAX_POINTS + 2
    assert rows_of_table(x_r, y_r)
    assert 700_001 in x_r  # the largest spike is its bucket's maximum
    fig3, (ax3,) = axes()
    F.plot_grad_norm(t.assign(series="grad_norm"), ax3)
    x_g, y_g = lines_of(ax3)["grad norm (raw)"]
    assert len(x_g) <= F.MAX_POINTS + 2 and y_g.max() == y.max()
