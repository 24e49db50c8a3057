"""Issue #18's cases that a first probe found unguarded: a finished result is never replaced
behind the user's back, nonsensical data settings and unquoted non-ASCII overrides get one line,
and resume refuses a checkpoint that has trained past trainer.max_epochs. In-process, through
train.train (what the command line runs); one CLI test for Hydra's own parse error."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from housing_reg.argv import non_ascii_hint
from housing_reg.csvfile import DataError
from housing_reg.evaluate import evaluate
from housing_reg.report import read_runs
from housing_reg.settings import ConfigError
from housing_reg.train import train

from conftest import FAST, read_metrics, run_cli

QUIET = FAST[1]
QUICK = (*FAST, "data.batch_size=32")  # 13 steps an epoch


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.unit
def test_a_second_run_with_other_settings_never_replaces_a_finished_job(make_cfg, tmp_path):
    job = tmp_path / "job"
    first_metrics = train(make_cfg(*QUICK, output_dir=job))
    first = (job / "metrics.json").read_text()
    events = sorted(p.name for p in job.glob("events.*"))
    other = make_cfg(*QUICK, "head=relu", "optim.lr=0.01", output_dir=job)
    with pytest.raises(ConfigError) as e:
        train(other)
    line = str(e.value)
    assert line.startswith(f"{job} holds a finished job trained with other")
    assert "head.name: none there, relu here" in line and "hydra.run.dir=" in line
    assert (job / "metrics.json").read_text() == first  # untouched
    assert sorted(p.name for p in job.glob("events.*")) == events
    # The report labels the result with the settings it was trained with, though Hydra has
    # rewritten .hydra/config.yaml for the refused attempt (as it does before the job runs).
    (job / ".hydra").mkdir()
    OmegaConf.save(other, job / ".hydra" / "config.yaml")
    runs = read_runs(job, tmp_path)
    assert runs.status == "ok" and runs.settings["head.name"] == "none"
    assert runs.settings["optim.lr"] == 0.001
    # The same settings again: refused too (it would put a second run beside the first in
    # TensorBoard); resume=true keeps the finished job as it is.
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*QUICK, output_dir=job))
    assert str(e.value).startswith(f"{job} holds a finished job with these")
    assert "resume=true keeps it" in str(e.value)
    kept = train(make_cfg(*QUICK, "resume=true", output_dir=job))
    assert kept["test/mae"] == first_metrics["test/mae"]
    assert (job / "metrics.json").read_text() == first
    assert sorted(p.name for p in job.glob("events.*")) == events


@pytest.mark.unit
def test_resume_refuses_a_checkpoint_past_max_epochs_in_one_line(make_cfg, tmp_path):
    train(make_cfg("trainer.max_epochs=3", QUIET, "data.batch_size=32"))
    with pytest.raises(ConfigError) as e:
        train(make_cfg("trainer.max_epochs=2", QUIET, "data.batch_size=32", "resume=true"))
    assert "\n" not in str(e.value)
    assert str(e.value).endswith(
        "holds 3 finished epochs, more than trainer.max_epochs=2; resume with "
        "trainer.max_epochs>=3, or train afresh in another directory"
    )
    assert read_metrics(tmp_path)["epochs"] == 3


@pytest.mark.unit
def test_folds_with_a_validation_fraction_and_a_feature_named_twice_are_refused(make_cfg, tmp_path):
    cases = [
        (
            ("data.num_folds=4", "data.val_fraction=0.5"),
            ConfigError,
            "data.val_fraction=0.5 with data.num_folds=4: with folds, each fold's "
            "held-out part is the validation set; set data.val_fraction=0",
        ),
        (
            ("data.features=[CRIM,CRIM,RM]",),
            DataError,
            "data.features names 'CRIM' more than once; name each column once",
        ),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error) as e:
            train(make_cfg(*overrides, *FAST, output_dir=tmp_path / "x"))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "x").exists()


@pytest.mark.cli
def test_an_unquoted_non_ascii_value_gets_a_hint_to_quote_it(tmp_path):
    """Hydra's own parse error, through the command line: one line, and how to quote."""
    proc = run_cli("data.target=prix€", *FAST, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert last_line(proc).endswith("""a non-ASCII value must be quoted: 'data.target="prix€"'""")


@pytest.mark.unit
def test_a_quoted_non_ascii_value_reaches_the_job(make_cfg, tmp_path):
    assert non_ascii_hint(['data.target="prix€"']) == ""  # quoted: no hint
    assert (
        non_ascii_hint(["data.target=€"])
        == "; a non-ASCII value must be quoted: 'data.target=\"€\"'"
    )
    with pytest.raises(DataError, match="target column 'prix€' not found"):
        train(make_cfg('data.target="prix€"', *FAST))


def own_csv(path, scale: float = 1.0):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    rows = [f"{a:.4f},{b:.4f},{(50 + 3 * a - b) * scale:.4f}" for a, b in x]
    path.write_text("\n".join(["size,rooms,price", *rows]) + "\n")
    return path


@pytest.mark.unit
def test_evaluate_reads_the_recorded_file_and_says_when_it_changed(make_cfg, tmp_path, monkeypatch):
    """A job trained on houses.csv (a relative path) is evaluated from another directory that
    holds another houses.csv: evaluate reads the file the job recorded, by absolute path and
    SHA-256; once that file changes, it says so in one line instead of a wrong MAE."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    own_csv(tmp_path / "a/houses.csv")
    own_csv(tmp_path / "b/houses.csv", scale=3.0)  # same name, other numbers
    monkeypatch.chdir(tmp_path / "a")
    train(
        make_cfg("data.path=houses.csv", "data.target=price", *FAST, output_dir=tmp_path / "a/job")
    )
    m = read_metrics(tmp_path / "a/job")
    assert m["data_file"]["path"] == str(tmp_path / "a/houses.csv")
    ckpt = tmp_path / "a/job/checkpoints/last.ckpt"
    monkeypatch.chdir(tmp_path / "b")
    assert evaluate(ckpt, output_dir="e1")["mae"] == m["test/mae"]  # its own test rows again
    own_csv(tmp_path / "a/houses.csv", scale=1000.0)
    with pytest.raises(DataError) as e:
        evaluate(ckpt, output_dir="e2")
    line = str(e.value)
    assert line.startswith(f"{tmp_path / 'a/houses.csv'} has changed since") and "\n" not in line
    assert "cannot be reproduced" in line and not (tmp_path / "b/e2").exists()


@pytest.mark.unit
def test_resume_refuses_data_that_changed_since_the_checkpoint(make_cfg, tmp_path):
    data = own_csv(tmp_path / "houses.csv")
    args = (f"data.path={data}", "data.target=price", FAST[1])
    job = tmp_path / "job"
    train(make_cfg(*args, "trainer.max_epochs=1", output_dir=job))
    own_csv(data, scale=1000.0)  # the target column multiplied by 1000
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*args, "trainer.max_epochs=2", "resume=true", output_dir=job))
    assert "now holds other contents" in str(e.value)
    assert "train afresh in another directory" in str(e.value)
    assert read_metrics(job)["epochs"] == 1  # the first result stands
