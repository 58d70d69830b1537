"""Figures drawn from tables: what is on the axes checked against the input tables themselves."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.patches import Rectangle

from reports import figures as F

matplotlib.use("Agg")


def _heads(n_layers: int, n_heads: int, *, missing: tuple[int, int] = (1, 2), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"step": s, "layer": la, "head": h, "mean_entropy": float(rng.uniform(0.05, 3.0)) + s,
             "dead": bool((la * n_heads + h) % 5 == 3)}
            for s in (0, 7) for la in range(n_layers) for h in range(n_heads) if (la, h) != missing]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1)  # row order must not matter


def _draw(table: pd.DataFrame, height: float = 2.6):
    fig, axes = F.new_figure(1, 1, width=6.5, height=height)
    ax = axes.flat[0]
    F.plot_attention_heads(table, ax)
    return fig, ax


def test_attention_heat_map_cells_are_the_last_checkpoints_entropies() -> None:
    t = _heads(4, 6)
    fig, ax = _draw(t)
    last = t[t["step"] == 7]
    ref = last.pivot(index="layer", columns="head", values="mean_entropy").to_numpy()  # NaN: the missing head
    mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
    cells = np.ma.masked_invalid(mesh.get_array()).reshape(ref.shape)
    np.testing.assert_array_equal(np.ma.getmaskarray(cells), np.isnan(ref))
    np.testing.assert_allclose(cells.filled(np.nan), ref)
    # every finite cell is written in it (2 decimals, "dead" below for dead heads); the missing head is blank
    texts = {(round(x.get_position()[0] - 0.5), round(x.get_position()[1] - 0.5)): x.get_text() for x in ax.texts}
    dead = last.pivot(index="layer", columns="head", values="dead")
    for (i, j), v in np.ndenumerate(ref):
        if np.isnan(v):
            assert texts.get((j, i), "") == ""
        else:
            assert texts[(j, i)] == f"{v:.2f}" + ("\ndead" if dead.iat[i, j] else "")
    boxes = {(round(p.get_x()), round(p.get_y())) for p in ax.patches if isinstance(p, Rectangle) and not p.fill}
    assert boxes == {(j, i) for (i, j), d in np.ndenumerate(dead.fillna(False).to_numpy(bool)) if d}
    assert ax.get_title() == "step 7"
    F.fig_to_data_uri(fig)


@pytest.mark.parametrize("height", [2.6, 9.0])
def test_attention_heat_map_of_a_deep_model_keeps_its_layer_labels_readable(height: float) -> None:
    t = _heads(48, 25)
    fig, ax = _draw(t, height=height)
    fig.canvas.draw()
    labels = ax.get_yticklabels()
    values = [int(x.get_text()) for x in labels]
    assert len(values) >= 4 and values == sorted(values) and set(values) <= set(range(48))
    for tick, v in zip(ax.get_yticks(), values):
        assert tick == pytest.approx(v + 0.5)  # each label sits on its own layer's row
    ys = sorted(x.get_window_extent().y0 for x in labels)
    gap_pt = np.diff(ys).min() * 72 / fig.dpi
    assert gap_pt >= labels[0].get_fontsize()  # no two labels overlap
    assert not ax.texts  # too many cells to write values in
    F.fig_to_data_uri(fig)


@pytest.mark.parametrize("draw, column, band", [("plot_grad_ratio", "rho", (1e-3, 5e-2)),
                                                ("plot_update_ratio", "update_ratio_per_step", (2e-6, 3e-3))])
def test_ratio_panels_shade_the_band_they_are_given(draw: str, column: str, band: tuple[float, float]) -> None:
    t = pd.DataFrame({"step": [0, 10, 0, 10], "tensor": ["a", "a", "b", "b"], column: [1e-4, 2e-4, 1e-2, 0.0]})
    fig, axes = F.new_figure()
    ax = axes.flat[0]
    getattr(F, draw)(t, ax, healthy=band)
    (span,) = [p for p in ax.patches if isinstance(p, Rectangle)]  # axhspan (matplotlib >= 3.9)
    assert (span.get_y(), span.get_y() + span.get_height()) == pytest.approx(band)
    assert ax.get_yscale() == "log"
    drawn = sorted(len(line.get_xdata()) for line in ax.get_lines() if line.get_label() in ("a", "b"))
    assert drawn == [1, 2]  # the zero update ratio of b cannot sit on a log axis and is left out
    F.fig_to_data_uri(fig)


def test_decimate_in_passes_picks_every_bucket_extreme_of_a_long_series():
    """A series long enough for several bounded passes: the chosen indices are exactly each
    bucket's first minimum and maximum (NaN never chosen), the ends and the kept points."""
    from reports.figures import decimate

    rng = np.random.default_rng(5)
    n, max_points = 3_100_003, 4000
    y = rng.normal(size=n)
    y[rng.integers(0, n, 5000)] = np.nan
    y[1_234_567] = 50.0
    keep = np.zeros(n, bool)
    keep[[17, 2_999_999]] = True
    got = decimate(y, max_points, keep=keep)
    buckets = max_points // 2
    size = -(-n // buckets)
    padded_lo = np.concatenate([np.where(np.isnan(y), np.inf, y), np.full(buckets * size - n, np.inf)])
    padded_hi = np.concatenate([np.where(np.isnan(y), -np.inf, y), np.full(buckets * size - n, -np.inf)])
    base = np.arange(buckets) * size
    want = np.unique(np.concatenate([base + padded_lo.reshape(buckets, size).argmin(axis=1),
                                     base + padded_hi.reshape(buckets, size).argmax(axis=1), [0, n - 1, 17, 2_999_999]]))
    np.testing.assert_array_equal(got, want[want < n])
    assert 1_234_567 in got and not np.isnan(y[got[(got != 0) & (got != n - 1)]]).any()


def test_blockwise_rolling_statistics_equal_pandas_over_the_whole_series():
    from reports.figures import _rolling

    rng = np.random.default_rng(2)
    y = rng.normal(size=2_500_000)
    y[[5, 1_048_576, 1_048_577, 2_097_151]] = np.nan
    for w, stat in ((25_000, "mean"), (7, "median"), (1, "mean")):
        want = getattr(pd.Series(y).rolling(w, min_periods=1), stat)().to_numpy()
        np.testing.assert_allclose(_rolling(y, w, stat), want, rtol=1e-9, atol=1e-12, equal_nan=True)
