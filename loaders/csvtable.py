"""Tables as CSV, byte-identical to pandas' ``df.to_csv(index=False)``, formatted a column at a time.

pandas hands every cell to the ``csv`` module as a Python object; on a 2M-row training table that
is most of a report's time. Here each column becomes a list of its cells' text at once (``repr``
of the floats, ``str`` of the integers, a lookup for bools and categoricals) and rows are joined
in chunks, so a 10M-row table is written in bounded memory, never as one string.

The cell text follows pandas' rules (``pandas.core.indexes.base.get_values_for_csv``): a missing
value is the empty field, float64 is its shortest repr (what numpy's ``astype(str)`` gives),
other floats go through that same ``astype(str)``, integers and bools through ``str``, extension
and categorical columns through their values as objects. A string the ``csv`` module would quote
(separator, quote, line break, NUL) is passed through a real ``csv.writer`` with pandas' dialect,
so quoting is the standard library's own. A column of any other kind (datetimes, complex,
intervals, float extension arrays, str subclasses in object columns), non-string column
labels or no columns at all: the whole table is written by pandas itself.
"""
from __future__ import annotations

import csv
import io
import itertools
import operator
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from loaders.safeio import atomic_path

__all__ = ["csv_text_chunks", "write_csv_table"]

_CELLS_PER_CHUNK = 500_000  # about 25 MB of cell strings alive at once

_LINE_END = os.linesep  # pandas' default line terminator
# Any character that can make the csv module quote (or refuse) a field under pandas' dialect; such
# a string is formatted by csv itself. Plain strings are written as they are.
_MAYBE_QUOTED = re.compile("[,\"\r\n\x00" + re.escape(_LINE_END) + "]")

_Column = Callable[[int, int], list[str]]  # the cells of rows [a, b) as text


class _Unsupported(Exception):
    """A column pandas formats in a way not reproduced here: pandas writes the table."""


def _csv_writer(buf: io.StringIO) -> csv.writer:  # type: ignore[valid-type]
    return csv.writer(buf, lineterminator=_LINE_END, delimiter=",", quotechar='"',
                      quoting=csv.QUOTE_MINIMAL, doublequote=True, escapechar=None)


def _csv_line(fields: list[str]) -> str:
    """One row exactly as pandas' csv writer writes it."""
    buf = io.StringIO()
    _csv_writer(buf).writerow(fields)
    return buf.getvalue()


class _Quoter:
    """The csv module's text for a string field that may need quoting (written beside a second
    field, so the one-empty-field rule does not apply)."""

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self._writer = _csv_writer(self._buf)
        self._cut = len(_LINE_END) + 1

    def __call__(self, s: str) -> str:
        self._buf.seek(0)
        self._buf.truncate()
        self._writer.writerow((s, ""))
        return self._buf.getvalue()[:-self._cut]

    def fix(self, cells: list[str]) -> list[str]:
        """`cells` with every string that may need quoting replaced by its csv text (in place)."""
        if cells and _MAYBE_QUOTED.search("".join(cells)) is not None:
            for i in itertools.compress(range(len(cells)), map(_MAYBE_QUOTED.search, cells)):
                cells[i] = self(cells[i])
        return cells


def _blank(cells: list[str], missing: np.ndarray) -> list[str]:
    """`cells` with the rows where `missing` is True set to the empty field."""
    if not missing.any():
        return cells
    out = np.array(cells, dtype=object)
    out[missing] = ""
    return out.tolist()


def _object_cells(values: np.ndarray, missing: np.ndarray, quoter: _Quoter) -> _Column:
    """Cells of an object array as the csv module writes them: missing ones empty, a str as it
    is (quoted if needed), anything else as ``str(cell)``."""
    present = values[~missing].tolist() if missing.any() else values.tolist()
    types = set(map(type, present))
    if types <= {str}:
        def cells(a: int, b: int) -> list[str]:
            out = values[a:b].tolist()
            return quoter.fix(_blank(out, missing[a:b]))
        return cells
    odd = [t for t in types if t is not str and issubclass(t, str)]
    if odd:  # csv writes a str subclass's own characters, not its str(): not reproduced here
        raise _Unsupported(odd[0].__name__)

    def mixed(a: int, b: int) -> list[str]:
        out = list(map(str, values[a:b].tolist()))  # csv writes str(cell); a str stays itself
        return quoter.fix(_blank(out, missing[a:b]))
    return mixed


def _column(col: pd.Series, quoter: _Quoter) -> _Column:
    """How to format one column, or `_Unsupported`."""
    dtype = col.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        if cats.dtype.kind in "Mm" or isinstance(cats.dtype, pd.IntervalDtype):
            raise _Unsupported(str(dtype))
        cat_values = np.asarray(cats.astype(object), dtype=object)
        texts = _object_cells(cat_values, np.asarray(pd.isna(cat_values), bool), quoter)(0, len(cat_values))
        lookup = np.array(texts + [""], dtype=object)  # code -1 (missing) takes the last one
        codes = col.cat.codes.to_numpy()
        return lambda a, b: lookup[codes[a:b]].tolist()
    if isinstance(dtype, np.dtype):
        values = col.to_numpy()
        kind = dtype.kind
        if kind == "b":
            words = np.array(["False", "True"], dtype=object)
            return lambda a, b: words[values[a:b].view(np.uint8)].tolist()
        if kind in "iu":
            return lambda a, b: list(map(str, values[a:b].tolist()))
        if kind == "f" and dtype == np.float64:
            def floats(a: int, b: int) -> list[str]:
                x = values[a:b]
                return _blank(list(map(float.__repr__, x.tolist())), np.isnan(x))
            return floats
        if kind == "f":  # float32/16/longdouble: numpy's own text, like pandas
            return lambda a, b: _blank(values[a:b].astype(str).tolist(), np.isnan(values[a:b]))
        if kind == "O":
            return _object_cells(values, np.asarray(pd.isna(values), bool), quoter)
        raise _Unsupported(str(dtype))
    if dtype.kind in "fcmMV" or isinstance(dtype, (pd.IntervalDtype, pd.PeriodDtype, pd.SparseDtype)):
        raise _Unsupported(str(dtype))
    ext = col.array
    objects = np.asarray(ext.astype(object), dtype=object)  # pandas' way for extension arrays
    return _object_cells(objects, np.asarray(ext.isna(), bool), quoter)


def _rows(columns: list[_Column], n: int, chunk: int) -> Iterator[str]:
    """The rows' text, `chunk` rows at a time."""
    single_empty = _csv_line([""])[:-len(_LINE_END)]  # a row of one empty field is quoted by csv
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        cols = [c(a, b) for c in columns]
        if len(cols) == 1:
            lines = cols[0]
            for i in itertools.compress(range(len(lines)), map(operator.not_, lines)):
                lines[i] = single_empty
        else:
            lines = map(",".join, zip(*cols))
        yield _LINE_END.join(lines) + _LINE_END


def csv_text_chunks(df: pd.DataFrame, chunk_rows: int | None = None) -> Iterator[str]:
    """``df.to_csv(index=False)`` in pieces (header first, then blocks of `chunk_rows` rows);
    their concatenation equals pandas' text byte for byte."""
    labels = list(df.columns)
    columns: list[_Column] | None = None
    if labels and not isinstance(df.columns, pd.MultiIndex) and all(type(c) is str for c in labels):
        quoter = _Quoter()
        try:
            columns = [_column(df.iloc[:, j], quoter) for j in range(len(labels))]
        except _Unsupported:
            columns = None
    if columns is None:
        yield df.to_csv(index=False)
        return
    yield _csv_line(labels)
    chunk = max(1, chunk_rows or _CELLS_PER_CHUNK // len(columns))
    yield from _rows(columns, len(df), chunk)


def write_csv_table(path: str | os.PathLike[str], df: pd.DataFrame, *, what: str = "report",
                    chunk_rows: int | None = None) -> Path:
    """Write ``df.to_csv(index=False)`` to `path` atomically (``safeio.atomic_path``), a block of
    rows at a time; UTF-8 like ``safeio.write_atomic``. Raises ``TrainauditError`` naming the file
    when it cannot be written."""
    with atomic_path(path, what=what) as tmp, open(tmp, "xb") as f:
        for text in csv_text_chunks(df, chunk_rows):
            f.write(text.encode("utf-8", errors="replace"))
    return Path(path)
