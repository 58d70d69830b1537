"""One matplotlib function per report panel, drawn from the analysis tables only.

Each `plot_<panel>(table(s), ax)` draws on the axes it is given and returns None; `fig_to_data_uri`
turns a figure into a base64 PNG data URI so the report stays one self-contained file (no inline
SVG, so no markup from a run's names can reach the page through a figure). Labels that come from
a run (tensor, layer and class names) go through `label()`: mathtext `$` is escaped and long
names are shortened.

Over 400 lines on purpose: the figure cache (`reports.page.FigureCache`) keys every cached
figure on this one file, so all drawing code lives here and a change to any of it redraws.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from reports.page import fmt_sci  # noqa: E402

__all__ = [
    "DPI", "label", "new_figure", "fig_to_data_uri", "plot_loss", "plot_spikes", "plot_grad_norm",
    "plot_activations", "plot_spectral", "plot_dead_neurons", "plot_attention_entropy", "plot_attention_heads",
    "plot_class_losses", "plot_tau", "plot_grad_ratio", "plot_update_ratio", "plot_logits",
    "plot_compare_losses", "decimate", "MAX_POINTS", "expected_tau_boxes",
]

DPI = 110  # an 8-inch figure is 880 px: legends and ticks readable at the page's width
MAX_LINES = 10  # lines with a legend entry; the rest are drawn thin and grey
MAX_POINTS = 4000  # points drawn per series at most (plus flagged points): see decimate()
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]
RC = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8, "legend.frameon": False,
      "axes.prop_cycle": matplotlib.cycler(color=PALETTE), "text.usetex": False}


def label(name: object, width: int = 40) -> str:
    """A run-supplied name made safe for a matplotlib label: `$` escaped, shortened, never `_`-led
    (matplotlib hides legend entries whose label starts with an underscore)."""
    s = "".join(c if c.isprintable() else "\ufffd" for c in str(name))
    if len(s) > width:
        s = s[: width - 12] + "\u2026" + s[-11:]
    s = s.replace("\\", "\\\\").replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 8.0, height: float = 3.2,
               sharex: bool = False) -> tuple[Figure, np.ndarray]:
    """A figure with an array of axes (always 2-D indexable via .flat), report style applied."""
    with plt.rc_context(RC):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False, sharex=sharex,
                                 dpi=DPI)
    for ax in axes.flat:
        _style(ax)
    return fig, axes


def _style(ax: Axes) -> None:
    for k in ("top", "right"):
        ax.spines[k].set_visible(False)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def fig_to_data_uri(fig: Figure) -> str:
    """The figure as `data:image/png;base64,...` (and closed, to free its memory)."""
    buf = io.BytesIO()
    with plt.rc_context(RC):
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decimate(y: np.ndarray, max_points: int = MAX_POINTS, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the points of `y` to draw: all of them when there are at most `max_points`,
    else the first, the last, the minimum and maximum of each of `max_points // 2` equal buckets
    (a line through them has the same envelope as the full series, so no spike or dip is lost at
    any zoom the PNG can show), plus every index where `keep` is True (flagged spikes). NaN points
    are never chosen as extremes (a bucket of only NaN keeps one, so the line breaks there too).
    The indices are sorted and unique: the drawn points are a subset of the rows."""
    y = np.asarray(y, dtype=float)
    n = y.size
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, max_points // 2)
    size = -(-n // buckets)  # ceil: buckets of `size` points, the last one shorter
    idx = [np.array([0, n - 1])]
    rows = max(1, (1 << 20) // size)  # buckets per pass: ~8 MB of temporaries at any length
    for b0 in range(0, buckets, rows):
        lo_at, hi_end = b0 * size, min(n, (b0 + rows) * size)
        if lo_at >= n:
            break
        part = y[lo_at:hi_end]
        pad = -part.size % size
        nan = np.isnan(part)
        low = np.concatenate([np.where(nan, np.inf, part), np.full(pad, np.inf)]).reshape(-1, size)
        base = lo_at + np.arange(low.shape[0]) * size
        idx.append(base + low.argmin(axis=1))
        del low
        high = np.concatenate([np.where(nan, -np.inf, part), np.full(pad, -np.inf)]).reshape(-1, size)
        idx.append(base + high.argmax(axis=1))
    if keep is not None:
        idx.append(np.flatnonzero(np.asarray(keep, dtype=bool)))
    out = np.unique(np.concatenate(idx))
    return out[out < n]


def _plot(ax: Axes, x: object, y: object, *args: object, keep: np.ndarray | None = None, **kw: object) -> None:
    """ax.plot of a series decimated to at most MAX_POINTS points (plus `keep`), extremes kept."""
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    i = decimate(y, keep=keep)
    ax.plot(x[i], y[i], *args, **kw)


def _fill(ax: Axes, x: object, lo: np.ndarray, hi: np.ndarray, **kw: object) -> None:
    """fill_between of a band, decimated so that both of its edges keep their extremes."""
    x = np.asarray(x, dtype=float)
    i = np.union1d(decimate(lo), decimate(hi))
    ax.fill_between(x[i], lo[i], hi[i], **kw)


def _legend(ax: Axes, outside: bool = False) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        ax.legend(loc="best")


def _series(df: pd.DataFrame, key: str, value: str, order_by_last: bool = True) -> list[tuple[str, pd.DataFrame]]:
    """Groups of `df` by `key`, largest last value first (so the legend lists the big ones)."""
    groups = [(str(k), g.sort_values("step")) for k, g in df.groupby(key, sort=True)]
    if order_by_last:
        groups.sort(key=lambda kg: -np.nan_to_num(pd.to_numeric(kg[1][value], errors="coerce").to_numpy(float)[-1],
                                                  nan=-np.inf))
    return groups


def _lines(ax: Axes, df: pd.DataFrame, key: str, value: str, *, log: bool = False, marker: str = "") -> None:
    for i, (name, g) in enumerate(_series(df, key, value)):
        y = pd.to_numeric(g[value], errors="coerce").to_numpy(float)
        if i < MAX_LINES:
            _plot(ax, g["step"], y, marker=marker, ms=3, lw=1.4, label=label(name), color=PALETTE[i % len(PALETTE)])
        else:
            _plot(ax, g["step"], y, lw=0.6, color="#b0b0b0", alpha=0.7)
    n = df[key].nunique()
    if n > MAX_LINES:
        ax.plot([], [], lw=0.6, color="#b0b0b0", label=f"{n - MAX_LINES} more (grey)")
    if log:
        ax.set_yscale("log")


# --------------------------------------------------------------------------- panel 1-3: loss, spikes, grad norm


def _rolling(y: np.ndarray, w: int, stat: str) -> np.ndarray:
    """pandas' `rolling(w, min_periods=1).<stat>()` of y, computed over blocks of 256k+ points that
    overlap by w - 1 (each point sees its full window): pandas' window bounds cost 16 bytes a
    point at once, so a 10M-point series would need 160 MB of them."""
    out = np.empty(y.size)
    block = max(1 << 18, 4 * w)
    for a in range(0, y.size, block):
        lo = max(0, a - w + 1)
        r = getattr(pd.Series(y[lo:a + block]).rolling(w, min_periods=1), stat)().to_numpy()
        out[a:a + block] = r[a - lo:]
    return out


def _finite_range(*arrays: np.ndarray) -> tuple[float, float]:
    """(min, max) over the finite values of the arrays, (inf, -inf) when there are none; no
    filtered copy of a 10M-point series."""
    lo, hi = np.inf, -np.inf
    for a in arrays:
        if a.size:
            fin = np.isfinite(a)
            lo = min(lo, float(np.min(a, where=fin, initial=np.inf)))
            hi = max(hi, float(np.max(a, where=fin, initial=-np.inf)))
    return lo, hi


def _series_rows(train: pd.DataFrame, series: str) -> pd.DataFrame:
    """The rows of one series of the long training table, by step (sorted only when they are not:
    the analysis writes each series sorted, and a 10M-row sort costs a second)."""
    col = train["series"]
    if isinstance(col.dtype, pd.CategoricalDtype) and series in col.cat.categories:
        codes = col.cat.codes.to_numpy()
        if codes.size < 2 or bool((codes[1:] >= codes[:-1]).all()):  # blocks by series: a slice, no copy
            code = col.cat.categories.get_loc(series)
            a, b = np.searchsorted(codes, [code, code + 1])
            g = train.iloc[a:b]
            return g if g["step"].is_monotonic_increasing else g.sort_values("step", kind="stable")
    g = train[col == series]
    return g if g["step"].is_monotonic_increasing else g.sort_values("step", kind="stable")


def plot_loss(train: pd.DataFrame, evals: pd.DataFrame, ax: Axes, *, divergence_step: float | None = None,
              val_min_step: float | None = None, gl_step: float | None = None, val_series: str | None = None) -> None:
    """Panel 1: training loss (raw and a 1%-of-run rolling mean), every validation series, and
    the divergence, validation-minimum and GL5 steps as vertical lines."""
    loss = _series_rows(train, "loss")
    if len(loss):
        y = loss["value"].to_numpy(float)
        _plot(ax, loss["step"], y, lw=0.6, alpha=0.35, color=PALETTE[0], label="train (raw)")
        w = max(1, len(loss) // 100)
        if w > 1:
            _plot(ax, loss["step"], _rolling(y, w, "mean"), lw=1.4, color=PALETTE[0],
                  label=f"train (mean of {w})")
    for i, (name, g) in enumerate(evals.groupby("series", sort=True)):
        g = g.sort_values("step")
        bold = name == val_series
        _plot(ax, g["step"], g["loss"], marker="o" if len(g) <= 200 else "", ms=3 if bold else 2,
              lw=1.6 if bold else 1.0, color=PALETTE[(i + 1) % len(PALETTE)], label=label(f"val: {name}"))
    for step, text, color, style in ((divergence_step, "divergence", "#ff7f0e", "--"),
                                     (val_min_step, "val min", "#2ca02c", ":"),
                                     (gl_step, "GL5", "#d62728", "-.")):
        if step is not None:
            ax.axvline(step, color=color, ls=style, lw=1.2, label=f"{text} (step {step})")
    lo, hi = _finite_range(loss["value"].to_numpy(float), evals["loss"].to_numpy(float))
    if lo > 0 and hi / lo > 100:
        ax.set_yscale("log")  # a train loss near 0 next to a val loss of 0.2: only a log axis shows the gap
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token (nats)")
    _legend(ax, outside=True)


def _flag_marks(ax: Axes, g: pd.DataFrame) -> None:
    sp = g[g["spike_kind"] == "spike"]
    if len(sp):  # open red rings, large enough to see on a dense curve
        ax.scatter(sp["step"], sp["value"].astype(float), marker="o", s=55, facecolors="none",
                   edgecolors="#d62728", linewidths=1.6, zorder=5, label=f"spike ({len(sp)} point(s))")
    nf = g[g["spike_kind"] == "non-finite"]
    for j, s in enumerate(nf["step"].to_numpy()[:200]):
        ax.axvline(s, color="#d62728", lw=0.8, alpha=0.6, label="non-finite" if j == 0 else None)


def plot_spikes(train: pd.DataFrame, axes: Sequence[Axes]) -> None:
    """Panel 2: the loss and grad-norm curves with the detector's flags (red ring: spike, red line:
    NaN/inf), on a log axis when the series is positive: a loss falling from 4 to 0.01 hides a late
    spike from 0.01 to 0.05 on a linear axis, and the detector measures against the recent median."""
    for ax, series, ylabel in zip(axes, ("loss", "grad_norm"), ("training loss", "grad norm")):
        g = _series_rows(train, series)
        if g.empty:
            ax.text(0.5, 0.5, f"no {series} series", ha="center", va="center", transform=ax.transAxes)
            continue
        y = g["value"].to_numpy(float)
        _plot(ax, g["step"], y, lw=0.8, color=PALETTE[0], label=series, keep=(g["spike_kind"] == "spike").to_numpy())
        _flag_marks(ax, g)
        lo, hi = _finite_range(y)
        if lo > 0 and lo <= hi:
            ax.set_yscale("log")
        elif hi > 0 and series == "grad_norm":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        _legend(ax)
    axes[-1].set_xlabel("step")


def plot_grad_norm(train: pd.DataFrame, ax: Axes) -> None:
    """Panel 3: the raw global gradient norm per step (log scale) and its rolling median."""
    g = _series_rows(train, "grad_norm")
    y = g["value"].to_numpy(float)
    _plot(ax, g["step"], y, lw=0.7, color=PALETTE[0], alpha=0.6, label="grad norm (raw)")
    w = max(5, len(g) // 50)
    _plot(ax, g["step"], _rolling(y, w, "median"), lw=1.5, color=PALETTE[1],
          label=f"rolling median ({w} logged points)")
    if np.nanmin(np.where(y > 0, y, np.nan), initial=np.inf) < np.inf:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||g||_2")
    _legend(ax)


# --------------------------------------------------------------------------- panel 4-6: model probes


def plot_activations(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 4: mean |A| per block over checkpoints with a +-1 sigma band (Welford over eval batches)."""
    for i, (name, g) in enumerate(_series(table, "layer", "mean_abs", order_by_last=False)):
        m = g["mean_abs"].to_numpy(float)
        s = np.nan_to_num(g["std"].to_numpy(float))
        c = PALETTE[i % len(PALETTE)]
        _plot(ax, g["step"], m, marker="o" if len(g) <= 200 else "", ms=3, color=c, label=label(name))
        _fill(ax, g["step"], np.maximum(m - s, 0.0), m + s, color=c, alpha=0.18, lw=0)
    if len(table):
        ax.fill_between([], [], [], color="#999999", alpha=0.3, lw=0, label="+-1 sigma (clipped at 0)")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("mean |A| (+-1 sigma)")
    _legend(ax, outside=True)


def plot_spectral(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 5: sigma_1 per weight matrix over checkpoints (exact where computed, else the estimate)."""
    t = table[table["finite"].astype(bool)].copy()
    ex = pd.to_numeric(t["sigma_exact"], errors="coerce")
    t["sigma"] = np.where(np.isfinite(ex), ex, pd.to_numeric(t["sigma_est"], errors="coerce"))
    if t["step"].nunique() == 1:  # one checkpoint: a bar per matrix says more than a column of dots
        t = t.sort_values("sigma").tail(30)
        ax.barh([label(n, 36) for n in t["tensor"]], t["sigma"], color=PALETTE[0])
        ax.set_xlabel(f"spectral norm sigma_1 at step {int(t['step'].iloc[0])}")
        ax.tick_params(axis="y", labelsize=7)
        return
    _lines(ax, t, "tensor", "sigma", marker="o" if t["step"].nunique() <= 30 else "")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("spectral norm sigma_1")
    _legend(ax, outside=True)


def plot_dead_neurons(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 6a: dead-unit fraction (solid) and near-dead fraction (dashed) per FFN layer."""
    for i, (name, g) in enumerate(_series(table, "layer", "dead_fraction", order_by_last=False)):
        c = PALETTE[i % len(PALETTE)]
        _plot(ax, g["step"], g["dead_fraction"], marker="o", ms=3, color=c, label=label(f"{name} dead"))
        near = g["near_dead_count"].to_numpy(float) / g["d_ff"].to_numpy(float)
        _plot(ax, g["step"], near, ls="--", lw=1, color=c, label=label(f"{name} near-dead"))
    ax.set_ylim(bottom=-0.02, top=max(0.1, float(np.nanmax(table["near_dead_count"].astype(float)
                                                              / table["d_ff"].astype(float))) * 1.15 + 0.01))
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("fraction of FFN units")
    _legend(ax, outside=True)


def plot_attention_entropy(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 6b: mean normalised attention entropy per head over checkpoints (0 = one key, 1 = uniform)."""
    t = table.assign(head_name=[f"L{layer} H{head}" for layer, head in zip(table["layer"], table["head"])])
    for i, (name, g) in enumerate(_series(t, "head_name", "mean_norm_entropy", order_by_last=False)):
        shown = i < MAX_LINES
        _plot(ax, g["step"], g["mean_norm_entropy"], lw=1.2, marker="o", ms=2,
              color=PALETTE[i % len(PALETTE)] if shown else "#b0b0b0", label=label(name) if shown else None)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("mean H_q / log(keys)")
    _legend(ax, outside=True)


def plot_attention_heads(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 6c: heat map of mean entropy (nats) per layer x head at the last checkpoint (seaborn:
    cells separated, annotation colour set per cell for contrast, tick labels thinned on large
    grids, missing heads blank); values written in small grids, dead heads boxed."""
    import seaborn as sns

    last = table[table["step"] == table["step"].max()]
    layers = sorted(last["layer"].unique())
    heads = sorted(last["head"].unique())
    grid = pd.DataFrame(np.nan, index=[str(v) for v in layers], columns=[str(h) for h in heads])
    dead = np.zeros(grid.shape, dtype=bool)
    li = {v: i for i, v in enumerate(layers)}
    hi = {v: i for i, v in enumerate(heads)}
    for r in last.itertuples(index=False):
        grid.iat[li[r.layer], hi[r.head]] = float(r.mean_entropy)
        dead[li[r.layer], hi[r.head]] = bool(r.dead)
    values = grid.to_numpy(float)
    finite = np.isfinite(values)
    annot = grid.size <= 64 and finite.any()
    labels = np.where(finite, np.vectorize(lambda v: f"{v:.2f}")(values), "") + np.where(dead, "\ndead", "")
    sns.heatmap(grid, ax=ax, mask=~finite, cmap="viridis", vmin=0, vmax=None if finite.any() else 1,
                annot=labels if annot else False, fmt="", annot_kws={"fontsize": 7},
                linewidths=0.5 if grid.size <= 400 else 0, linecolor="white",
                xticklabels="auto", yticklabels="auto", cbar_kws={"label": "mean entropy (nats)"})
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.grid(False)
    for i, j in zip(*np.nonzero(dead)):
        ax.add_patch(Rectangle((j, i), 1, 1, fill=False, ec="#d62728", lw=2))
    ax.set_title(f"step {int(table['step'].max())}", fontsize=9)


# --------------------------------------------------------------------------- panel 7: classes, ratios


def plot_class_losses(table: pd.DataFrame, ax: Axes) -> None:
    """Panel 7a: per-class loss in training windows with a +-1 sigma Welford band; logged evaluations
    and checkpoint re-runs on the fixed evaluation set as markers."""
    for i, (name, g) in enumerate(table[table["source"] == "train"].groupby("cls", sort=True)):
        g = g.sort_values("step")
        c = PALETTE[i % len(PALETTE)]
        m, s = g["mean"].to_numpy(float), np.nan_to_num(g["std"].to_numpy(float))
        _plot(ax, g["step"], m, color=c, lw=1.4, label=label(f"{name} (train)"))
        _fill(ax, g["step"], np.maximum(m - s, 0.0), m + s, color=c, alpha=0.15, lw=0)  # a loss is >= 0
        ev = table[(table["cls"] == name) & (table["source"] != "train")]
        for src, marker in (("checkpoint", "s"),):
            e = ev[ev["source"] == src].sort_values("step")
            if len(e):
                _plot(ax, e["step"], e["mean"], ls="none", marker=marker, ms=4, color=c,
                      label=label(f"{name} (checkpoint, eval set)"))
        e = ev[ev["source"].astype(str).str.startswith("eval:")].sort_values("step")
        if len(e):
            _plot(ax, e["step"], e["mean"], ls=":", marker=".", ms=3, lw=0.8, color=c,
                  label=label(f"{name} (logged eval)"))
    if (table["source"] == "train").any():
        ax.fill_between([], [], [], color="#999999", alpha=0.3, lw=0,
                        label="+-1 sigma in the window (clipped at 0)")
    else:
        for i, (name, g) in enumerate(table.groupby("cls", sort=True)):
            g = g.sort_values("step")
            _plot(ax, g["step"], g["mean"], marker="o", ms=3, color=PALETTE[i % len(PALETTE)], label=label(name))
    ax.set_xlabel("step")
    ax.set_ylabel("mean per-example loss (nats)")
    _legend(ax, outside=True)


def plot_tau(table: pd.DataFrame, ax: Axes, *, bands: Sequence[tuple[float | None, float | None, float, float]] = (),
             last_step: float | None = None) -> None:
    """Panel 7b: tau = L_a - L_b with its +-2 SE band; grey boxes: the expected `bands`, each
    (first step, last step, low, high), None steps meaning the last 20% of the run. A box is drawn
    only when it lies wholly inside the run's steps (0 to `last_step`): the sheet's steps are those
    of its own run, and a box cut at the end of a shorter run would claim a shape it never stated."""
    end = last_step if last_step is not None else (float(table["step"].max()) if len(table) else 0.0)
    drawn = 0
    for lo_s, hi_s, lo, hi in expected_tau_boxes(bands, end):
        ax.add_patch(Rectangle((lo_s, lo), hi_s - lo_s, hi - lo, color="#999999", alpha=0.25, lw=0,
                               label="sheet's expected tau" if drawn == 0 else None))
        drawn += 1
    tr = table[table["source"] == "train"].sort_values("step")
    if len(tr):
        t, se = tr["tau"].to_numpy(float), np.nan_to_num(tr["se"].to_numpy(float))
        _plot(ax, tr["step"], t, color=PALETTE[3], lw=1.5, label="tau (training windows)")
        _fill(ax, tr["step"], t - 2 * se, t + 2 * se, color=PALETTE[3], alpha=0.18, lw=0, label="+-2 SE")
    ck = table[table["source"] == "checkpoint"].sort_values("step")
    if len(ck):
        ax.errorbar(ck["step"], ck["tau"].astype(float), yerr=2 * np.nan_to_num(ck["se"].to_numpy(float)), fmt="s",
                    ms=4, color=PALETTE[0], capsize=2, label="tau (checkpoint, eval set, +-2 SE)")
    ev = table[table["source"].astype(str).str.startswith("eval:")].sort_values("step")
    if len(ev) and not len(ck):
        _plot(ax, ev["step"], ev["tau"], ls=":", marker=".", color=PALETTE[0], label="tau (logged eval)")
    ax.axhline(0, color="black", lw=0.6)
    a, b = (table["class_a"].iloc[0], table["class_b"].iloc[0]) if len(table) else ("a", "b")
    ax.set_ylabel(label(f"tau = L({a}) - L({b})", 60))
    ax.set_xlabel("step")
    _legend(ax, outside=True)


def expected_tau_boxes(bands: Sequence[tuple[float | None, float | None, float, float]],
                       last_step: float) -> list[tuple[float, float, float, float]]:
    """The (first step, last step, low, high) boxes of `bands` that lie inside a run ending at
    `last_step`; a band without steps is the last 20% of the run."""
    out = []
    for lo_s, hi_s, lo, hi in bands:
        if lo_s is None or hi_s is None:
            lo_s, hi_s = 0.8 * last_step, last_step
        if 0 <= lo_s < hi_s <= last_step:
            out.append((float(lo_s), float(hi_s), float(lo), float(hi)))
    return out


def _band(ax: Axes, lo: float, hi: float, text: str) -> None:
    ax.axhspan(lo, hi, color="#2ca02c", alpha=0.08, lw=0, label=text)


def _ratio_per_tensor(table: pd.DataFrame, ax: Axes, column: str, ylabel: str,
                      band: tuple[float, float], band_label: str) -> None:
    """A positive per-tensor ratio over checkpoints on a log axis, its healthy band shaded."""
    _band(ax, *band, band_label)
    t = table[pd.to_numeric(table[column], errors="coerce") > 0]
    _lines(ax, t, "tensor", column, log=True, marker="o" if t["step"].nunique() <= 30 else "")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(ylabel)
    _legend(ax, outside=True)


def plot_grad_ratio(table: pd.DataFrame, ax: Axes, *, healthy: tuple[float, float]) -> None:
    """Panel 7c: offline rho = ||G||_F / ||W||_F per weight matrix over checkpoints, healthy band shaded."""
    _ratio_per_tensor(table, ax, "rho", "grad / weight (Frobenius)", healthy,
                      f"healthy {fmt_sci(healthy[0])} to {fmt_sci(healthy[1])}")


def plot_update_ratio(table: pd.DataFrame, ax: Axes, *, healthy: tuple[float, float]) -> None:
    """Panel 7d: update ratio per step elapsed between consecutive checkpoints, the `healthy` range
    shaded and named in the legend with the same numbers (§12: typically near 1e-3 per step)."""
    _ratio_per_tensor(table, ax, "update_ratio_per_step", "||dW|| / ||W|| per step", healthy,
                      f"typical range {fmt_sci(healthy[0])} to {fmt_sci(healthy[1])} per step")


def plot_logits(attn_logits: pd.DataFrame, eval_set: pd.DataFrame, axes: Sequence[Axes]) -> None:
    """Beyond the sheet: max attention logit per layer, and the mean log Z of the output softmax."""
    ax1, ax2 = axes
    for i, (layer, g) in enumerate(attn_logits.groupby("layer", sort=True)):
        g = g.sort_values("step")
        _plot(ax1, g["step"], g["max_logit"], marker="o", ms=3, color=PALETTE[i % len(PALETTE)],
              label=label(f"layer {layer}"))
    ax1.set_ylabel("max attention logit")
    _legend(ax1)
    e = eval_set.sort_values("step")
    _plot(ax2, e["step"], e["mean_log_z"], marker="o", ms=3, color=PALETTE[4], label="mean log Z")
    ax2.set_ylabel("mean log Z (nats)")
    for ax in axes:
        ax.set_xlabel("checkpoint step")
    _legend(ax2)



# --------------------------------------------------------------------------- comparison page


def plot_compare_losses(curves: pd.DataFrame, axes: Sequence[Axes]) -> None:
    """Comparison page: every run's training loss (rolling mean over 1% of its logged steps) and its
    validation loss, one colour per run on both axes (the first MAX_LINES runs; the rest grey)."""
    runs = list(dict.fromkeys(curves["run"].astype(str)))
    for ax, curve, title in zip(axes, ("train", "val"),
                                ("training loss (rolling mean over 1% of the run)", "validation loss")):
        ys = []
        for i, name in enumerate(runs):
            g = curves[(curves["run"].astype(str) == name) & (curves["curve"] == curve)].sort_values("step")
            if g.empty:
                continue
            y = g["value"].to_numpy(float)
            if curve == "train":
                y = pd.Series(y).rolling(max(1, len(y) // 100), min_periods=1).mean().to_numpy()
            ys.append(y[np.isfinite(y)])
            if i < MAX_LINES:
                _plot(ax, g["step"], y, lw=1.4, marker="o" if curve == "val" and len(y) <= 200 else "", ms=2.5,
                      color=PALETTE[i % len(PALETTE)], label=label(name))
            else:
                _plot(ax, g["step"], y, lw=0.6, color="#b0b0b0", alpha=0.7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss per token (nats)")
        allv = np.concatenate(ys) if ys else np.array([])
        if allv.size and allv.min() > 0 and allv.max() / allv.min() > 30:
            ax.set_yscale("log")
        if not ys:
            ax.text(0.5, 0.5, f"no run logs a {'training' if curve == 'train' else 'validation'} loss",
                    ha="center", va="center", transform=ax.transAxes, color="#5b6475")
    if len(runs) > MAX_LINES:
        axes[-1].plot([], [], lw=0.6, color="#b0b0b0", label=f"{len(runs) - MAX_LINES} more (grey)")
    _legend(axes[-1], outside=True)
