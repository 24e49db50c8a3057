"""Where evaluate writes (a directory of its own each time, never an earlier one), what it says
when it cannot write (and what report says), and predicting on a CSV without the target."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from housing_reg.csvfile import BOSTON_CSV, DataError, load_csv
from housing_reg.evaluate import evaluate
from housing_reg.report import main as report_main
from housing_reg.settings import ConfigError
from housing_reg.train import train

from conftest import compose_cfg, read_metrics, run_cli

CKPT = Path("checkpoints") / "last.ckpt"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A one-epoch job directory, as the CLI leaves it (.hydra/ included)."""
    out = tmp_path_factory.mktemp("job")
    cfg = compose_cfg(
        "trainer.max_epochs=1", "data.batch_size=64", "callbacks.progress_bar.refresh_rate=0",
        output_dir=out,
    )  # fmt: skip
    train(cfg)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out


def copy_job(job: Path, to: Path) -> Path:
    """A job of the test's own, so that evaluations of other tests do not show up in it."""
    copy = shutil.copytree(job, to, ignore=shutil.ignore_patterns("evaluate"))
    return Path(copy).resolve()  # as evaluate names it in its output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def boston_without(column: str, to: Path) -> Path:
    lines = BOSTON_CSV.read_text().splitlines()
    drop = lines[0].split(",").index(column)
    to.write_text(
        "".join(
            ",".join(c for i, c in enumerate(line.split(",")) if i != drop) + "\n" for line in lines
        )
    )
    return to


@pytest.mark.unit
def test_each_evaluation_in_a_job_gets_a_directory_of_its_own(job: Path, tmp_path: Path):
    """The same evaluation twice, one on a CSV named test.csv, one of another checkpoint of
    the job: four directories under JOB/evaluate, none rewritten by a later evaluation."""
    job = copy_job(job, tmp_path / "job")
    ckpt = job / CKPT
    shutil.copy(ckpt, job / "checkpoints" / "best.ckpt")
    shutil.copy(BOSTON_CSV, tmp_path / "test.csv")
    first = evaluate(ckpt)
    before = snapshot(Path(first["output_dir"]))
    outs = [
        evaluate(ckpt)["output_dir"],
        evaluate(ckpt, str(tmp_path / "test.csv"))["output_dir"],
        evaluate(job / "checkpoints" / "best.ckpt")["output_dir"],
    ]
    evaluated = job / "evaluate"
    assert [first["output_dir"], *outs] == [
        str(evaluated / "last_on_test_split"),
        str(evaluated / "last_on_test_split_2"),
        str(evaluated / "last_on_test.csv"),
        str(evaluated / "best_on_test_split"),
    ]
    assert snapshot(Path(first["output_dir"])) == before
    for out in outs:
        assert json.loads((Path(out) / "metrics.json").read_text())["status"] == "ok"
    assert sorted(p.name for p in evaluated.iterdir()) == sorted(
        Path(o).name for o in [first["output_dir"], *outs]
    )


@pytest.mark.unit
@pytest.mark.parametrize("where", ["copied", "checkpoints_folder"])
def test_a_checkpoint_outside_a_job_evaluates_under_outputs(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
):
    """A copy in some folder (/tmp/x.ckpt), or in a folder named checkpoints that no job
    holds: its results go to outputs/evaluate/<date>/ of the working directory, as a run's
    go to outputs/<date>/, never beside the checkpoint's folder."""
    folder = tmp_path / "elsewhere" / ("x" if where == "copied" else "checkpoints")
    folder.mkdir(parents=True)
    ckpt = Path(shutil.copy(job / CKPT, folder / "x.ckpt"))
    cwd = (tmp_path / "cwd").resolve()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    m = [evaluate(ckpt), evaluate(ckpt)]
    outs = [Path(r["output_dir"]) for r in m]
    day = cwd / "outputs" / "evaluate"
    assert [o.parent.parent for o in outs] == [day, day]
    assert outs[0].parent.name[:4].isdigit() and outs[0].name.endswith("_x_on_test_split")
    assert outs[0] != outs[1]
    assert snapshot(tmp_path / "elsewhere") == {
        str(Path(folder.name) / "x.ckpt"): ckpt.read_bytes()
    }
    assert m[0]["mae"] == read_metrics(job)["test/mae"]


@pytest.mark.unit
def test_an_output_dir_that_holds_results_is_refused_and_kept(job: Path, tmp_path: Path):
    ckpt = job / CKPT
    given = tmp_path / "given"
    evaluate(ckpt, output_dir=given)
    job_copy = copy_job(job, tmp_path / "job")
    kept = {given: snapshot(given), job_copy: snapshot(job_copy)}
    for folder in kept:  # an earlier evaluation, a job directory
        refused = f"output_dir={re.escape(str(folder))} already holds predictions.csv"
        with pytest.raises(ConfigError, match=f"{refused}.*never overwritten"):
            evaluate(ckpt, str(BOSTON_CSV), output_dir=folder)
    assert {f: snapshot(f) for f in kept} == kept
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate(ckpt, output_dir=empty)["output_dir"] == str(empty)  # nothing to replace


@pytest.mark.cli
def test_unwritable_output_is_one_line(job: Path, tmp_path: Path):
    """Where evaluate cannot write (here a file stands where its directory would go): one
    line naming the directory and the way out, exit 1, nothing left behind. Through the
    command line, with the job in a directory named as a sweep names them ('=' in its path,
    which the command line quotes for Hydra)."""
    job_copy = copy_job(job, tmp_path / "0_head=none")
    (job_copy / "evaluate").write_text("")  # JOB/evaluate cannot be made
    proc = run_cli(
        f"ckpt_path={job_copy / CKPT}", cwd=tmp_path, module="housing_reg.evaluate", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write to {job_copy / 'evaluate'} (not a directory)")
    assert line.endswith("pass output_dir=DIR to write elsewhere"), line
    assert (job_copy / "evaluate").is_file()


@pytest.mark.unit
def test_an_output_dir_that_cannot_be_made_is_one_line(job: Path, tmp_path: Path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        evaluate(job / CKPT, output_dir="afile/e")
    line = str(e.value)
    assert line.startswith("cannot write to afile/e (Not a directory)") and "\n" not in line
    assert line.endswith("choose another output_dir")
    assert (tmp_path / "afile").read_text() == ""


def small_disk() -> None:
    """In the child: files end at 4 kB, as on a disk that fills (EFBIG, not a signal)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))


@pytest.mark.cli
def test_a_disk_that_fills_leaves_no_half_an_evaluation(job: Path, tmp_path: Path):
    """predictions.csv for 506 rows outgrows the limit: one line, and what was written is
    gone: the new directory, or, in a given empty one, every file (it can be used again)."""
    job_copy = copy_job(job, tmp_path / "job")
    given = tmp_path / "given"
    given.mkdir()
    procs = [  # both at once: each spends seconds importing
        subprocess.Popen(
            [sys.executable, "-m", "housing_reg.evaluate", f"ckpt_path={job_copy / CKPT}"]
            + [f"data.path={BOSTON_CSV}", *extra],
            preexec_fn=small_disk,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in ([], [f"output_dir={given}"])
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1 and "Traceback" not in err, err
        assert "(File too large); " in err.strip().splitlines()[-1]
    assert list((job_copy / "evaluate").iterdir()) == [] and list(given.iterdir()) == []
    assert evaluate(job_copy / CKPT, output_dir=given)["output_dir"] == str(given)


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """The directory read-only while the block runs, writable again after it."""
    directory.chmod(0o555)
    try:
        yield
    finally:
        directory.chmod(0o755)


@pytest.mark.cli
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_job_directory_is_one_line(job: Path, tmp_path: Path):
    job_copy = copy_job(job, tmp_path / "job")
    with read_only(job_copy):
        proc = run_cli(
            f"ckpt_path={job_copy / CKPT}", cwd=tmp_path, module="housing_reg.evaluate", check=False
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert last_line(proc) == (
        f"error: cannot write to {job_copy / 'evaluate'} (Permission denied); "
        "pass output_dir=DIR to write elsewhere"
    )


@pytest.mark.unit
def test_report_that_cannot_write_is_one_line(job: Path, tmp_path: Path, monkeypatch, capsys):
    """Into the sweep directory itself (here summary.csv cannot be opened, as in a read-only
    sweep) and into --out: one line naming the directory and the way out, exit status 2
    (report.main, what `python -m housing_reg.report` runs)."""
    sweep = tmp_path / "sweep"
    copy_job(job, sweep / "0_head=none")
    (sweep / "summary.csv").mkdir()
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)
    cases = [
        (
            [str(sweep)],
            f"cannot write to {sweep} (",
            "pass --out DIR to write the report elsewhere",
        ),
        ([str(sweep), "--out", "afile/r"], "cannot write to afile/r (", "choose another --out"),
    ]
    for args, what, way_out in cases:
        assert report_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {what}") and err.endswith(f"{way_out}\n")
        assert len(err.splitlines()) == 1
    assert not (sweep / "summary.md").exists()


@pytest.mark.cli
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_into_a_read_only_sweep_is_one_line(job: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    copy_job(job, sweep / "0_head=none")
    with read_only(sweep):
        proc = run_cli(str(sweep), cwd=tmp_path, module="housing_reg.report", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last_line(proc) == (
        f"error: cannot write to {sweep} (Permission denied); "
        "pass --out DIR to write the report elsewhere"
    )


@pytest.mark.cli
def test_a_csv_without_the_target_is_predicted_row_by_row(job: Path, tmp_path: Path):
    """The predict-only use of a trained model: every row's prediction, the same as with the
    target column there; no truth, no MAE, and the output says so."""
    data = boston_without("MEDV", tmp_path / "houses.csv")
    proc = run_cli(
        f"ckpt_path={job / CKPT}",
        f"data.path={data}",
        "output_dir=pred",
        cwd=tmp_path,
        module="housing_reg.evaluate",
    )
    assert f"{data}: predictions only (no MEDV column, no MAE) for 506 rows" in proc.stdout
    assert f"wrote {tmp_path / 'pred'}/predictions.csv" in proc.stdout
    with_target = evaluate(job / CKPT, str(BOSTON_CSV), tmp_path / "with_target")
    pred = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    full = (tmp_path / "with_target" / "predictions.csv").read_text().splitlines()
    assert pred[0] == "y_pred" and pred[1:] == [line.split(",")[1] for line in full[1:]]
    m = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert m["rows"] == 506 and m["target"] == "MEDV" and m["predictions_only"] is True
    assert not any("mae" in k or "mse" in k for k in m)
    assert with_target["predictions_only"] is False and with_target["mae"] > 0


@pytest.mark.unit
def test_load_csv_reads_a_file_without_its_target_only_when_asked(tmp_path: Path):
    data = boston_without("MEDV", tmp_path / "houses.csv")
    with pytest.raises(DataError, match="target column 'MEDV' not found; set data.target"):
        load_csv(data, "MEDV")
    table = load_csv(data, "MEDV", need_target=False)
    assert table.y is None and table.features == tuple(load_csv(None).features)
    np.testing.assert_array_equal(table.x, load_csv(None).x)
    with_target = load_csv(None, "MEDV", need_target=False)  # there: read as always
    np.testing.assert_array_equal(with_target.y, load_csv(None).y)
