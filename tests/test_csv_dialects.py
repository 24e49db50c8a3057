"""Columns left out of data.features are not read; data.delimiter and data.decimal read
';'-separated files with decimal commas; a file read with the wrong ones says which to set."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from housing_reg import csvfile
from housing_reg.argv import quote_paths
from housing_reg.csvfile import DataError, load_csv
from housing_reg.evaluate import evaluate
from housing_reg.jobdir import training_settings
from housing_reg.report import settings_of
from housing_reg.settings import ConfigError
from housing_reg.train import train

from conftest import FAST, read_metrics

# 12 rows that table() writes in any dialect: numeric columns a, b, y and a text column
# "side", empty in two rows.
A = [0.5 * i for i in range(12)]
B = [(i * 7) % 11 + 0.25 for i in range(12)]
SIDE = ["north", "south", "", "north east", "west", "n/a"] * 2
Y = [2 * a + b for a, b in zip(A, B, strict=True)]


def table(
    delimiter: str = ",", decimal: str = ".", order: str = "a,side,b,y", side: list = SIDE
) -> str:
    """The rows with their columns in `order` (names from a, side, b, y)."""

    def num(v: float) -> str:
        return repr(v).replace(".", decimal)

    rows = [
        {"a": num(a), "side": s, "b": num(b), "y": num(y)}
        for a, s, b, y in zip(A, side, B, Y, strict=True)
    ]
    names = order.split(",")
    lines = [delimiter.join(names)] + [delimiter.join(r[n] for n in names) for r in rows]
    return "\n".join(lines) + "\n"


def with_cell(text: str, delimiter: str, line: int, column: int, value: str | None) -> str:
    """text with one cell replaced, or left out where value is None; line 1 is the header."""
    lines = text.splitlines()
    cells = lines[line - 1].split(delimiter)
    cells[column : column + 1] = [] if value is None else [value]
    lines[line - 1] = delimiter.join(cells)
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def fast_only(path: Path, *args, **kwargs):
    """load_csv that fails where the exact (csv module) path would be taken."""
    with mock.patch.object(csvfile, "_exact_body", side_effect=AssertionError("exact path")):
        return load_csv(path, *args, **kwargs)


def exact_only(path: Path, *args, **kwargs):
    """load_csv with its fast path (np.loadtxt) off."""
    with mock.patch.object(csvfile, "_fast_body", lambda *a: None):
        return load_csv(path, *args, **kwargs)


def assert_rows(t: csvfile.Table, features: list[str]) -> None:
    columns = {"a": A, "b": B}
    np.testing.assert_array_equal(t.x, np.array([columns[f] for f in features]).T)
    np.testing.assert_array_equal(t.y, Y)
    assert t.features == tuple(features)


# -- 10a: only the columns in use are read ---------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("load", [load_csv, fast_only, exact_only])
def test_a_text_column_left_out_of_the_features_is_not_read(tmp_path: Path, load):
    path = write(tmp_path, table())
    assert_rows(load(path, "y", ["a", "b"]), ["a", "b"])
    assert_rows(load(path, "y", ["b"]), ["b"])  # the text column is the last one read
    # cells of an unused column may be anything the csv module splits: quotes, NaN, a
    # delimiter inside quotes, no text at all
    odd = table().replace("north east", '"north, east"').replace("west", "nan")
    assert_rows(load_csv(write(tmp_path, odd), "y", ["a", "b"]), ["a", "b"])
    for features in (None, ["a", "side"]):  # in use, it is refused by line and column
        with pytest.raises(DataError) as e:
            load_csv(path, "y", features)
        assert str(e.value) == (
            f"{path}, line 2, column 'side': 'north' is not a number; fix or remove that row"
        )


@pytest.mark.unit
def test_a_text_column_last_in_the_file_and_unused(tmp_path: Path):
    path = write(tmp_path, table(order="a,y,b,side"))
    for load in (load_csv, fast_only, exact_only):
        assert_rows(load(path, "y", ["a", "b"]), ["a", "b"])


@pytest.mark.unit
@pytest.mark.parametrize("load", [load_csv, exact_only])
@pytest.mark.parametrize(
    ("change", "line", "fields"),
    [
        ({5: (4, "7")}, 5, 5),  # one field too many, at the end: the used ones are fine
        ({4: (1, None)}, 4, 3),  # one too few (the text cell left out)
        ({3: (1, None), 7: (4, "7")}, 3, 3),  # one short, one long: as many delimiters in all
    ],
)
def test_rows_must_be_as_long_as_the_header_in_unused_columns_too(
    tmp_path: Path, load, change: dict, line: int, fields: int
):
    text = table()
    for n, (column, value) in change.items():  # n: the file's line number
        text = with_cell(text, ",", n, column, value)
    path = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        load(path, "y", ["a", "b"])
    assert str(e.value) == (
        f"{path}, line {line}: {fields} fields but the header has 4; make every row as long "
        "as the header"
    )


# -- 10c: data.delimiter and data.decimal -----------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("delimiter", "decimal"), [(";", ","), (";", "."), ("\t", ","), ("\\t", "."), ("|", ",")]
)
def test_other_delimiters_and_decimal_commas_read_the_same_numbers(
    tmp_path: Path, delimiter: str, decimal: str
):
    tab = "\t" if delimiter == "\\t" else delimiter
    path = write(tmp_path, table(tab, decimal))
    dialect = {"delimiter": delimiter, "decimal": decimal}
    for load in (fast_only, exact_only):
        assert_rows(load(path, "y", ["a", "b"], **dialect), ["a", "b"])
    numbers = table(tab, decimal, side=[str(i) for i in range(12)])
    numeric = write(tmp_path, numbers, "numeric.csv")  # every column in use
    t = fast_only(numeric, "y", **dialect)
    np.testing.assert_array_equal(t.x, np.array([A, range(12), B]).T)
    # quoted cells, as spreadsheets write them, go through the csv module
    quoted = write(tmp_path, table(tab, decimal).replace("north", '"north"'), "quoted.csv")
    assert_rows(load_csv(quoted, "y", ["a", "b"], **dialect), ["a", "b"])


@pytest.mark.unit
def test_a_european_file_read_as_a_plain_csv_names_both_settings(tmp_path: Path):
    eu = write(tmp_path, table(";", ","))
    with pytest.raises(DataError) as e:
        load_csv(eu, "y")
    assert str(e.value) == (
        f"{eu}: the header is one column, 'a;side;b;y', and looks ';'-separated; "
        "set data.delimiter=';' and data.decimal=','"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "dialect", "message"),
    [
        (table(";"), {}, "the header is one column, 'a;side;b;y', and looks ';'-separated; "
         "set data.delimiter=';'"),
        (table("\t"), {}, "the header is one column, 'a\\tside\\tb\\ty', and looks "
         "'\\t'-separated; set data.delimiter='\\t'"),
        (table(), {"delimiter": ";"}, "the header is one column, 'a,side,b,y', and looks "
         "','-separated; set data.delimiter=','"),
        (table(";", ","), {"delimiter": ";"}, "line 2, column 'a': '0,0' uses a decimal comma; "
         "set data.decimal=','"),
        (table(";"), {"delimiter": ";", "decimal": ","}, "line 2, column 'a': '0.0' uses a "
         "decimal point; set data.decimal='.'"),
        (with_cell(table(";", ","), ";", 4, 2, "5,5.0"), {"delimiter": ";", "decimal": ","},
         "line 4, column 'b': '5,5.0' is not a number; fix or remove that row"),
        (table(), {"delimiter": ";", "decimal": ","}, "the header is one column, 'a,side,b,y', "
         "and looks ','-separated; set data.delimiter=',' and data.decimal='.'"),
    ],
)  # fmt: skip
def test_a_file_read_with_the_wrong_dialect_says_what_to_set(
    tmp_path: Path, text: str, dialect: dict, message: str
):
    path = write(tmp_path, text)
    for load in (load_csv, exact_only):
        with pytest.raises(DataError) as e:
            load(path, "y", ["a", "b"], **dialect)
        assert message in str(e.value) and "\n" not in str(e.value)


NONSENSE = [
    (",", ",", "data.delimiter=',' is also data.decimal: a decimal comma needs another "
     "delimiter; set data.delimiter=';'"),
    (";;", ".", "data.delimiter=';;' must be one character"),
    ("", ".", "data.delimiter='' must be one character"),
    ('"', ".", "data.delimiter='\"' cannot be a quote, a line break or a control character"),
    ("\n", ".", "data.delimiter='\\n' cannot be a quote, a line break"),
    (".", ",", "data.delimiter='.' must be an ASCII character that is no part of a number"),
    ("e", ".", "data.delimiter='e' must be an ASCII character that is no part of a number"),
    ("§", ".", "data.delimiter='§' must be an ASCII character"),
    (";", ";", "data.decimal=';' must be '.' or ','"),
    (";", 1, "data.decimal=1 must be '.' or ','"),
]  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize(("delimiter", "decimal", "message"), NONSENSE)
def test_nonsense_dialects_are_refused_in_one_line(tmp_path: Path, delimiter, decimal, message):
    with pytest.raises(DataError) as e:
        load_csv(write(tmp_path, table()), "y", delimiter=delimiter, decimal=decimal)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.unit
@pytest.mark.parametrize(("delimiter", "decimal", "message"), NONSENSE[:4] + NONSENSE[-2:])
def test_nonsense_dialects_are_refused_before_the_data_is_read(
    make_cfg, delimiter, decimal, message
):
    """By the setting checks: a missing file is not what they report."""
    quoted = [f"data.delimiter={json.dumps(delimiter)}", f"data.decimal={json.dumps(decimal)}"]
    with pytest.raises(ConfigError) as e:
        train(make_cfg("data.path=/no/such.csv", *quoted))
    assert str(e.value).startswith(message)


@pytest.mark.unit
def test_the_command_line_takes_delimiters_as_the_shell_passes_them():
    # bash turns data.delimiter=';' into data.delimiter=; which Hydra's grammar refuses
    assert quote_paths(["data.delimiter=;", "data.decimal=,", "data.delimiter=\\t"]) == [
        "data.delimiter=';'",
        "data.decimal=','",
        "data.delimiter='\\t'",
    ]
    assert quote_paths(["data.delimiter=';'", "data.delimiter=null"]) == [
        "data.delimiter=';'",
        "data.delimiter=null",
    ]


@pytest.mark.unit
def test_jobs_from_before_the_dialect_settings_resume_and_report_alike():
    """A job recorded without data.delimiter and data.decimal read its file as ',' and '.'."""
    old = {"data": {"path": "a.csv", "target": "y"}, "seed": 0}
    new = {"data": {**old["data"], "delimiter": ",", "decimal": "."}, "seed": 0}
    eu = {"data": {**old["data"], "delimiter": ";", "decimal": ","}, "seed": 0}
    assert training_settings(old) == training_settings(new) != training_settings(eu)
    assert settings_of(old) == settings_of(new) == settings_of(eu)  # the data set's naming


# -- fast and exact paths agree on any dialect, with any text in unused columns ---------------
NUMERIC = ("a", "b", "y")
TEXT = st.text(string.ascii_letters + " .,/-+0123456789", max_size=6) | st.text(
    string.ascii_letters + ' .,;|\t"\r\n\x0b\x00é-+0123456789', max_size=6
)
NUMBER = st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr) | st.integers(
    -999, 999
).map(str)


@st.composite
def dialect_csv(draw) -> tuple[str, dict, list[str], object]:
    """(file text, dialect, features, expected): numeric columns a, b, y and text columns,
    with at most one oddity. expected: (x, y) that the file holds, None where it must be
    refused, ... where unquoted text breaks its rows up (the paths must still agree)."""
    delimiter = draw(st.sampled_from([",", ";", "\t", "|", " "]))
    decimal = draw(st.sampled_from([".", ","] if delimiter != "," else ["."]))
    names = draw(st.permutations([*NUMERIC, *[f"t{k}" for k in range(draw(st.integers(1, 2)))]]))
    features = draw(st.sampled_from([["a", "b"], ["b"], ["b", "a"]]))
    rows, values, intact, quoting = [], [], True, draw(st.booleans())
    for _ in range(draw(st.integers(2, 6))):
        row = {n: draw(NUMBER) if n in NUMERIC else draw(TEXT) for n in names}
        values.append([float(row[n]) for n in NUMERIC])
        for n in names:
            if n in NUMERIC:
                row[n] = row[n].replace(".", decimal)
            elif quoting and draw(st.booleans()):
                row[n] = '"' + row[n].replace('"', '""') + '"'
            else:
                intact &= not set(row[n]) & {delimiter, "\r", "\n", '"'}
        rows.append([row[n] for n in names])
    oddity = draw(st.sampled_from([None, None, "short", "long", "bad number", "other decimal"]))
    i = draw(st.integers(0, len(rows) - 1))
    if oddity == "short":
        rows[i] = rows[i][:-1]
    elif oddity == "long":
        rows[i] = [*rows[i], "0"]
    elif oddity == "bad number":
        rows[i][names.index("a")] = draw(st.sampled_from(["", "x", "nan", "1e999", "\x0b1"]))
    elif oddity == "other decimal":
        rows[i][names.index("b")] = "1" + ("," if decimal == "." else ".") + "5"
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join([delimiter.join(names), *(delimiter.join(r) for r in rows)]) + eol
    table = np.array(values)
    x = table[:, [NUMERIC.index(f) for f in features]]
    if not intact:
        expected = ...
    elif oddity in ("short", "long", "other decimal") or (oddity and "a" in features):
        expected = None
    elif any((column == column[0]).all() for column in x.T):
        expected = None  # a constant feature
    else:
        expected = (x, table[:, 2])
    return text, {"delimiter": delimiter, "decimal": decimal}, features, expected


def outcome(path: Path, load, *args, **kwargs) -> object:
    try:
        t = load(path, *args, **kwargs)
    except DataError as e:
        return str(e)
    return t.x.tobytes(), t.y.tobytes(), t.features


@pytest.mark.unit
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dialect_csv())
def test_fast_and_exact_paths_agree_on_dialects_and_unused_text(case):
    """Both load exactly what the file holds, or refuse it with the same message."""
    text, dialect, features, expected = case
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d), text)
        got = outcome(path, load_csv, "y", features, **dialect)
        assert got == outcome(path, exact_only, "y", features, **dialect)
    if expected is None:
        assert isinstance(got, str)
    elif expected is not ...:
        x, y = expected
        assert got == (x.tobytes(), y.tobytes(), tuple(features))


# -- training and evaluating such a file ------------------------------------------------------
@pytest.mark.unit
def test_train_and_evaluate_a_european_csv_with_a_text_column_left_out(make_cfg, tmp_path: Path):
    eu = write(tmp_path, table(";", ","), "eu.csv")
    common = [f"data.path={eu}", "data.target=y", "data.features=[a,b]", "data.test_split=0.25"]
    with pytest.raises(DataError) as refused:
        train(make_cfg(*common, *FAST, output_dir=tmp_path / "refused"))
    assert str(refused.value) == (
        f"{eu}: the header is one column, 'a;side;b;y', and looks ';'-separated; "
        "set data.delimiter=';' and data.decimal=','"
    )
    job = tmp_path / "job"
    # as bash passes data.delimiter=';' data.decimal=',', quoted as the command line does
    dialect = quote_paths(["data.delimiter=;", "data.decimal=,"])
    train(make_cfg(*common, *dialect, *FAST, output_dir=job))
    metrics = read_metrics(job)
    assert metrics["status"] == "ok" and np.isfinite(metrics["test/mae"])
    ckpt = job / "checkpoints" / "last.ckpt"
    # evaluate reads another CSV with the dialect the job trained with, or the one given
    on_eu = evaluate(ckpt, str(eu), tmp_path / "eval_eu")
    plain = write(tmp_path, table(), "plain.csv")
    on_plain = evaluate(ckpt, str(plain), tmp_path / "eval_plain", ",", ".")
    assert on_eu["rows"] == on_plain["rows"] == 12
    assert on_eu["mae"] == on_plain["mae"]
    predictions = [
        (tmp_path / d / "predictions.csv").read_text() for d in ("eval_eu", "eval_plain")
    ]
    assert predictions[0] == predictions[1]
    with pytest.raises(DataError, match="set data.delimiter=',' and data.decimal='.'"):
        evaluate(ckpt, str(plain), tmp_path / "eval_wrong")
    with pytest.raises(ConfigError, match="describe the CSV of data.path"):
        evaluate(ckpt, None, tmp_path / "eval_own", ";")
