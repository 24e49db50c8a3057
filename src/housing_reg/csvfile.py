"""Read a numeric CSV with a header row into float64 arrays; every failure is one line.

np.loadtxt parses any body it splits as the csv module would; the csv module reads the rest
and names the first bad line and column. What neither does alone is here: the one-line
messages, strict numerals (no nan, inf, 1_000 or hex), decimal commas, hints for a file read
with the wrong delimiter or decimal mark, and which path a file takes. Only the columns in use
(the features and the target) are parsed: the others may hold anything.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

BOSTON_CSV = Path(str(files("housing_reg") / "datasets" / "boston.csv"))


class DataError(ValueError):
    """Bad input data or data settings; the message says what, where and how to fix it."""

    def __init__(self, message: str):
        # A quoted header or cell may hold a line break; the message stays one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (rows, features) float64
    y: np.ndarray | None  # (rows,) float64; None: no target column (load_csv's need_target)
    features: tuple[str, ...]
    target: str


# What a cell may hold: an optional sign, digits with an optional decimal point (or a point and
# digits), an optional exponent; ASCII spaces and tabs around it are ignored. Nothing else that
# float() takes: no digit separators (1_000), no non-ASCII digits or spaces, no words (nan and
# inf are refused as not finite), no hex.
NUMERAL = r"[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*"
_NUMERAL = re.compile(NUMERAL)
_NON_FINITE = re.compile(r"[ \t]*[+-]?(?:nan|inf|infinity)[ \t]*", re.IGNORECASE)
# What numerals are made of. Of strings of these, float() and np.loadtxt take exactly the
# NUMERALs (no letters for nan or inf, no _, no other blanks), to the same correctly rounded
# float64: so strings of these need no NUMERAL match, only a parse.
_NUMERAL_BYTES = b"0123456789+-.eE \t"
# What may stand in a body beside numerals for np.loadtxt to split it as the csv module does:
# no quote, and no control character, which loadtxt would strip from a cell as blank ("\x0b1"
# is 1 to it), NUMERAL not. (Bytes 0x85 and 0xA0, blank in latin-1, only follow a lead byte in
# UTF-8, and the lead byte is a letter to loadtxt.) A lone \r, a line break to the csv module,
# loadtxt refuses.
_NOT_SPLIT_ALIKE = bytes([*range(9), 11, 12, *range(14, 32), 127]) + b'"'
_SWAP_DECIMAL = bytes.maketrans(b",.", b".,")  # decimal commas to points, and points to commas
_SWAP_DECIMAL_STR = str.maketrans(",.", ".,")
_DELIMITERS = (",", ";", "\t", "|")  # what a header of one column is tried against
_EOL = re.compile(rb"\r\n?|\n")  # a line break, for open(newline="") and the csv module
_NOT_EOL = re.compile(rb"[^\r\n]")
# A CSV as Python's csv module and most files write it; data.delimiter and data.decimal
# change it. Jobs recorded before those settings existed were read this way.
DIALECT = {"delimiter": ",", "decimal": "."}
_BLOCK_ROWS = 4096  # rows the exact path converts at a time


def load_csv(
    path: str | Path | None,
    target: str = "MEDV",
    features: Sequence[str] | None = None,
    allow_constant: bool = False,
    need_target: bool = True,
    *,
    delimiter: str = DIALECT["delimiter"],
    decimal: str = DIALECT["decimal"],
) -> Table:
    """Read a numeric CSV with a header row; every failure is a one-line DataError.

    path None is the bundled Boston file. Every cell of the features and the target must be a
    numeral (see NUMERAL) with `decimal` as its decimal mark; the cells of other columns are
    not read. Messages give the file's own line numbers, blank lines counted. Constant feature
    columns are refused unless allow_constant (rows to predict on, not to fit a standardizer
    on): their standard deviation is 0, and dividing by it is undefined. A file without the
    target column is refused, unless need_target is False (rows to predict on only): then
    Table.y is None.

    A body np.loadtxt splits as the csv module would is parsed by it (_fast_body); any other,
    and any that loadtxt refuses, is read by the csv module and checked cell by cell
    (_exact_body), which names the first bad line and column. The first problem in the file is
    the one reported: bytes that are not UTF-8, then the header, then the rows in order.
    """
    delimiter = check_dialect(delimiter, decimal)
    path = _csv_path(path)
    numeric = _NUMERAL_BYTES.replace(b".", decimal.encode()) + delimiter.encode() + b"\r\n"
    raw, odd = _read(path, numeric)
    header, header_lines, body_start = _header(raw, path, delimiter)
    if len(header) == 1:
        _one_column(raw, body_start, header[0], delimiter, decimal, path)
    if all(_is_number(h) for h in header):
        raise DataError(
            f"{path}: first row {','.join(header[:4])}... is numeric, not a "
            "header; add a header row naming the columns"
        )
    if len(set(header)) != len(header) or "" in header:
        raise DataError(
            f"{path}: header has empty or duplicate column names: "
            f"{','.join(header)}; give every column a unique name"
        )
    if target not in header and need_target:
        raise DataError(
            f"{path}: target column {target!r} not found; set data.target to "
            f"one of: {', '.join(header)}"
        )
    if features is None:
        features = [h for h in header if h != target]
    features = list(features)
    twice = sorted({c for c in features if features.count(c) > 1})
    if twice:
        raise DataError(
            f"data.features names {', '.join(map(repr, twice))} more than once; "
            "name each column once"
        )
    missing = [c for c in features if c not in header]
    if missing:
        raise DataError(
            f"{path}: feature column(s) {', '.join(missing)} not found; "
            f"data.features must name columns among: {', '.join(header)}"
        )
    if target in features or not features:
        raise DataError(
            f"{path}: data.features must name at least one column other than the target {target!r}"
        )
    used = [*features, target] if target in header else features
    cols = sorted({header.index(c) for c in used})  # in use, in file order
    values = _fast_body(
        raw,
        odd[len(raw[:body_start].translate(None, numeric)) :],
        body_start,
        len(header),
        cols,
        delimiter,
        decimal,
    )
    if values is not None and not np.isfinite(values).all():
        values = None  # a numeral beyond float64: the exact path names its line and column
    if values is None:
        values = _exact_body(raw, body_start, header_lines, header, cols, path, delimiter, decimal)
    del raw
    x = _columns(values, [cols.index(header.index(c)) for c in features])
    constant = [c for c, same in zip(features, _constant(x), strict=True) if same]
    if constant and not allow_constant:
        raise DataError(
            f"{path}: feature column(s) {', '.join(constant)} are constant and "
            "cannot be standardized; leave them out with data.features=[...]"
        )
    y = values[:, cols.index(header.index(target))] if target in header else None
    return Table(x, y, tuple(features), target)


def check_dialect(delimiter: object, decimal: object) -> str:
    """The delimiter, or a DataError for settings the reader cannot use. The two characters
    \\t mean a tab: Hydra's command line passes data.delimiter='\\t' so."""
    if decimal not in (".", ","):
        raise DataError(f"data.decimal={decimal!r} must be '.' or ',' (the mark before decimals)")
    delimiter = "\t" if delimiter == "\\t" else delimiter
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise DataError(
            f"data.delimiter={delimiter!r} must be one character, e.g. ',' or ';' (or '\\t')"
        )
    if delimiter == decimal:
        raise DataError(
            f"data.delimiter={delimiter!r} is also data.decimal: a decimal comma needs "
            "another delimiter; set data.delimiter=';'"
        )
    if delimiter == '"' or (delimiter != "\t" and not delimiter.isprintable()):
        raise DataError(
            f"data.delimiter={delimiter!r} cannot be a quote, a line break or a control character; "
            "set it to the character between the cells, e.g. ',' or ';'"
        )
    if not delimiter.isascii() or delimiter in "0123456789+-.eE":
        raise DataError(
            f"data.delimiter={delimiter!r} must be an ASCII character that is no part of a "
            "number, e.g. ',' or ';'"
        )
    return delimiter


def _one_column(
    raw: bytes, start: int, name: str, delimiter: str, decimal: str, path: Path
) -> None:
    """A header of one column that another delimiter would split: the file's real delimiter,
    named in a DataError (with the decimal comma its first row may show)."""
    found = [d for d in _DELIMITERS if d != delimiter and d in name]
    if not found:
        return
    d = max(found, key=name.count)
    fix = f"data.delimiter={d!r}"
    if d == decimal:  # a ','-separated file has decimal points
        fix += " and data.decimal='.'"
    elif decimal == "." and d != ",":
        stream = io.BytesIO(raw)  # shares raw's bytes
        stream.seek(start)
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        try:
            row = next((r for r in csv.reader(text, delimiter=d) if "".join(r).strip()), [])
        except csv.Error:
            row = []
        if any(_other_decimal(c, ".") for c in row):
            fix += " and data.decimal=','"
    raise DataError(
        f"{path}: the header is one column, {name!r}, and looks {d!r}-separated; set {fix}"
    )


def _is_number(s: str) -> bool:
    """Whether float() takes s, nan and 1_000 included: lenient, to tell a first row of data
    from a header (cells are held to NUMERAL)."""
    try:
        float(s)
    except ValueError:
        return False
    return True


def _csv_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        return BOSTON_CSV
    if isinstance(path, str) and not path.strip():
        raise DataError("data.path is empty; set it to a CSV file, or to null for the bundled data")
    if not isinstance(path, str | os.PathLike):
        raise DataError(
            f"data.path={path!r} is not a file path; set it to a CSV file, or to null for the "
            "bundled data"
        )
    return Path(path)


def _read(path: Path, numeric: bytes) -> tuple[bytes, bytes]:
    """The file's bytes, all of them checked to be UTF-8 before anything is made of them; and
    those of them that are not `numeric` (what numerals and their separators are made of), in
    order."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; set data.path to an existing CSV") from None
    except OSError as e:
        raise DataError(
            f"{path}: cannot read file ({e}); set data.path to a readable UTF-8 CSV"
        ) from None
    odd = raw.translate(None, numeric)
    if not odd.isascii():
        decoder, view, step = codecs.getincrementaldecoder("utf-8")(), memoryview(raw), 1 << 20
        try:
            for i in range(0, len(raw), step):  # a piece at a time: no copy of the whole file
                decoder.decode(view[i : i + step])
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}: cannot read file ({e}); set data.path to a readable UTF-8 CSV"
            ) from None
    return raw, odd


def _header(raw: bytes, path: Path, delimiter: str) -> tuple[list[str], int, int]:
    """The first record with something in it, its cells stripped; the number of lines up to
    its end, and the byte offset after it."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        row = next((r for r in reader if "".join(r).strip()), None)
    except csv.Error as e:
        raise DataError(
            f"{path}, line {reader.line_num}: not a valid CSV ({e}); fix the file"
        ) from None
    if row is None:
        raise DataError(f"{path}: file is empty; expected a header row and numeric rows")
    start = 0
    for _ in range(reader.line_num):
        eol = _EOL.search(raw, start)
        start = eol.end() if eol else len(raw)
    return [h.strip() for h in row], reader.line_num, start


def _fast_body(
    raw: bytes,
    odd: bytes,
    start: int,
    ncols: int,
    cols: list[int],
    delimiter: str,
    decimal: str,
) -> np.ndarray | None:
    """Columns `cols` of the rows from byte `start` on, parsed by np.loadtxt; None where the
    csv module and NUMERAL might not agree with it, for the exact path to decide.

    odd: the bytes from `start` on that are no digit, sign, decimal mark, e, E, space, tab,
    delimiter or line break. With every column in use, taken only where there are none: then
    the csv module splits rows and cells where loadtxt does, and the cells loadtxt takes are
    exactly the NUMERALs, parsed to the same correctly rounded float64 as float(). With columns
    left out (they may hold text), taken where odd holds nothing of _NOT_SPLIT_ALIKE: the two
    still split alike, and of a cell in use loadtxt takes what NUMERAL takes or a word for nan
    or inf, which load_csv's finiteness check sends to the exact path. Whatever loadtxt refuses
    goes to the exact path: a bad cell, a row of spaces (blank to the csv module), a lone \\r
    line break, a row of the wrong length.
    """
    every = len(cols) == ncols
    if odd and (every or len(odd.translate(None, _NOT_SPLIT_ALIKE)) != len(odd)):
        return None  # no numeral where every column is in use, or a quote or control byte
    if not _NOT_EOL.search(raw, start):
        return None  # no rows at all
    if _has_long_line(raw, start, csv.field_size_limit()):
        return None  # it may hold a field longer than the csv module takes
    # BytesIO shares raw's bytes; decimal commas cost a copy with points in their place
    stream = io.BytesIO(raw if decimal == "." else raw.translate(_SWAP_DECIMAL))
    stream.seek(start)
    last = ncols - 1  # read too when not in use: loadtxt then reaches every row's end (below)
    usecols = None if every else sorted({*cols, last})
    try:
        values = np.loadtxt(
            stream,
            dtype=np.float64,
            delimiter=delimiter,
            comments=None,
            quotechar=None,
            ndmin=2,
            encoding="latin-1",
            usecols=usecols,
            converters=None if every or last in cols else {last: len},  # any number
        )
    except ValueError:
        return None
    if not len(values) or values.shape[1] != len(usecols or range(ncols)):
        return None
    if usecols is not None:
        # loadtxt checks the rows' lengths only without usecols. Each row has a last field,
        # so ncols - 1 delimiters or more: if all rows have that many in all, each has ncols.
        if raw.count(delimiter.encode(), start) != len(values) * last:
            return None
        values = values[:, : len(cols)]
    return values


def _has_long_line(raw: bytes, start: int, limit: int) -> bool:
    """Whether a line from `start` on is longer than limit bytes (its \n counted)."""
    # Such a line holds a whole window of limit // 2 bytes with no \n in it: where there is
    # none, a few memchr calls tell. Otherwise, count.
    half = max(limit // 2, 1)
    if all(raw.find(b"\n", i, i + half) >= 0 for i in range(start, len(raw) - half + 1, half)):
        return False
    u = np.frombuffer(raw, dtype=np.uint8)
    longest, last = 0, start - 1  # last: where the line before ended
    step = 1 << 23
    for i in range(start, len(u), step):
        breaks = np.flatnonzero(u[i : i + step] == ord("\n")) + i
        if len(breaks):
            longest = max(longest, int(breaks[0]) - last, int(np.diff(breaks).max(initial=0)))
            last = int(breaks[-1])
    return max(longest, len(u) - 1 - last) > limit


def _exact_body(
    raw: bytes,
    start: int,
    line0: int,
    header: list[str],
    cols: list[int],
    path: Path,
    delimiter: str,
    decimal: str,
) -> np.ndarray:
    """Columns `cols` of the rows from byte `start` on (line line0 + 1), read by the csv
    module and checked cell by cell; the first bad row or cell is a DataError naming its line
    (and column). Cells of other columns are not looked at.

    Rows go in blocks: a block whose cells hold nothing but _NUMERAL_BYTES goes through float()
    at once, and only a block that has a bad cell is gone through again, cell by cell, to find
    the first.
    """
    stream = io.BytesIO(raw)
    stream.seek(start)
    reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8", newline=""), delimiter=delimiter)
    ncols, every = len(header), len(cols) == len(header)
    names = [header[j] for j in cols]
    blocks: list[np.ndarray] = []
    rows: list[list[str]] = []
    lines: list[int] = []

    def block() -> np.ndarray:
        return _block(rows, lines, names, path, delimiter, decimal)

    try:
        for row in reader:
            if not "".join(row).strip():
                continue  # blank lines carry nothing
            line = line0 + reader.line_num
            if len(row) != ncols:
                block()  # a bad cell above this row comes first
                raise DataError(
                    f"{path}, line {line}: {len(row)} fields but the header has "
                    f"{ncols}; make every row as long as the header"
                )
            rows.append(row if every else [row[j] for j in cols])
            lines.append(line)
            if len(rows) == _BLOCK_ROWS:
                blocks.append(block())
                rows, lines = [], []
    except csv.Error as e:
        block()
        raise DataError(
            f"{path}, line {line0 + reader.line_num}: not a valid CSV ({e}); fix the file"
        ) from None
    blocks.append(block())
    values = np.concatenate(blocks)
    if not len(values):
        raise DataError(f"{path}: header but no data rows; add numeric rows")
    return values


def _block(
    rows: list[list[str]],
    lines: list[int],
    names: list[str],
    path: Path,
    delimiter: str,
    decimal: str,
) -> np.ndarray:
    """Rows of cells of the columns `names` -> (rows, columns) float64, or the first bad
    cell's DataError."""
    if not rows:
        return np.empty((0, len(names)))
    cells = [c for row in rows for c in row]
    joined = "".join(cells)
    at_once = True
    if decimal != ".":  # a point is no decimal mark then: only cells without one go at once
        at_once = "." not in joined
        cells = [c.replace(decimal, ".") for c in cells]
        joined = joined.replace(decimal, ".")
    if at_once and joined.isascii() and not joined.encode().translate(None, _NUMERAL_BYTES):
        try:
            values = np.fromiter(map(float, cells), np.float64, len(cells))
        except ValueError:  # not a numeral, as "", "1e" or "+-1"
            pass
        else:
            if np.isfinite(values).all():
                return values.reshape(len(rows), len(names))
    for row, line in zip(rows, lines, strict=True):
        for name, cell in zip(names, row, strict=True):
            problem = _cell_problem(cell, decimal, delimiter)
            if problem:
                raise DataError(f"{path}, line {line}, column {name!r}: {problem}")
    raise AssertionError("a block of good cells was refused")  # unreachable


def _cell_problem(cell: str, decimal: str = ".", delimiter: str = ",") -> str | None:
    """What is wrong with a cell, or None for a finite NUMERAL with `decimal` as its mark."""
    if not cell.strip():
        return "empty cell; fill it in or remove that row"
    number = cell if decimal == "." else cell.translate(_SWAP_DECIMAL_STR)
    if _NUMERAL.fullmatch(number):
        if math.isfinite(float(number)):
            return None
    elif not _NON_FINITE.fullmatch(cell):
        other = _other_decimal(cell, decimal)
        if other and delimiter != other:  # a decimal comma in a ','-separated file: no fix
            mark = "comma" if other == "," else "point"
            return f"{cell!r} uses a decimal {mark}; set data.decimal={other!r}"
        return f"{cell!r} is not a number; fix or remove that row"
    return f"{cell!r} is not a finite number; fill in or remove that row"


def _other_decimal(cell: str, decimal: str) -> str | None:
    """The other decimal mark, where the cell is a numeral with it (and not without)."""
    other = "," if decimal == "." else "."
    with_point = cell.translate(_SWAP_DECIMAL_STR) if other == "," else cell
    return other if other in cell and _NUMERAL.fullmatch(with_point) else None


def _constant(x: np.ndarray) -> np.ndarray:
    """Which columns of x hold one value only; most differ within the first rows already."""
    same = (x[:1024] == x[0]).all(axis=0)
    if same.any():
        same[same] = (x[:, same] == x[0, same]).all(axis=0)
    return same


def _columns(values: np.ndarray, cols: list[int]) -> np.ndarray:
    """values[:, cols]: a view where cols are consecutive, as they are by default with the
    target first or last (copying a million rows costs as much as parsing them)."""
    if cols == list(range(cols[0], cols[0] + len(cols))):
        return values[:, cols[0] : cols[0] + len(cols)]
    return values[:, cols]
