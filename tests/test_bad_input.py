"""Bad data and bad settings: one clear line before training starts, never a traceback."""

from __future__ import annotations

import csv
import io
import math
import re
import string
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from housing_reg import csvfile
from housing_reg.argv import check_choices, check_output_dirs
from housing_reg.csvfile import DataError, load_csv
from housing_reg.jobdir import RecordError
from housing_reg.settings import USER_ERRORS, ConfigError
from housing_reg.train import train

from conftest import run_concurrently

HEADER = "a,b,c,y"
ROWS = [f"{i},{(i * 7) % 11},{i * i / 10},{2 * i + 1}" for i in range(20)]


def csv_text(rows: list[str] = ROWS, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n"


def with_column(col: int, value: str) -> str:
    """The small CSV with every cell of one column set to value."""
    rows = [r.split(",") for r in ROWS]
    return csv_text([",".join([*c[:col], value, *c[col + 1 :]]) for c in rows])


def with_cell(line: int, col: int, value: str) -> str:
    """The small CSV with one cell replaced; `line` counts the header as line 1."""
    rows = list(ROWS)
    cells = rows[line - 2].split(",")
    cells[col] = value
    rows[line - 2] = ",".join(cells)
    return csv_text(rows)


# name: (file content, or None for no file; overrides; fragments the one-line message must hold)
CSV_CASES = {
    "missing file": (None, [], ["data.csv: file not found", "set data.path"]),
    "empty file": ("", [], ["file is empty", "header row"]),
    "only blank lines": ("\n  \n\n", [], ["file is empty"]),
    "no header": (csv_text(ROWS[1:], ROWS[0]), [], ["is numeric, not a header", "add a header"]),
    "target absent": (csv_text(), ["data.target=price"], ["'price' not found", "a, b, c, y"]),
    "feature absent": (csv_text(), ["data.features=[a,d]"], ["column(s) d not found"]),
    "non-numeric cell": (with_cell(5, 1, "abc"), [], ["line 5, column 'b'", "'abc' is not a n"]),
    "empty cell": (with_cell(4, 2, ""), [], ["line 4, column 'c'", "empty cell", "fill it in"]),
    "NaN cell": (with_cell(9, 0, "NaN"), [], ["line 9, column 'a'", "not a finite number"]),
    "inf cell": (with_cell(3, 3, "-inf"), [], ["line 3, column 'y'", "not a finite number"]),
    "overflowing cell": (with_cell(3, 1, "1e999"), [], ["line 3, column 'b'", "not a finite"]),
    "ragged row": (
        csv_text([*ROWS[:5], "1,2", *ROWS[5:]]),
        [],
        ["line 7: 2 fields", "header has 4", "as long as the header"],
    ),
    "line numbers count blank lines": (
        csv_text([*ROWS[:3], "", "1,x,3,4", *ROWS[3:]]),
        [],
        ["line 6, column 'b'"],
    ),
    "duplicate column": (csv_text(header="a,b,a,y"), [], ["duplicate column names"]),
    "header only": ("a,b,c,y\n", [], ["header but no data rows"]),
    "too few rows": (csv_text(ROWS[:2]), [], ["2 rows leave 1 to train on", "supply more rows"]),
    "too few rows for the folds": (
        csv_text(ROWS[:5]),
        ["data.num_folds=5", "data.fold=4"],
        ["0 to validate", "data.num_folds"],
    ),
    "constant feature": (
        with_column(1, "3"),
        [],
        ["column(s) b are constant", "data.features=[...]"],
    ),
    "constant target": (
        with_column(3, "5"),
        [],
        ["target 'y' is constant", "check data.target"],
    ),
    "invalid UTF-8": (
        csv_text().encode() + b"1,2,\xff,4\n",
        [],
        ["cannot read file", "readable UTF-8 CSV"],
    ),
    "digit separator": (with_cell(6, 2, "1_000"), [], ["line 6, column 'c'", "'1_000' is not a"]),
    "non-ASCII digits": (with_cell(7, 0, "\u0661\u0662").encode(), [], ["line 7, column 'a'"]),
    "feature beyond float32": (
        csv_text([f"{i},{(i * 7) % 11}e307,{i * i / 10},{2 * i + 1}" for i in range(20)]),
        [],
        ["values up to 1e+308 cannot be standardized in float32", "rescale that column"],
    ),
    "target squared beyond float32": (
        csv_text([f"{i},{(i * 7) % 11},{i * i / 10},{2 * i + 1}e29" for i in range(20)]),
        [],
        ["overflow float32 when squared", "set data.target_scaling=standard"],
    ),
}

# name: (overrides on the bundled data; fragments of the message)
SETTING_CASES = {
    "max_epochs 0": (["trainer.max_epochs=0"], ["trainer.max_epochs=0 must be >= 1"]),
    "max_epochs not whole": (["trainer.max_epochs=2.5"], ["trainer.max_epochs=2.5", "integer"]),
    "batch_size 0": (["data.batch_size=0"], ["data.batch_size=0 must be >= 1"]),
    "batch_size text": (["data.batch_size=abc"], ["data.batch_size='abc' must be an integer"]),
    "batch_size > train rows": (["data.batch_size=405"], ["data.batch_size=405", "404 training"]),
    "lr 0": (["optim.lr=0"], ["optim.lr=0 must be > 0"]),
    "lr negative": (["optim=adam", "optim.lr=-0.001"], ["optim.lr=-0.001 must be > 0"]),
    "lr text": (["optim.lr=fast"], ["optim.lr='fast' must be a number"]),
    "fold = num_folds": (["data.num_folds=5", "data.fold=5"], ["data.fold=5 must be in [0, 5)"]),
    "fold negative": (["data.num_folds=5", "data.fold=-1"], ["data.fold=-1 must be in [0, 5)"]),
    "fold without folds": (["data.fold=2"], ["data.fold=2", "data.num_folds >= 3"]),
    "one fold": (["data.num_folds=1"], ["data.num_folds=1 must be 0", ">= 2"]),
    "test_split 0": (["data.test_split=0"], ["data.test_split=0", "between 0 and 1"]),
    "test_split 1": (["data.test_split=1.0"], ["data.test_split=1.0", "between 0 and 1"]),
    "test_split 1.5": (["data.test_split=1.5"], ["between 0 and 1"]),
    "val_fraction 1": (["data.val_fraction=1.0"], ["data.val_fraction=1.0 must be in [0, 1)"]),
    "seed negative": (["seed=-1"], ["seed=-1 must be in [0, 2**31)"]),
    "replicas 0": (["model.replicas=0"], ["model.replicas=0 must be >= 1"]),
    "hidden empty": (["model.hidden=[]"], ["model.hidden=[]", "model.hidden=[64,64]"]),
    "target_scaling unknown": (["data.target_scaling=log"], ["'log' is unknown", "minmax"]),
    "checkpoint_every negative": (["checkpoint_every=-1"], ["checkpoint_every=-1 must be >= 0"]),
    "ckpt_path missing": (["ckpt_path=/no/such.ckpt"], ["ckpt_path=/no/such.ckpt: no such file"]),
    "data.path empty": (["data.path=''"], ["data.path is empty", "null for the bundled data"]),
    "lr nan": (["optim.lr=nan"], ["optim.lr=nan must be a finite number"]),
    "hidden not whole": (["model.hidden=[64.5]"], ["model.hidden=[64.5] must be a non-empty list"]),
    "optim key unknown": (
        ["+optim.lrr=0.1"],
        ["optim.lrr: torch.optim.RMSprop has no such"],
    ),
    "top-level key unknown": (["+lrr=0.1"], ["lrr: not a setting of housing_reg"]),
}


def assert_nothing_trained(job: Path) -> None:
    assert not list(job.rglob("events.out.tfevents*")), "a logger was started"
    assert not list(job.rglob("*.ckpt")), "a checkpoint was written"


@pytest.mark.unit
@pytest.mark.parametrize("case", CSV_CASES)
def test_bad_csv_is_one_clear_line(case: str, make_cfg, tmp_path: Path) -> None:
    content, overrides, fragments = CSV_CASES[case]
    path = tmp_path / "data.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    cfg = make_cfg(f"data.path={path}", "data.target=y", "trainer.max_epochs=1", *overrides)
    with pytest.raises(DataError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg
    assert_nothing_trained(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize("case", SETTING_CASES)
def test_bad_setting_is_one_clear_line(case: str, make_cfg, tmp_path: Path) -> None:
    overrides, fragments = SETTING_CASES[case]
    with pytest.raises(USER_ERRORS) as e:
        train(make_cfg("trainer.max_epochs=1", *overrides))
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg
    assert_nothing_trained(tmp_path)


@pytest.mark.unit
def test_directory_as_data_path(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read file"):
        train(make_cfg(f"data.path={tmp_path}"))


@pytest.mark.unit
def test_byte_order_mark_and_quotes_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + csv_text(header='"a", b ,c,y').encode())
    table = load_csv(path, target="y")
    assert table.features == ("a", "b", "c")
    assert table.x.shape == (20, 3)


@pytest.mark.unit
def test_unknown_group_options_list_the_valid_ones() -> None:
    cases = {
        ("head=softsign",): "head=softsign is not an available option; choose one of: leaky_relu, "
        "none, relu",
        ("optim=adamw",): "optim=adamw is not an available option; choose one of: adam, rmsprop",
        ("-m", "head=relu,sigmoid,bogus"): "head=bogus is not an available option",
        ("hydra/launcher=nope",): "hydra/launcher=nope is not an available option; choose one "
        "of: basic",
        # null is no option (Hydra's own error is a traceback); the logger may be removed
        ("logger=null",): "logger=null: choose one of: csv, many_loggers, mlflow, tensorboard; "
        "to train without it, remove it: '~logger'",
        ("-m", "head=relu,null"): "head=null: choose one of: leaky_relu, none, relu",
    }
    for args, message in cases.items():
        with pytest.raises(ConfigError) as e:
            check_choices(list(args))
        assert message in str(e.value)
        assert "\n" not in str(e.value)
    # valid choices, sweeps, globs, plain keys and additions all pass
    check_choices(["-m", "head=relu,tanh", "optim=adam", "optim.lr=1e-2", "+foo=1", "head=glob(*)"])


@pytest.mark.unit
def test_the_checks_the_command_line_makes_first_are_one_line(tmp_path: Path) -> None:
    """Before Hydra composes anything, `python -m housing_reg.train` checks group choices and
    that the output directory can be made (cli.start): each refusal one line."""
    for args, message in [
        (["hydra.run.dir=/proc/x"], "hydra.run.dir=/proc/x: cannot create that directory"),
        (["-m", "hydra.sweep.dir=/proc/x"], "hydra.sweep.dir=/proc/x: cannot create that dir"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_output_dirs(args)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    check_output_dirs([f"hydra.run.dir={tmp_path / 'new' / 'job'}"])  # made, as Hydra needs
    assert (tmp_path / "new" / "job").is_dir()


@pytest.mark.unit
def test_a_file_that_is_no_checkpoint_is_one_line(make_cfg, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    job = tmp_path / "job"
    with pytest.raises(RecordError) as e:
        train(make_cfg(f"ckpt_path={text}", output_dir=job))
    assert str(e.value).startswith(f"{text}: not a housing_reg checkpoint")
    assert "\n" not in str(e.value)
    assert_nothing_trained(tmp_path)


@pytest.mark.cli
def test_cli_errors_are_one_line_and_exit_nonzero(tmp_path: Path) -> None:
    """One refusal of each kind through the real command line: a group choice (checked
    before Hydra), a bad file (DataError, recorded in the job directory) and a bad setting
    (ConfigError). Each prints one line and exits 1; the other refusals are the same lines
    raised in-process (SETTING_CASES, CSV_CASES, test_unknown_group_options_...). The file's
    path holds '=', as a job directory's does: the command line quotes it for Hydra."""
    bad = tmp_path / "0_head=relu" / "bad.csv"  # '=' in a path, as typed: quoted for Hydra
    bad.parent.mkdir()
    bad.write_text(with_cell(5, 1, "abc"))
    train_cmd = ["housing_reg.train", "callbacks.progress_bar.refresh_rate=0"]
    cases = [
        (
            ["-m", "hydra/launcher=nope", "head=relu"],
            "error: hydra/launcher=nope is not an available option; choose one of: basic",
            None,
        ),
        (
            [f"data.path={bad}", "data.target=y", f"hydra.run.dir={tmp_path / 'job'}"],
            f"error: {bad}, line 5, column 'b': 'abc' is not a number",
            tmp_path / "job",
        ),
        (
            ["optim.lr=nan", f"hydra.run.dir={tmp_path / 'nan'}"],
            "error: optim.lr=nan must be a finite number",
            tmp_path / "nan",
        ),
    ]
    results = run_concurrently([train_cmd + args for args, _, _ in cases], tmp_path)
    for (args, message, job), proc in zip(cases, results, strict=True):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1, (args, proc.stderr)
        assert lines and lines[0].startswith(message), (args, proc.stderr)
        assert len(lines) == 1, (args, proc.stderr)
        if job is not None:  # the job directory records the failure, and nothing trained
            assert '"status": "failed"' in (job / "failure.json").read_text()
            assert_nothing_trained(job)


# -- property: any file is either loaded exactly or refused with a DataError ---------------
NAME = st.text(string.ascii_letters + "_", min_size=1, max_size=6).filter(
    lambda s: s.lower() not in ("nan", "inf", "infinity")
)
DEFECTS = [
    None,
    None,
    None,
    "empty",
    "nan",
    "inf",
    "text",
    "short row",
    "long row",
    "dup header",
    "no target",
    "no rows",
    "numeric header",
    "bad utf-8",
    "constant",
]


@st.composite
def csv_with_defect(draw) -> tuple[bytes, str, np.ndarray, str | None]:
    ncols = draw(st.integers(2, 5))
    header = draw(st.lists(NAME, min_size=ncols, max_size=ncols, unique=True))
    finite = st.floats(allow_nan=False, allow_infinity=False)
    values = np.array(
        draw(st.lists(st.lists(finite, min_size=ncols, max_size=ncols), min_size=1, max_size=6))
    )
    cells = [
        [draw(st.sampled_from(["{!r}", " {!r} ", '"{!r}"'])).format(v) for v in row]
        for row in values.tolist()
    ]
    defect = draw(st.sampled_from(DEFECTS))
    i, j = draw(st.integers(0, len(cells) - 1)), draw(st.integers(0, ncols - 1))
    target = header[-1]
    if defect in ("empty", "nan", "inf", "text"):
        cells[i][j] = {"empty": " ", "nan": "nan", "inf": "-Infinity", "text": "1.2.3"}[defect]
    elif defect == "short row":
        cells[i] = cells[i][:-1]
    elif defect == "long row":
        cells[i] = [*cells[i], "0"]
    elif defect == "dup header":
        header = [header[0], *header[:-1]]
        target = header[-1]
    elif defect == "no target":
        target = "missing_target"
    elif defect == "no rows":
        cells = []
    elif defect == "numeric header":
        header = [str(k) for k in range(ncols)]
        target = header[-1]
    elif defect == "constant":
        for row in cells:
            row[0] = "7"
    lines = [",".join(header)] + [",".join(row) for row in cells]
    data = ("\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))).encode()
    if defect == "bad utf-8":
        data += b"\n\xc3\x28"
    if defect is None and any(np.all(col == col[0]) for col in values[:, :-1].T):
        defect = "constant"  # drawn that way: one row, or equal values in a feature column
    return data, target, values, defect


@pytest.mark.unit
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=csv_with_defect())
def test_loader_loads_exactly_or_refuses(case) -> None:
    data, target, values, defect = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.csv"
        path.write_bytes(data)
        if defect is not None:
            with pytest.raises(DataError):
                load_csv(path, target)
            return
        table = load_csv(path, target)
    np.testing.assert_array_equal(table.x, values[:, :-1])
    np.testing.assert_array_equal(table.y, values[:, -1])


FUZZ_ALPHABET = '0123456789.,,,-+eE \n\r\t";abnifNA_\x00\u00e9\ufeff'


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(st.binary(max_size=200), st.text(FUZZ_ALPHABET, max_size=200).map(str.encode)),
    target=st.sampled_from(["a", "b", "ab"]),
)
def test_loader_never_crashes(data: bytes, target: str) -> None:
    """Arbitrary bytes: a Table that makes sense, or a DataError; nothing else escapes."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.csv"
        path.write_bytes(data)
        try:
            table = load_csv(path, target)
        except DataError as e:
            assert "\n" not in str(e)
            return
    assert table.x.shape == (len(table.y), len(table.features)) and len(table.y) >= 1
    assert target not in table.features
    assert all(math.isfinite(v) for v in table.x.ravel()) and np.isfinite(table.y).all()


# -- the fast path (np.loadtxt) and the exact path (csv module, cell by cell) agree ------------
def load_exactly(path: Path, target: str) -> object:
    """load_csv's outcome with its fast path off: every row through the csv module."""
    with mock.patch.object(csvfile, "_fast_body", lambda *args: None):
        return outcome(path, target)


def outcome(path: Path, target: str) -> object:
    try:
        table = load_csv(path, target)
    except DataError as e:
        return str(e)
    return table.x.shape, table.x.tobytes(), table.y.tobytes(), table.features


A_NUMERAL = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers().map(str),
    st.from_regex(
        r"[ \t]?[+-]?([0-9]{1,3}\.?[0-9]{0,3}|\.[0-9]{1,3})([eE][+-]?[0-9]{1,3})?[ \t]?",
        fullmatch=True,
    ),
)
ODD_CELL = st.one_of(
    st.text(' 0123456789.+-eE\t"_,\r\n', max_size=5),  # what a fast path might take wrongly
    st.sampled_from(["", " ", '"1"', '" 2.5"', "1e400", "-0", "1_0", "inf", "\u0661", "\u00a01"]),
)
ODD_BREAK = st.sampled_from(["\r", "\n\n", "\n \n", "\n,,\n", "\n\t , \n", "\r\r\n", "\n\r"])


@st.composite
def numeric_csv(draw) -> str:
    """A CSV of numerals (header a,b,y) with at most one oddity in it."""
    rows = draw(st.lists(st.lists(A_NUMERAL, min_size=3, max_size=3), min_size=2, max_size=6))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    breaks = [eol] * len(rows)
    i = draw(st.integers(0, len(rows) - 1))
    oddity = draw(st.sampled_from([None, "cell", "cell", "break", "row", "end"]))
    if oddity == "cell":
        rows[i][draw(st.integers(0, 2))] = draw(ODD_CELL)
    elif oddity == "break":
        breaks[i] = draw(ODD_BREAK)
    elif oddity == "row":
        rows[i] = draw(st.lists(A_NUMERAL, max_size=4).filter(lambda r: len(r) != 3))
    end = draw(ODD_BREAK) if oddity == "end" else draw(st.sampled_from(["", eol]))
    header = draw(st.sampled_from(["a,b,y", '"a", b ,y', "\ufeffa,b,y", "\n\na,b,y", '"a\nb",b,y']))
    return header + "".join(b + ",".join(r) for b, r in zip(breaks, rows, strict=True)) + end


@pytest.mark.unit
@settings(max_examples=400, deadline=None)
@given(text=numeric_csv())
def test_fast_and_exact_paths_agree(text: str):
    """Whatever the fast path takes, it takes as the csv module and NUMERAL would."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.csv"
        path.write_bytes(text.encode())
        assert outcome(path, "y") == load_exactly(path, "y")


@pytest.mark.unit
@settings(max_examples=1000, deadline=None)
@given(cell=st.text("0123456789+-.eE \t", max_size=8) | A_NUMERAL)
def test_of_numeral_characters_float_and_loadtxt_take_exactly_the_numerals(cell: str):
    """What both paths rest on: no string of these characters is a number to float() or to
    np.loadtxt unless it is a NUMERAL, and both read a NUMERAL alike."""
    try:
        by_float = float(cell)
    except ValueError:
        by_float = None
    try:
        row = np.loadtxt(io.BytesIO(f"{cell},1\n".encode()), delimiter=",", comments=None)
        by_loadtxt = float(row[0])
    except ValueError:
        by_loadtxt = None
    is_numeral = re.fullmatch(csvfile.NUMERAL, cell) is not None
    assert (by_float is not None) == (by_loadtxt is not None) == is_numeral
    if is_numeral:
        assert np.float64(by_float).tobytes() == np.float64(by_loadtxt).tobytes()


@pytest.mark.unit
def test_plain_csv_takes_the_fast_path_and_the_rest_the_exact_one(tmp_path: Path):
    plain = tmp_path / "plain.csv"
    plain.write_text(csv_text().replace("\n", "\r\n"))
    with mock.patch.object(csvfile, "_exact_body", side_effect=AssertionError("exact path")):
        table = load_csv(plain, "y")
        load_csv(None)
    # Quoted numbers, a row of blanks, old Mac line breaks, a BOM: the csv module's business.
    unusual = {
        "quoted.csv": csv_text([",".join(f'"{c}"' for c in r.split(",")) for r in ROWS]),
        "blank row.csv": csv_text([*ROWS[:5], " , ,\t, ", *ROWS[5:]]),
        "old mac.csv": csv_text().replace("\n", "\r"),
        "bom.csv": "\ufeff" + csv_text(),
    }
    for name, text in unusual.items():
        path = tmp_path / name
        path.write_bytes(text.encode())
        other = load_csv(path, "y")
        np.testing.assert_array_equal(other.x, table.x)
        np.testing.assert_array_equal(other.y, table.y)


@pytest.mark.unit
def test_fields_past_the_csv_modules_size_limit_are_refused_on_both_paths(tmp_path: Path):
    limit = csv.field_size_limit(40)
    try:
        long = tmp_path / "long.csv"  # a 51-digit numeral on line 5: a float, but no CSV field
        long.write_text(csv_text([*ROWS[:3], "1,2," + "0" * 50 + "1,4", *ROWS[3:]]))
        message = outcome(long, "y")
        assert message == load_exactly(long, "y")
        assert (
            message
            == f"{long}, line 5: not a valid CSV (field larger than field limit (40)); fix the file"
        )
        wide = tmp_path / "wide.csv"  # lines past the limit, fields within it
        names = [f"x{k}" for k in range(15)] + ["y"]
        wide.write_text(csv_text([",".join([r] * 4) for r in ROWS], header=",".join(names)))
        assert max(map(len, wide.read_text().splitlines())) > 40
        assert outcome(wide, "y") == load_exactly(wide, "y")
        assert load_csv(wide, "y").x.shape == (20, 15)
    finally:
        csv.field_size_limit(limit)
    rng = np.random.default_rng(0)
    for _ in range(3000):  # against a plain count of the longest line
        raw = rng.choice(list(b"a\n" if rng.random() < 0.5 else b"aaaaaaaa\n"), rng.integers(120))
        raw, limit = bytes(raw.astype(np.uint8)), int(rng.integers(1, 40))
        lines = raw.split(b"\n")
        longest = max([len(line) + 1 for line in lines[:-1]] + [len(lines[-1])])
        assert csvfile._has_long_line(raw, 0, limit) == (longest > limit)
