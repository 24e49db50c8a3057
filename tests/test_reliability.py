"""Issue #18's cases that a first probe found unguarded: a finished result is never replaced
behind the user's back, nonsensical data settings and unquoted non-ASCII overrides get one line,
and resume refuses a checkpoint that has trained past trainer.max_epochs."""

from __future__ import annotations

import numpy as np

from housing_reg.report import read_runs

from conftest import FAST, read_metrics, run_cli

QUIET = FAST[1]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_a_second_run_with_other_settings_never_replaces_a_finished_job(tmp_path):
    run_cli(*FAST, "hydra.run.dir=job", cwd=tmp_path)
    first = (tmp_path / "job/metrics.json").read_text()
    events = sorted(p.name for p in (tmp_path / "job").glob("events.*"))
    proc = run_cli(
        *FAST, "head=relu", "optim.lr=0.01", "hydra.run.dir=job", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    line = last_line(proc)
    assert line.startswith(f"error: {tmp_path / 'job'} holds a finished job trained with other")
    assert "head.name: none there, relu here" in line and "hydra.run.dir=" in line
    assert (tmp_path / "job/metrics.json").read_text() == first  # untouched
    assert sorted(p.name for p in (tmp_path / "job").glob("events.*")) == events
    # The report labels the result with the settings it was trained with, though Hydra has
    # rewritten .hydra/config.yaml for the refused attempt.
    assert "relu" in (tmp_path / "job/.hydra/config.yaml").read_text()
    runs = read_runs(tmp_path / "job", tmp_path)
    assert runs.status == "ok" and runs.settings["head.name"] == "none"
    assert runs.settings["optim.lr"] == 0.001
    # The same settings again: refused too (it would put a second run beside the first in
    # TensorBoard); resume=true keeps the finished job as it is.
    proc = run_cli(*FAST, "hydra.run.dir=job", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert last_line(proc).startswith(f"error: {tmp_path / 'job'} holds a finished job with these")
    assert "resume=true keeps it" in last_line(proc)
    run_cli(*FAST, "resume=true", "hydra.run.dir=job", cwd=tmp_path)
    assert (tmp_path / "job/metrics.json").read_text() == first
    assert sorted(p.name for p in (tmp_path / "job").glob("events.*")) == events


def test_resume_refuses_a_checkpoint_past_max_epochs_in_one_line(tmp_path):
    run_cli("trainer.max_epochs=3", QUIET, "hydra.run.dir=job", cwd=tmp_path)
    proc = run_cli(
        "trainer.max_epochs=2", QUIET, "resume=true", "hydra.run.dir=job", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last_line(proc).endswith(
        "holds 3 finished epochs, more than trainer.max_epochs=2; resume with "
        "trainer.max_epochs>=3, or train afresh in another directory"
    )
    assert read_metrics(tmp_path / "job")["epochs"] == 3


def test_folds_with_a_validation_fraction_and_a_feature_named_twice_are_refused(tmp_path):
    cases = [
        (
            ("data.num_folds=4", "data.val_fraction=0.5"),
            "error: data.val_fraction=0.5 with data.num_folds=4: with folds, each fold's "
            "held-out part is the validation set; set data.val_fraction=0",
        ),
        (
            ("data.features=[CRIM,CRIM,RM]",),
            "data.features names 'CRIM' more than once; name each column once",
        ),
    ]
    for overrides, message in cases:
        proc = run_cli(*overrides, *FAST, "hydra.run.dir=x", cwd=tmp_path, check=False)
        assert proc.returncode == 1 and message in last_line(proc), last_line(proc)


def test_an_unquoted_non_ascii_value_gets_a_hint_to_quote_it(tmp_path):
    proc = run_cli("data.target=prix€", *FAST, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert last_line(proc).endswith("""a non-ASCII value must be quoted: 'data.target="prix€"'""")
    quoted = run_cli('data.target="prix€"', *FAST, cwd=tmp_path, check=False)
    assert "target column 'prix€' not found" in last_line(quoted)


def own_csv(path, scale: float = 1.0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    rows = [f"{a:.4f},{b:.4f},{(50 + 3 * a - b) * scale:.4f}" for a, b in x]
    path.write_text("\n".join(["size,rooms,price", *rows]) + "\n")
    return path


def test_evaluate_reads_the_recorded_file_and_says_when_it_changed(tmp_path):
    """A job trained on houses.csv (a relative path) is evaluated from another directory that
    holds another houses.csv: evaluate reads the file the job recorded, by absolute path and
    SHA-256; once that file changes, it says so in one line instead of a wrong MAE."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    own_csv(tmp_path / "a/houses.csv")
    own_csv(tmp_path / "b/houses.csv", scale=3.0)  # same name, other numbers
    args = ("data.path=houses.csv", "data.target=price", *FAST, "hydra.run.dir=job")
    run_cli(*args, cwd=tmp_path / "a")
    m = read_metrics(tmp_path / "a/job")
    assert m["data_file"]["path"] == str(tmp_path / "a/houses.csv")
    ckpt = f"ckpt_path={tmp_path / 'a/job/checkpoints/last.ckpt'}"
    out = run_cli(ckpt, "output_dir=e1", cwd=tmp_path / "b", module="housing_reg.evaluate")
    assert f"mae {m['test/mae']:.4f}" in out.stdout  # the job's own test rows, reproduced
    own_csv(tmp_path / "a/houses.csv", scale=1000.0)
    proc = run_cli(
        ckpt, "output_dir=e2", cwd=tmp_path / "b", module="housing_reg.evaluate", check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith(f"error: {tmp_path / 'a/houses.csv'} has changed since")
    assert "cannot be reproduced" in line and not (tmp_path / "b/e2").exists()


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path):
    data = own_csv(tmp_path / "houses.csv")
    args = (f"data.path={data}", "data.target=price", FAST[1], "hydra.run.dir=job")
    run_cli(*args, "trainer.max_epochs=1", cwd=tmp_path)
    own_csv(data, scale=1000.0)  # the target column multiplied by 1000
    proc = run_cli(*args, "trainer.max_epochs=2", "resume=true", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "now holds other contents" in last_line(proc)
    assert "train afresh in another directory" in last_line(proc)
    assert read_metrics(tmp_path / "job")["epochs"] == 1  # the first result stands
