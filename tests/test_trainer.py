"""Lightning's Trainer arguments under the manual, blocked loop: each works with Lightning's
meaning (clipping per replica, checkpointing off) or is refused in one line before training.
All in-process, through train.train and train.train_jobs, which the CLI and a fused sweep's
task call; tests/test_bad_input.py shows a refusal's line reaching the terminal."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from housing_reg.settings import ConfigError
from housing_reg.train import train, train_jobs

from conftest import FAST, read_metrics, scalars

pytestmark = pytest.mark.unit

QUICK = (*FAST, "data.batch_size=32")  # 13 steps an epoch


def replicas_npz(job):
    return np.load(job / "replicas.npz")["test_pred"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_per_replica(make_cfg, tmp_path, algorithm: str):
    """Replica 1 of a 2-replica job clipped at 0.05 is the lone run with seed 1, clipped the
    same way: each replica is clipped by its own gradient norm, not one norm over both."""
    clip = ("+trainer.gradient_clip_val=0.05", f"+trainer.gradient_clip_algorithm={algorithm}")
    train(make_cfg(*QUICK, *clip, "model.replicas=2", output_dir=tmp_path / "two"))
    train(make_cfg(*QUICK, *clip, "seed=1", output_dir=tmp_path / "lone"))
    train(make_cfg(*QUICK, "seed=1", output_dir=tmp_path / "free"))
    two, lone, free = (replicas_npz(tmp_path / d) for d in ("two", "lone", "free"))
    assert np.array_equal(two[1], lone[0])
    assert not np.array_equal(lone[0], free[0])  # the clipping acted
    config = read_metrics(tmp_path / "two")["config"]["trainer"]
    assert (config["gradient_clip_val"], config["gradient_clip_algorithm"]) == (0.05, algorithm)


def test_enable_checkpointing_false_writes_no_checkpoint(make_cfg, tmp_path):
    assert train(make_cfg(*QUICK, "+trainer.enable_checkpointing=false"))["status"] == "ok"
    assert read_metrics(tmp_path)["status"] == "ok"
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("+trainer.accumulate_grad_batches=4", "raise data.batch_size"),
        ("+trainer.limit_train_batches=10", "trainer.max_epochs"),
        ("+trainer.max_steps=100", "use trainer.max_epochs"),
        ("+trainer.val_check_interval=0.5", "once per epoch"),
        ("trainer.devices=2", "hydra/launcher=parallel"),
        ("+trainer.gradient_clip_algorithm=max", "must be norm or value"),
        ("+trainer.gradient_clip_val=-1", "must be a number > 0"),
    ],
)
def test_what_the_loop_cannot_honour_is_refused_in_one_line(make_cfg, tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(*FAST, override))
    line, key = str(e.value), override.lstrip("+").split("=")[0]
    assert line.startswith(f"{key}=") and fragment in line and "\n" not in line, line
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


# -- learning-rate schedules -----------------------------------------------------------------
def test_step_and_cosine_schedules_show_as_train_lr(make_cfg, tmp_path):
    three = ("trainer.max_epochs=3", FAST[1], "data.batch_size=32")
    step = ("lr_scheduler=step", "lr_scheduler.scheduler.step_size=1")
    train(make_cfg(*three, *step, output_dir=tmp_path / "step"))
    train(make_cfg(*three, "lr_scheduler=cosine", output_dir=tmp_path / "cos"))
    train(make_cfg(*three, output_dir=tmp_path / "flat"))
    assert scalars(tmp_path / "step")["train/lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    cos = scalars(tmp_path / "cos")["train/lr"]
    assert cos[0] == pytest.approx(1e-3) and cos[0] > cos[1] > cos[2] > 0
    assert "train/lr" not in scalars(tmp_path / "flat")  # none: a constant lr, as before
    m = read_metrics(tmp_path / "step")
    assert m["lr_scheduler"] == "step" and m["config"]["lr_scheduler"]["scheduler"]["gamma"] == 0.5
    assert m["test/mae"] != read_metrics(tmp_path / "flat")["test/mae"]


def test_a_scheduled_sweep_fuses_with_each_job_its_lone_run(make_cfg, tmp_path, caplog):
    """Two scheduled jobs (what a fused sweep's task trains) share one fit, and the tanh job's
    files and lr curve are its lone run's."""
    args = ("lr_scheduler=step", "lr_scheduler.scheduler.step_size=1", *QUICK)
    caplog.set_level(logging.INFO, logger="housing_reg.train")
    jobs = [make_cfg(h, *args, output_dir=tmp_path / h) for h in ("head=none", "head=tanh")]
    assert all(isinstance(m, dict) for m in train_jobs(jobs))
    assert any(m.startswith("fit 1 of 1: 2 jobs, 2 models") for m in caplog.messages)
    train(make_cfg("head=tanh", *args, output_dir=tmp_path / "lone"))
    tanh, lone = tmp_path / "head=tanh", tmp_path / "lone"
    assert (tanh / "replicas.csv").read_text() == (lone / "replicas.csv").read_text()
    assert scalars(tanh)["train/lr"] == scalars(lone)["train/lr"]


def test_plateau_follows_validation_mae_of_one_model(make_cfg, tmp_path):
    args = ("lr_scheduler=plateau", "lr_scheduler.scheduler.patience=0", "trainer.max_epochs=4")
    args = (*args, FAST[1], "data.batch_size=32")
    train(make_cfg(*args, "data.val_fraction=0.2", output_dir=tmp_path / "p"))
    lr = scalars(tmp_path / "p")["train/lr"]
    assert (
        lr[0] == pytest.approx(1e-3)
        and len(lr) == 4
        and all(b <= a for a, b in zip(lr, lr[1:], strict=False))
    )
    for extra, fragment in [
        (("data.val_fraction=0.2", "model.replicas=2"), "model.replicas=2"),
        ((), "set data.val_fraction=0.2"),
    ]:
        with pytest.raises(ConfigError) as e:
            train(make_cfg(*args, *extra, output_dir=tmp_path / "x"))
        assert str(e.value).startswith("lr_scheduler=plateau") and fragment in str(e.value)
        assert not (tmp_path / "x").exists()
