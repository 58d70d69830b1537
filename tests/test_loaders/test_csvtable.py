"""loaders.csvtable: the column-at-a-time CSV writer against pandas' own ``df.to_csv(index=False)``.

The reference is pandas itself, byte for byte. ``fast`` forbids ``DataFrame.to_csv`` while the
text is made, so a test of a supported dtype proves the column formatter wrote it (not the
whole-table fallback); the fallback tests check the other dtypes still come out identical.
"""
from __future__ import annotations

import decimal
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loaders.csvtable as csvtable
from loaders.csvtable import csv_text_chunks, write_csv_table
from loaders.errors import TrainauditError
from loaders.safeio import TEMP_MARK


def fast(df: pd.DataFrame, chunk_rows: int | None = None) -> str:
    """The formatter's text, failing if it fell back to pandas."""
    real = pd.DataFrame.to_csv

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("fell back to DataFrame.to_csv")

    pd.DataFrame.to_csv = refuse  # type: ignore[method-assign]
    try:
        return "".join(csv_text_chunks(df, chunk_rows))
    finally:
        pd.DataFrame.to_csv = real  # type: ignore[method-assign]


def same(df: pd.DataFrame, chunk_rows: int | None = None) -> None:
    assert fast(df, chunk_rows) == df.to_csv(index=False)


SPECIAL_FLOATS = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e16, np.nextafter(1e16, 0), 1e-4,
                  np.nextafter(1e-4, 0), 1e-5, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                  -1.7976931348623157e308, 0.1, 1 / 3, 123456789012345678.0, 9999999999999998.0, 1.0, -2.5]

TRICKY_STRINGS = ["", " ", " lead", "trail ", "a,b", 'say "hi"', '"', '""', ",", "line\nbreak", "cr\rret",
                  "crlf\r\n", "\n", "tab\there", "semi;colon", "é ü 中文 🙂", "'single'", "#hash", "a\x00b",
                  "nan", "None", "NaN", "True", "1.5", "\\back\\slash", "\u2028sep"]


# --------------------------------------------------------------------------- numbers


def test_float64_random_bit_patterns_and_specials_match_pandas() -> None:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**64, 20_000, dtype=np.uint64, endpoint=False)
    with np.errstate(all="ignore"):
        powers = 10.0 ** np.arange(-325, 309)
    x = np.concatenate([bits.view(np.float64), powers, -powers, np.array(SPECIAL_FLOATS)])
    same(pd.DataFrame({"x": x, "y": rng.standard_normal(x.size)}))


def test_integers_bools_and_small_floats_match_pandas() -> None:
    rng = np.random.default_rng(1)
    n = 500
    df = pd.DataFrame({
        "i64": rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64, endpoint=True),
        "u64": rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True),
        "i8": rng.integers(-128, 127, n).astype(np.int8),
        "u16": rng.integers(0, 65535, n).astype(np.uint16),
        "b": rng.random(n) < 0.5,
        "f32": np.where(rng.random(n) < 0.1, np.nan, rng.standard_normal(n)).astype(np.float32),
        "f16": rng.standard_normal(n).astype(np.float16),
    })
    df.loc[0, "i64"], df.loc[1, "i64"] = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    same(df)


def test_nullable_integer_and_boolean_columns() -> None:
    df = pd.DataFrame({"i": pd.array([1, None, -3, 2**40], dtype="Int64"),
                       "b": pd.array([True, None, False, True], dtype="boolean"),
                       "u": pd.array([0, 7, None, 255], dtype="UInt8")})
    same(df)


# --------------------------------------------------------------------------- strings and objects


@pytest.mark.parametrize("dtype", [object, "str", "string"])
def test_strings_are_quoted_like_pandas(dtype: object) -> None:
    values = TRICKY_STRINGS + [None, np.nan]
    df = pd.DataFrame({"s": pd.Series(values, dtype=dtype), "n": np.arange(len(values))})
    same(df)
    # one column: an empty field on its own is written as "" by csv
    same(df[["s"]])


def test_object_columns_of_mixed_values() -> None:
    values = [1.5, None, np.float64(2.5), np.float32(0.1), 3, True, np.int64(-4), np.bool_(False), "s,t",
              decimal.Decimal("1.10"), b"x,y", (1, "a"), pd.NA, pd.NaT, float("nan"), -0.0, float("inf"), 2**70]
    df = pd.DataFrame({"o": pd.Series(values, dtype=object), "k": range(len(values))})
    same(df)
    same(df[["o"]])


def test_object_column_of_only_numbers() -> None:
    df = pd.DataFrame({"o": pd.Series([1, 2.0, np.nan, 3], dtype=object)})
    same(df)


def test_str_subclass_in_an_object_column_falls_back_identically() -> None:
    class Shout(str):
        def __str__(self) -> str:
            return self.upper()

    df = pd.DataFrame({"o": pd.Series([Shout("a,b"), "c"], dtype=object)})
    assert "".join(csv_text_chunks(df)) == df.to_csv(index=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.none(), st.text(alphabet=st.sampled_from(list(' a,"\n\r\té\x00;\'')), max_size=6)),
                min_size=0, max_size=30),
       st.integers(1, 7))
def test_random_strings_any_chunking(values: list[str | None], chunk: int) -> None:
    df = pd.DataFrame({"s": pd.Series(values, dtype=object), "c": pd.Series(values, dtype="str")})
    same(df, chunk)
    same(df[["s"]], chunk)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), max_size=40), st.integers(1, 9))
def test_random_floats_any_chunking(values: list[float], chunk: int) -> None:
    same(pd.DataFrame({"x": pd.Series(values, dtype=np.float64)}), chunk)


# --------------------------------------------------------------------------- categoricals


def test_categorical_columns_like_the_training_table() -> None:
    rng = np.random.default_rng(2)
    n = 1000
    kinds = rng.integers(0, 3, n).astype(np.int8)
    df = pd.DataFrame({
        "step": np.arange(n, dtype=np.int64),
        "series": pd.Categorical.from_codes(rng.integers(0, 2, n).astype(np.int8), categories=["grad_norm", "loss"]),
        "value": rng.standard_normal(n),
        "spike": kinds > 0,
        "spike_kind": pd.Categorical.from_codes(kinds, categories=["", "non-finite", "spike"]),
    })
    same(df)
    same(df[["spike_kind"]])  # the "" category alone on a row is written ""


def test_categoricals_with_missing_and_special_categories() -> None:
    df = pd.DataFrame({
        "s": pd.Categorical(["x", None, "a,b", 'q"', "x"]),
        "f": pd.Categorical([1.5, None, 2.0, -0.0, 1.5]),
        "i": pd.Categorical([1, None, 2, 3, 1]),
        "o": pd.Categorical(["x", None, "y", "x", "y"], categories=["y", "x"], ordered=True),
    })
    same(df)
    same(df[["s"]])


# --------------------------------------------------------------------------- shapes


def test_empty_and_typed_empty_frames() -> None:
    cols = ["step", "series", "value", "spike", "spike_kind"]
    same(pd.DataFrame({c: pd.Series(dtype="object") for c in cols}))
    same(pd.DataFrame({"a": pd.Series(dtype=float), "b": pd.Series(dtype="int64"), "c": pd.Series(dtype=bool)}))
    same(pd.DataFrame({"a": pd.Categorical([], categories=["x"])}))


def test_one_row_and_one_cell() -> None:
    same(pd.DataFrame({"a": [1], "b": ["x"], "c": [np.nan]}))
    same(pd.DataFrame({"a": [np.nan]}))
    same(pd.DataFrame({"": [""]}))


def test_header_labels_are_quoted_like_pandas() -> None:
    same(pd.DataFrame([[1, 2, 3, 4]], columns=["plain", "a,b", 'q"', ""]))
    same(pd.DataFrame([[1, 2]], columns=["dup", "dup"]))


def test_chunk_boundaries_give_whole_lines() -> None:
    rng = np.random.default_rng(3)
    n = 23
    df = pd.DataFrame({"i": np.arange(n), "x": rng.standard_normal(n),
                       "s": pd.Series(rng.choice(TRICKY_STRINGS, n), dtype=object)})
    expected = df.to_csv(index=False)
    for chunk in (1, 2, 5, n - 1, n, n + 1, 1000):
        pieces = list(csv_text_chunks(df, chunk))
        assert "".join(pieces) == expected
        assert len(pieces) == 1 + -(-n // chunk)  # the header, then one piece per block of rows
        assert all(p.endswith(os.linesep) for p in pieces)
        assert fast(df, chunk) == expected


def test_default_chunking_bounds_the_piece_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csvtable, "_CELLS_PER_CHUNK", 1000)
    n = 2000
    df = pd.DataFrame({"a": np.arange(n), "b": np.zeros(n), "c": ["x"] * n, "d": [True] * n})
    pieces = list(csv_text_chunks(df))
    assert len(pieces) == 1 + n // 250  # the header, then blocks of 1000 cells
    assert "".join(pieces) == df.to_csv(index=False)


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("df", [
    pd.DataFrame({"t": pd.to_datetime(["2020-01-01 00:00", None, "2021-05-06 10:00"])}),
    pd.DataFrame({"d": pd.to_timedelta([1, None], unit="s"), "x": [1.0, 2.0]}),
    pd.DataFrame({"c": [1 + 2j, np.nan]}),
    pd.DataFrame({"f": pd.array([1.5, None], dtype="Float64")}),
    pd.DataFrame({"p": pd.period_range("2020-01", periods=2, freq="M")}),
    pd.DataFrame({"iv": pd.interval_range(0, 2)}),
    pd.DataFrame({"c": pd.Categorical(pd.to_datetime(["2020-01-01", None]))}),
    pd.DataFrame({1: [1.5], 2.5: ["x"]}),
    pd.DataFrame([[1, 2]], columns=pd.MultiIndex.from_tuples([("a", "b"), ("a", "c")])),
    pd.DataFrame(),
    pd.DataFrame(index=[0, 1, 2]),
], ids=["datetime", "timedelta", "complex", "Float64", "period", "interval", "cat-datetime",
        "non-str-labels", "multiindex", "nothing", "rows-no-columns"])
def test_other_dtypes_fall_back_to_identical_text(df: pd.DataFrame) -> None:
    assert "".join(csv_text_chunks(df, 1)) == df.to_csv(index=False)


# --------------------------------------------------------------------------- the file


def test_write_is_pandas_bytes_and_reads_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 50
    df = pd.DataFrame({
        "step": np.arange(n, dtype=np.int64),
        "series": pd.Categorical.from_codes(np.zeros(n, np.int8), categories=["loss"]),
        "value": np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n) * 1e3),
        "spike": rng.random(n) < 0.3,
        "note": pd.Series(rng.choice(["ok", "a,b", 'x "y"', "two\nlines", "é"], n), dtype=object),
    })
    out = write_csv_table(tmp_path / "t.csv", df, chunk_rows=7)
    assert out == tmp_path / "t.csv"
    assert out.read_bytes() == df.to_csv(index=False).encode("utf-8")
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    back = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert back["step"].tolist() == df["step"].tolist()
    assert back["series"].tolist() == df["series"].astype(str).tolist()
    np.testing.assert_array_equal(back["value"].to_numpy(), df["value"].to_numpy())  # full precision, NaN kept
    assert back["spike"].tolist() == df["spike"].tolist()
    assert back["note"].tolist() == df["note"].tolist()


def test_lone_surrogates_are_replaced_like_write_atomic(tmp_path: Path) -> None:
    df = pd.DataFrame({"s": pd.Series(["ok", "bad\ud800x"], dtype=object)})
    out = write_csv_table(tmp_path / "s.csv", df)
    assert out.read_bytes() == df.to_csv(index=False).encode("utf-8", errors="replace")


def test_unwritable_folder_is_a_trainaudit_error(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "t.csv"
    with pytest.raises(TrainauditError, match="t.csv"):
        write_csv_table(target, pd.DataFrame({"a": [1]}))


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "t.csv"
    target.write_text("old\n")

    class Boom:
        def __str__(self) -> str:
            raise RuntimeError("cannot format")

    df = pd.DataFrame({"o": pd.Series([1] * 10 + [Boom()], dtype=object)})
    with pytest.raises(RuntimeError):
        write_csv_table(target, df, chunk_rows=3)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_text_chunks_round_trip_through_read_csv() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200)
    # pandas writes a lone "\r" unquoted on Python 3.11 (csv quotes only the line terminator's
    # characters there), so such a string does not read back; NUL neither
    readable = [s for s in TRICKY_STRINGS[1:] if "\r" not in s.replace("\r\n", "") and "\x00" not in s]
    df = pd.DataFrame({"x": x, "s": pd.Series(rng.choice(readable, 200), dtype=object)})
    back = pd.read_csv(io.StringIO("".join(csv_text_chunks(df, 17))), keep_default_na=False, na_values=[])
    np.testing.assert_array_equal(back["x"].to_numpy(), x)
    assert back["s"].tolist() == df["s"].tolist()
