"""Text logs streamed line by line with bounded memory, and the one JSONL record parser.

``iter_line_blocks`` is the one line streamer: it reads at most the size seen at open (a log
still being appended to, or ``/dev/zero``, cannot make it run forever or change the result),
keeps at most ``max_line`` bytes of a partial line, and repairs what a killed or resumed
process leaves behind, each repair reported in ``DataWarnings`` (bad-inputs.md D1-D14): a
UTF-8 BOM and the CR of CRLF are removed, NUL bytes (preallocated or torn tails) are dropped,
a line longer than ``max_line`` is skipped, a final line without newline is ignored.
``iter_line_batches`` and ``iter_lines`` decode its blocks; CSV readers hand them to pandas.
"""
from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from loaders.errors import DataWarnings, TrainauditError
from loaders.safeio import open_regular, read_bounded

__all__ = ["MAX_LINE", "BlockDecoder", "DuplicateKeys", "FlatBlock", "iter_line_blocks", "iter_line_batches", "iter_lines",
           "parse_json_line", "parse_flat_json_block", "read_json"]

MAX_LINE = 1 << 20          # longest accepted log line (bytes); longer lines are skipped
_CHUNK = 1 << 20            # read size of the line streamer
_BOM = b"\xef\xbb\xbf"


def _human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n} bytes"


def _line_by_line(block: bytes, lineno: int, p: Path, warnings: DataWarnings, max_line: int,
                  nul_lines: list[int]) -> list[tuple[int, bytes]]:
    """The repairs one line at a time: overlong lines, NUL bytes, CR, BOM (the slow path)."""
    out: list[tuple[int, bytes]] = []
    cur: list[bytes] = []
    start = lineno + 1
    for part in block.split(b"\n"):
        lineno += 1
        if len(part) > max_line:
            warnings.add(p, f"line {lineno} exceeds {_human(max_line)}, skipped")
            part = None
        else:
            if part.endswith(b"\r"):
                part = part[:-1]
            if lineno == 1 and part.startswith(_BOM):
                part = part[3:]
            if b"\x00" in part:
                nul_lines.append(lineno)
                part = part.replace(b"\x00", b"") or None
        if part is None:  # a skipped line ends the run of consecutive lines
            if cur:
                out.append((start, b"\n".join(cur)))
            cur, start = [], lineno + 1
        else:
            cur.append(part)
    if cur:
        out.append((start, b"\n".join(cur)))
    return out


def _repaired(block: bytes, lineno: int, p: Path, warnings: DataWarnings, max_line: int,
              nul_lines: list[int]) -> list[tuple[int, bytes]]:
    """Complete lines of ``block`` (newline-separated, no final newline) after line ``lineno``.

    Fast path, one pass over the bytes: no NUL byte and no line that can exceed the cap. Only the
    first line of a block can be longer than a read (it continues the previous read), so only it
    is measured unless a read is longer than the cap.
    """
    if b"\x00" not in block:
        first = block.find(b"\n")
        if ((first if first >= 0 else len(block)) <= max_line
                and (_CHUNK <= max_line or len(block) <= max_line)):
            if lineno == 0 and block.startswith(_BOM):
                block = block[3:]
            if b"\r" in block:
                block = block.replace(b"\r\n", b"\n")
                if block.endswith(b"\r"):
                    block = block[:-1]
            return [(lineno + 1, block)]
    return _line_by_line(block, lineno, p, warnings, max_line, nul_lines)


def iter_line_blocks(path: str | os.PathLike[str], warnings: DataWarnings, *,
                     root: str | os.PathLike[str] | None = None, max_line: int = MAX_LINE,
                     keep_unterminated: bool = False) -> Iterator[tuple[int, bytes]]:
    """Stream a text file as ``(first_line_number, lines joined by b"\\n")``, repaired, undecoded.

    Lines are numbered from 1; a block holds consecutive lines only (a skipped line starts a new
    block) and never ends with a newline. A final line without newline is ignored with a warning
    ("<file>:<N>: incomplete final line ignored") unless ``keep_unterminated``. Raises
    ``TrainauditError`` when the file may not be opened (``open_regular``).
    """
    p = Path(path)
    nul_lines: list[int] = []
    with open_regular(p, root) as f:
        left = f.snapshot_size  # type: ignore[attr-defined]
        carry = b""            # partial line so far (at most max_line bytes)
        skipping = False       # inside an overlong line whose start was dropped
        lineno = 0             # number of the last completed line
        while left > 0:
            data = f.read(min(_CHUNK, left))
            if not data:
                break  # the file shrank after the snapshot
            left -= len(data)
            nl = data.rfind(b"\n")
            if nl < 0:  # no line ends in this chunk
                if not skipping:
                    if len(carry) + len(data) > max_line:
                        skipping, carry = True, b""
                    else:
                        carry += data
                continue
            head, tail = data[:nl], data[nl + 1:]
            block: bytes | None
            if skipping:
                lineno += 1
                warnings.add(p, f"line {lineno} exceeds {_human(max_line)}, skipped")
                skipping = False
                k = head.find(b"\n")
                block = None if k < 0 else head[k + 1:]
            else:
                block = carry + head
            carry = b""
            if block is not None:
                blocks = _repaired(block, lineno, p, warnings, max_line, nul_lines)
                lineno += block.count(b"\n") + 1
                yield from blocks
            if len(tail) > max_line:
                skipping = True
            else:
                carry = tail
        if nul_lines:
            span = f"{nul_lines[0]}" if len(nul_lines) == 1 else f"{nul_lines[0]}-{nul_lines[-1]}"
            warnings.add(p, f"NUL bytes ignored (line{'s' if len(nul_lines) > 1 else ''} {span})")
        if skipping:
            warnings.add(p, f"line {lineno + 1} exceeds {_human(max_line)}, skipped")
        elif carry:
            lineno += 1
            if carry.endswith(b"\r"):
                carry = carry[:-1]
            if lineno == 1 and carry.startswith(_BOM):
                carry = carry[3:]
            body = carry.replace(b"\x00", b"")
            if not body.strip():
                if b"\x00" in carry:
                    warnings.add(p, "NUL bytes at end of file ignored", line=lineno)
            elif keep_unterminated:
                yield lineno, body
            else:
                warnings.add(p, "incomplete final line ignored", line=lineno)


def iter_line_batches(path: str | os.PathLike[str], warnings: DataWarnings, *,
                      root: str | os.PathLike[str] | None = None, max_line: int = MAX_LINE,
                      keep_unterminated: bool = False) -> Iterator[tuple[int, list[str]]]:
    """``iter_line_blocks`` decoded: ``(first_line_number, [line, ...])``.

    Invalid UTF-8 is replaced (one warning per file, naming the first line). This form saves
    a Python call per line over ``iter_lines``.
    """
    decode = BlockDecoder(path, warnings)
    for start, block in iter_line_blocks(path, warnings, root=root, max_line=max_line,
                                         keep_unterminated=keep_unterminated):
        yield start, decode(start, block)


class BlockDecoder:
    """A block of ``iter_line_blocks`` as a list of lines; invalid UTF-8 is replaced, with one
    warning per file naming the first such line."""

    __slots__ = ("path", "warnings", "bad_utf8")

    def __init__(self, path: str | os.PathLike[str], warnings: DataWarnings) -> None:
        self.path, self.warnings, self.bad_utf8 = path, warnings, False

    def __call__(self, start: int, block: bytes) -> list[str]:
        try:
            return block.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            pass
        lines = []
        for i, raw in enumerate(block.split(b"\n"), start):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                if not self.bad_utf8:
                    self.warnings.add(self.path, "invalid UTF-8 bytes replaced", line=i)
                self.bad_utf8 = True
                lines.append(raw.decode("utf-8", errors="replace"))
        return lines


def iter_lines(path: str | os.PathLike[str], warnings: DataWarnings, *,
               root: str | os.PathLike[str] | None = None, max_line: int = MAX_LINE,
               keep_unterminated: bool = False) -> Iterator[tuple[int, str]]:
    """Stream ``(line_number, text)`` pairs of a text log (``iter_line_batches``, one at a time).

    Empty lines are yielded as "" so callers can count them.
    """
    for start, lines in iter_line_batches(path, warnings, root=root, max_line=max_line,
                                          keep_unterminated=keep_unterminated):
        yield from enumerate(lines, start)


class DuplicateKeys:
    """``object_pairs_hook`` that records duplicate keys (Python keeps the last silently)."""

    __slots__ = ("dups",)

    def __init__(self) -> None:
        self.dups: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    self.dups.append(k)
                seen.add(k)
        return d


_LOCAL = threading.local()
_SLOW = object()  # parse_json_line: the fast path gave no value


def _decoder() -> tuple[json.JSONDecoder, DuplicateKeys]:
    """One decoder per thread: ``json.loads(..., object_pairs_hook=)`` would build one per call."""
    d = getattr(_LOCAL, "decoder", None)
    if d is None:
        hook = DuplicateKeys()
        d = _LOCAL.decoder = (json.JSONDecoder(object_pairs_hook=hook), hook)
    return d


def parse_json_line(text: str, warnings: DataWarnings, path: str | os.PathLike[str],
                    lineno: int | None) -> dict[str, Any] | None:
    """Parse one JSONL record; ``None`` (with a warning naming file and line) if unusable.

    A blank line gives ``None`` without a warning.
    ``NaN``, ``Infinity`` and ``-Infinity`` tokens are accepted (Python's json and Transformers
    write them); duplicate keys keep the last value and are warned about.
    """
    decoder, hook = _decoder()
    hook.dups.clear()
    try:  # the C scanner directly: JSONDecoder.decode adds two whitespace regexes per line
        obj, end = decoder.scan_once(text, 0)
        if end != len(text) and text[end:].strip():
            obj = _SLOW
    except (StopIteration, ValueError, RecursionError):
        obj = _SLOW
    if obj is _SLOW:  # leading blanks, a blank line or an error: the documented way, for its message
        if not text.strip():
            return None
        hook.dups.clear()
        try:
            obj = decoder.decode(text)
        except json.JSONDecodeError as e:
            warnings.add(path, f"not valid JSON ({e.msg} at column {e.colno}), skipped", line=lineno)
            return None
        except (ValueError, RecursionError) as e:
            warnings.add(path, f"not valid JSON ({type(e).__name__}), skipped", line=lineno)
            return None
    if type(obj) is not dict:
        warnings.add(path, f"not a JSON object ({type(obj).__name__}), skipped", line=lineno)
        return None
    if hook.dups:
        names = ", ".join(sorted(set(hook.dups)))
        warnings.add(path, f"duplicate keys {names} (last value kept)", line=lineno)
    return obj


class FlatBlock(NamedTuple):
    """Records of ``parse_flat_json_block``: ``n`` lines; per key (in order of first appearance)
    the line indices that carry it and the indices of its values in ``values`` (floats) and
    ``raw`` (``raw[i]``: value ``i`` as ``json`` gives it, so ints stay exact)."""

    n: int
    keys: dict[str, tuple[np.ndarray, np.ndarray]]
    values: np.ndarray
    raw: Sequence[Any]


_LINE_SHAPE = b'{"":}\n'
_KEPT = b'{}":,[]\n' + bytes([*range(0, 9), 11, 12, *range(14, 32)])   # structure, and bytes JSON refuses
_NOT_KEPT = bytes(b for b in range(256) if b not in _KEPT)
_MAX_KEYS = 62                  # distinct keys of a block (one bit each in the duplicate check)
_MAX_BLANKS = 8                 # blanks before a number that the vectorised reader steps over
_PAIR_ROWS = bytes.maketrans(b",", b"\n")          # '"key": value' a row, braces deleted
_TO_ARRAY = bytes.maketrans(b":\n", b",,")         # one JSON array: key, value, key, value, ...
_LOW_BYTES = np.array([(1 << 8 * k) - 1 for k in range(9)], dtype=np.uint64)   # masks of the k low bytes
_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[48:58] = True


def parse_flat_json_block(block: bytes) -> FlatBlock | None:
    """Every line of ``block`` (``iter_line_blocks``: repaired lines joined by newlines) parsed at
    once when all are flat records of numbers, ``{"key": number, ...}`` (what loggers write);
    ``None`` when any line is not, or has a duplicate key or a ``rank`` field: the caller then
    parses the lines one by one (``parse_json_line``), which gives the same records.

    A handful of vectorised passes over the bytes: the line shapes are checked on the structural
    bytes alone; keys are told apart by comparing their bytes eight at a time; the numbers go to
    pandas' C reader (correctly rounded, as ``json``) once they are known to be JSON numbers, and
    otherwise (``NaN``, ``Infinity``, what JSON's grammar refuses) to ``json`` itself, whose
    grammar decides.
    """
    if not block or b"\\" in block:
        return None
    # Structure: each line is { "" : ( , "" : )* } - no nesting, no arrays, no string values,
    # no control byte.
    shape = block.translate(None, _NOT_KEPT).replace(b',"":', b"")
    n = shape.count(b"\n") + 1
    if shape != (_LINE_SHAPE * n)[:-1] or block[0] != 123 or block[-1] != 125:
        return None
    a = np.frombuffer(block, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    if n > 1 and ((a[nl + 1] != 123).any() or (a[nl - 1] != 125).any()):
        return None  # text before { or after } (JSON allows blanks there: the per-line path)
    quotes = np.flatnonzero(a == 34)
    opens, closes = quotes[0::2], quotes[1::2]
    if (a[closes + 1] != 58).any():
        return None  # blanks between a key and its colon: the per-line path
    found = _key_ids(block, opens, closes)
    if found is None:
        return None
    names, ids = found
    per_line = np.diff(np.r_[0, np.searchsorted(opens, nl), len(opens)])   # keys a line (>= 1: shape)
    line = np.repeat(np.arange(n), per_line)
    distinct = np.bitwise_count(np.bitwise_or.reduceat(np.left_shift(np.int64(1), ids), np.cumsum(per_line) - per_line))
    if (distinct != per_line).any():
        return None  # a key twice in one record: the per-line path warns about it
    text = _NumberText(block, closes)
    values = _numbers_by_pandas(block, a, text)
    raw: Sequence[Any]
    if values is not None:
        raw = text
        minus_zero = np.flatnonzero((values == 0) & np.signbit(values))
        if len(minus_zero):
            values = values.copy()
            values[minus_zero] = [raw[i] for i in minus_zero.tolist()]  # json reads the integer -0 as 0
    else:
        got = _numbers_by_json(block, len(opens))
        if got is None:
            return None
        values, raw = got
    cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, name in enumerate(names):
        idx = np.arange(len(ids)) if len(names) == 1 else np.flatnonzero(ids == k)
        cols[name] = (line[idx], idx)
    return FlatBlock(n, cols, values, raw)


def _key_ids(block: bytes, opens: np.ndarray, closes: np.ndarray) -> tuple[list[str], np.ndarray] | None:
    """The distinct keys (in order of first appearance) and each key's index among them: keys of
    one length compared as 8-byte words of the block. None past ``_MAX_KEYS``, on a key that is
    not UTF-8 or holds a tab, or on a ``rank`` key."""
    words = np.frombuffer(block + bytes((-len(block)) % 8 + 8), dtype="<u8")

    def word(at: np.ndarray, size: np.ndarray) -> np.ndarray:
        """The ``size`` (<= 8, little-endian) bytes at each offset, from two aligned words."""
        i, shift = at >> 3, (at & 7).astype(np.uint64) * np.uint64(8)
        w = (words[i] >> shift) | ((words[i + 1] << np.uint64(1)) << (np.uint64(63) - shift))
        return w & _LOW_BYTES[np.minimum(size, 8)]

    lengths = closes - opens - 1
    first_word = word(opens + 1, lengths)
    ids = np.full(len(opens), -1, dtype=np.int64)
    names: list[str] = []
    first = 0
    while first < len(opens):
        if len(names) == _MAX_KEYS:
            return None
        size, at = int(lengths[first]), int(opens[first]) + 1
        try:
            name = block[at:at + size].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if name == "rank" or "\t" in name:
            return None  # a rank is kept apart; JSON refuses a raw tab in a string
        same = np.flatnonzero((first_word == first_word[first]) & (lengths == size))
        for w in range(8, size, 8):  # longer keys: the next words of the candidates
            rest = np.full(len(same), size - w)
            same = same[word(opens[same] + 1 + w, rest) == word(np.array([at + w]), rest[:1])[0]]
        ids[same] = len(names)
        names.append(name)
        first += int(np.argmax(ids[first:] < 0)) if (ids[first:] < 0).any() else len(opens)
    return names, ids


def _numbers_by_pandas(block: bytes, a: np.ndarray, text: _NumberText) -> np.ndarray | None:
    """The values of a block whose shape is checked (``text``: each value's own text), when every
    one is a plain JSON number; None when that is not sure (``_numbers_by_json`` decides then).

    pandas' reader accepts a superset of JSON numbers; what it accepts and JSON refuses is ruled
    out: a ``+`` outside an exponent, a ``.`` without digits on both sides (a rule that also trips
    on a key's bytes only costs speed), a leading zero before a digit; an infinity must be what
    ``json`` reads (``1e400``, ``Infinity``), not pandas' ``inf``. Any other letter fails pandas.
    """
    if b"\r" in block:
        return None  # pandas would end a line there
    if b"+" in block:
        p = np.flatnonzero(a == 43)
        if not ((a[p - 1] == 101) | (a[p - 1] == 69)).all():
            return None
    p = np.flatnonzero(a == 46)
    if len(p) and not (_DIGIT[a[p - 1]] & _DIGIT[a[p + 1]]).all():
        return None
    start = text.closes + 2                      # each number's first byte, past blanks and a minus
    for _ in range(_MAX_BLANKS):
        blank = (a[start] == 32) | (a[start] == 9)
        if not blank.any():
            break
        start = start + blank
    else:
        return None
    start = start + (a[start] == 45)
    if ((a[start] == 48) & _DIGIT[a[np.minimum(start + 1, len(a) - 1)]]).any():
        return None  # a leading zero
    import pandas as pd

    # One '"key": value' pair a row, in file order; keys are not converted (quotes left as they are).
    pairs = io.BytesIO(block.translate(_PAIR_ROWS, b"{}"))
    try:
        frame = pd.read_csv(pairs, sep=":", header=None, names=[0, 1], usecols=[1], dtype=np.float64,
                            engine="c", quoting=csv.QUOTE_NONE, keep_default_na=False, na_values=[""],
                            skip_blank_lines=False, comment=None, escapechar=None)
    except (ValueError, pd.errors.ParserError):
        return None
    if len(frame) != len(text):
        return None
    values = frame[1].to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        return None
    for i in np.flatnonzero(np.isinf(values)).tolist():  # pandas also reads inf, +Infinity, ...
        try:
            if text[i] != float(values[i]):
                return None
        except (ValueError, OverflowError):  # not JSON, or an integer too big for a float
            return None
    return values


def _numbers_by_json(block: bytes, count: int) -> tuple[np.ndarray, list[Any]] | None:
    """The values of a block whose shape is checked, by ``json`` (its number grammar, NaN and
    Infinity included); None when one is not a number."""
    try:
        pairs = json.loads(b"[" + block.translate(_TO_ARRAY, b"{}") + b"]")
    except (ValueError, RecursionError):
        return None
    raw = pairs[1::2]
    if len(pairs) != 2 * count or not {type(v) for v in raw} <= {int, float}:
        return None  # booleans, nulls and strings are not numbers: the per-line path counts them
    try:
        return np.array(raw, dtype=np.float64), raw
    except OverflowError:
        return None


class _NumberText(Sequence[Any]):
    """Value ``i`` of a block as ``json`` reads it, parsed on request (a step too big for a float)."""

    def __init__(self, block: bytes, closes: np.ndarray) -> None:
        self.block, self.closes = block, closes

    def __len__(self) -> int:
        return len(self.closes)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        start = int(self.closes[i]) + 2
        ends = [e for e in (self.block.find(b",", start), self.block.find(b"}", start)) if e >= 0]
        return json.loads(self.block[start:min(ends)])


def read_json(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, *,
              max_bytes: int) -> Any:
    """A whole JSON document (UTF-8, BOM allowed) of at most ``max_bytes``, or ``TrainauditError``
    naming the file: "not UTF-8 text", "not valid JSON: <why> (line N)" or "(truncated (cut
    mid-write?))" when the error is at the very end."""
    raw = read_bounded(path, root, max_bytes=max_bytes)
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise TrainauditError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        where = "truncated (cut mid-write?)" if e.pos >= len(raw.rstrip()) - 1 else f"line {e.lineno}"
        raise TrainauditError(path, f"not valid JSON: {e.msg} ({where})") from None
    except (ValueError, RecursionError) as e:
        raise TrainauditError(path, f"not valid JSON ({type(e).__name__})") from None
