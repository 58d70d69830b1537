"""The page machinery shared by the report and the comparison page: the jinja2 environment, the
Content-Security-Policy, text cleaning and number formatting, the Panel/Table the templates
draw, and figures (drawn or taken from a FigureCache) as PNG data URIs.

Safety (bad-inputs.md section E): jinja2 with ``autoescape=True`` always (the templates' ``.j2``
suffix would defeat ``select_autoescape``); every value printed goes through a ``finalize`` hook
that replaces NUL, other control characters, lone surrogates and bidi overrides; long names are
shortened for display with the full name in a quoted ``title`` attribute; no URL derived from
input ever reaches ``href`` or ``src``; a Content-Security-Policy meta tag forbids scripts, fonts,
styles and images from anywhere but the page itself.

Nothing here reads or writes a file: the figure cache keeps its PNGs in whatever mapping the
caller gives it (`analyze.pipeline.output.FigureFolder` keeps them in a folder).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

__all__ = ["CSP", "TEMPLATES", "NAME_WIDTH", "clean_text", "short_name", "fmt_num", "fmt_sci", "environment", "Table",
           "as_cache", "Panel", "records", "FigureCache", "draw_figure", "add_figure", "footer", "table_digest"]

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TEMPLATES = Path(__file__).with_name("templates")
NAME_WIDTH = 80
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_BIDI = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(s: str) -> str:
    """Text safe to put in an HTML document: NUL, other control characters, lone surrogates and
    non-characters become U+FFFD; bidi controls (RTL override ...) are shown as [U+XXXX]."""
    s = _BAD_CHARS.sub("\ufffd", s)
    return _BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", s)


def short_name(s: str, width: int = NAME_WIDTH) -> str:
    """Display form of a possibly very long name: head ... tail."""
    return s if len(s) <= width else s[: width - 20] + "\u2026" + s[-19:]


def _finalize(value: Any) -> Any:
    if isinstance(value, Markup):
        return value
    if value is None:
        return ""
    return clean_text(value if isinstance(value, str) else str(value))


def fmt_num(x: Any, digits: int = 4) -> str:
    """A number for a table cell: integers as is, floats to `digits` significant digits, NaN as a dash."""
    if x is None or x == "":
        return "\u2013"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}" if abs(int(x)) >= 10000 else str(int(x))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "\u2013"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.{max(1, digits - 2)}e}"
    return f"{v:.{digits}g}"


def fmt_sci(x: float) -> str:
    """A band edge in one form for legends and panel text alike: 1e-05 -> 1e-5, 0.01 -> 1e-2, 2.5e-3 -> 2.5e-3."""
    mant, exp = f"{float(x):.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def environment() -> jinja2.Environment:
    """The jinja2 environment of both pages: autoescape on, every value cleaned, strict undefined."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # unconditionally: select_autoescape() would not escape a .j2 template
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_num
    env.filters["short"] = lambda s, w=NAME_WIDTH: short_name(clean_text(str(s)), w)
    env.filters["clean"] = lambda s: clean_text(str(s))
    return env


def footer() -> dict[str, str]:
    """The template's `version` (of trainaudit) and `generated` (UTC minute) fields."""
    from importlib import metadata

    try:
        version = metadata.version("trainaudit")
    except metadata.PackageNotFoundError:
        version = "dev"
    return {"version": version, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


@dataclass
class Table:
    """A table for the template: caption, (key, header, kind) columns, and rows of plain values.

    kind: "name" (run-derived text: shortened, full name in title), "num", "text", "bool".
    """

    caption: str
    columns: list[tuple[str, str, str]]
    rows: list[dict[str, Any]]
    note: str = ""


@dataclass
class Panel:
    """One section of a page."""

    pid: str
    number: str
    title: str
    healthy: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (data URI, alt text)
    tables: list[Table] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    reason: str = ""  # why it could not be computed


def records(df: pd.DataFrame, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` rows of `df` as plain dicts (Table rows)."""
    if limit is not None:
        df = df.head(limit)
    return [dict(zip(df.columns, row)) for row in df.itertuples(index=False, name=None)]


FIGURE_VERSION = 1
FIGURES_SOURCE = Path(__file__).with_name("figures.py")
_PNG_URI = "data:image/png;base64,"


class FigureCache:
    """PNG data URIs keyed by a hash of the drawing function, its tables and options, so a page
    re-rendered from unchanged tables draws nothing. `store`: where the URIs are kept (any
    str -> str mapping; None disables the cache)."""

    def __init__(self, store: MutableMapping[str, str] | None) -> None:
        self.store = store
        self.used: set[str] = set()
        self.hits = 0

    @staticmethod
    def key(draw: str, args: tuple, kwargs: dict) -> str:
        h = hashlib.sha256()
        src = FIGURES_SOURCE.stat()  # a change to the drawing code redraws everything
        h.update(f"{draw}|{src.st_size}|{src.st_mtime_ns}|{FIGURE_VERSION}".encode())
        for a in args:
            if isinstance(a, pd.DataFrame):
                _hash_frame(h, a)
            else:
                h.update(repr(a).encode())
        h.update(repr(sorted(kwargs.items())).encode())
        return h.hexdigest()[:24]

    def get(self, key: str) -> str | None:
        if self.store is None:
            return None
        self.used.add(key)
        uri = self.store.get(key)
        if not isinstance(uri, str) or not uri.startswith(_PNG_URI):
            return None
        self.hits += 1
        return uri

    def put(self, key: str, uri: str) -> None:
        if self.store is not None:
            self.store[key] = uri

    def prune(self) -> None:
        """Drop figures this render did not use (stale ones from older runs)."""
        if self.store is None:
            return
        for key in [k for k in self.store if k not in self.used]:
            del self.store[key]


def table_digest(df: pd.DataFrame) -> str:
    """A digest of a table's columns, dtypes and values (the figure cache's, for other caches)."""
    h = hashlib.sha256()
    _hash_frame(h, df)
    return h.hexdigest()[:24]


def _hash_frame(h: Any, df: pd.DataFrame) -> None:
    h.update(repr((list(df.columns), df.shape)).encode())
    for i in range(df.shape[1]):
        _hash_column(h, df.iloc[:, i])


def _hash_column(h: Any, col: pd.Series) -> None:
    """Feed one column to `h` from its native data: numbers, booleans and dates as their numpy
    bytes (a 2M-row float column in milliseconds; a string round trip took seconds), anything
    else through pandas' per-row hash (object columns factorized first)."""
    h.update(str(col.dtype).encode())
    if isinstance(col.dtype, np.dtype) and col.dtype.kind in "biufcmM":
        h.update(np.ascontiguousarray(col.to_numpy()).view(np.uint8).data)
    elif isinstance(col.dtype, pd.CategoricalDtype):  # its categories, then one small code a row
        _hash_column(h, pd.Series(col.cat.categories))
        h.update(np.ascontiguousarray(col.cat.codes.to_numpy()).view(np.uint8).data)
    else:
        h.update(pd.util.hash_pandas_object(col, index=False, categorize=True).to_numpy().tobytes())


def as_cache(figure_cache: MutableMapping[str, str] | None) -> FigureCache:
    """A FigureCache over the caller's mapping; a path is refused (this package writes no files)."""
    if isinstance(figure_cache, (str, Path)) or hasattr(figure_cache, "__fspath__"):
        raise TypeError("figure_cache is a mapping of figure URIs, not a path; "
                        "use analyze.pipeline.output.FigureFolder(path)")
    return FigureCache(figure_cache)


def draw_figure(draw: str, *args: Any, nrows: int = 1, ncols: int = 1, height: float = 3.2,
                width: float = 8.0, sharex: bool = False, **kwargs: Any) -> str:
    """Draw `reports.figures.<draw>` on a new figure and return it as a data URI. matplotlib is
    imported here, on the first figure that is not in the cache."""
    from reports import figures

    fig, axes = figures.new_figure(nrows, ncols, width=width, height=height, sharex=sharex)
    target = axes.flat[0] if nrows * ncols == 1 else list(axes.flat)
    getattr(figures, draw)(*args, target, **kwargs)
    return figures.fig_to_data_uri(fig)


def add_figure(panel: Panel, cache: FigureCache, alt: str, draw: str, *args: Any, **kwargs: Any) -> None:
    """Draw one figure (or take it from the cache) into `panel`; a drawing failure becomes a line
    in the panel instead of a lost page."""
    key = FigureCache.key(draw, args, kwargs) if cache.store is not None else ""
    uri = cache.get(key) if key else None
    if uri is None:
        try:
            uri = draw_figure(draw, *args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as exc:
            panel.lines.append(f"figure '{alt}' could not be drawn: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]}")
            return
        if key:
            cache.put(key, uri)
    panel.figures.append((uri, alt))
