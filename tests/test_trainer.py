"""Lightning's Trainer arguments under the manual, blocked loop: each works with Lightning's
meaning (clipping per replica, checkpointing off) or is refused in one line before training."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAST, job_dirs, read_metrics, run_cli, scalars


def replicas_npz(job):
    return np.load(job / "replicas.npz")["test_pred"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_per_replica(tmp_path, algorithm: str):
    """Replica 1 of a 2-replica job clipped at 0.05 is the lone run with seed 1, clipped the
    same way: each replica is clipped by its own gradient norm, not one norm over both."""
    clip = ("+trainer.gradient_clip_val=0.05", f"+trainer.gradient_clip_algorithm={algorithm}")
    run_cli(*FAST, *clip, "model.replicas=2", "hydra.run.dir=two", cwd=tmp_path)
    run_cli(*FAST, *clip, "seed=1", "hydra.run.dir=lone", cwd=tmp_path)
    run_cli(*FAST, "seed=1", "hydra.run.dir=free", cwd=tmp_path)
    two, lone, free = (replicas_npz(tmp_path / d) for d in ("two", "lone", "free"))
    assert np.array_equal(two[1], lone[0])
    assert not np.array_equal(lone[0], free[0])  # the clipping acted
    config = read_metrics(tmp_path / "two")["config"]["trainer"]
    assert (config["gradient_clip_val"], config["gradient_clip_algorithm"]) == (0.05, algorithm)


def test_enable_checkpointing_false_writes_no_checkpoint(tmp_path):
    run_cli(*FAST, "+trainer.enable_checkpointing=false", "hydra.run.dir=j", cwd=tmp_path)
    assert read_metrics(tmp_path / "j")["status"] == "ok"
    assert not (tmp_path / "j/checkpoints").exists()


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
def test_what_the_loop_cannot_honour_is_refused_in_one_line(tmp_path, override, fragment):
    proc = run_cli(*FAST, override, "hydra.run.dir=j", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    key = override.lstrip("+").split("=")[0]
    assert last.startswith(f"error: {key}=") and fragment in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "j/checkpoints").exists()  # nothing trained


# -- learning-rate schedules -----------------------------------------------------------------
def test_step_and_cosine_schedules_show_as_train_lr(tmp_path):
    three = ("trainer.max_epochs=3", FAST[1])
    step = ("lr_scheduler=step", "lr_scheduler.scheduler.step_size=1")
    run_cli(*three, *step, "hydra.run.dir=step", cwd=tmp_path)
    run_cli(*three, "lr_scheduler=cosine", "hydra.run.dir=cos", cwd=tmp_path)
    run_cli(*three, "hydra.run.dir=flat", cwd=tmp_path)
    assert scalars(tmp_path / "step")["train/lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    cos = scalars(tmp_path / "cos")["train/lr"]
    assert cos[0] == pytest.approx(1e-3) and cos[0] > cos[1] > cos[2] > 0
    assert "train/lr" not in scalars(tmp_path / "flat")  # none: a constant lr, as before
    m = read_metrics(tmp_path / "step")
    assert m["lr_scheduler"] == "step" and m["config"]["lr_scheduler"]["scheduler"]["gamma"] == 0.5
    assert m["test/mae"] != read_metrics(tmp_path / "flat")["test/mae"]


def test_a_scheduled_sweep_fuses_with_each_job_its_lone_run(tmp_path):
    args = ("lr_scheduler=step", "lr_scheduler.scheduler.step_size=1", *FAST)
    proc = run_cli("-m", "head=none,tanh", *args, "hydra.sweep.dir=s", cwd=tmp_path)
    assert "group 0: 2 jobs, 2 models, one task" in proc.stdout
    run_cli("head=tanh", *args, "hydra.run.dir=lone", cwd=tmp_path)
    tanh = job_dirs(tmp_path / "s")[1]
    assert (tanh / "replicas.csv").read_text() == (tmp_path / "lone/replicas.csv").read_text()
    assert scalars(tanh)["train/lr"] == scalars(tmp_path / "lone")["train/lr"]


def test_plateau_follows_validation_mae_of_one_model(tmp_path):
    args = ("lr_scheduler=plateau", "lr_scheduler.scheduler.patience=0", "trainer.max_epochs=4")
    run_cli(*args, "data.val_fraction=0.2", FAST[1], "hydra.run.dir=p", cwd=tmp_path)
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
        proc = run_cli(*args, *extra, FAST[1], "hydra.run.dir=x", cwd=tmp_path, check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("error: lr_scheduler=plateau")
        assert fragment in last
