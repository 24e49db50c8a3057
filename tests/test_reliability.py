"""Issue #18's cases that a first probe found unguarded: a finished result is never replaced
behind the user's back, nonsensical data settings and unquoted non-ASCII overrides get one line,
and resume refuses a checkpoint that has trained past trainer.max_epochs."""

from __future__ import annotations

import json

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
    # The same settings again: a deterministic rerun, allowed.
    run_cli(*FAST, "hydra.run.dir=job", cwd=tmp_path)
    assert read_metrics(tmp_path / "job")["test/mae"] == json.loads(first)["test/mae"]


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
