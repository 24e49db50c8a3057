"""Guards around a job: Ctrl-C while it starts, and the checkpoint behind a finished result
kept when a retry moves on. Each runs for real, mostly through the CLI."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from housing_reg.evaluate import evaluate
from housing_reg.jobdir import read_state
from housing_reg.report import report

from conftest import read_metrics, run_cli

QUIET = "callbacks.progress_bar.refresh_rate=0"
BATCH = "data.batch_size=32"  # 13 steps an epoch: quick
TESTS = Path(__file__).parent
CTRL_C = {"PYTHONPATH": str(TESTS)}  # tests/interrupt.py


def only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- Ctrl-C while a job starts ---------------------------------------------------------------
def start(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "housing_reg.train", QUIET, "trainer.max_epochs=50", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **CTRL_C},
    )


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.005)


def loading_torch(pid: int) -> bool:
    """The process has begun to load torch's library: Python's start is over."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_ctrl_c_while_a_job_starts_is_one_line_and_leaves_no_job_dir(tmp_path: Path):
    """Ctrl-C while torch is imported, just as Hydra has made the job directory, once it has
    written .hydra/, and in Lightning's set-up: each time one line, exit status 130, and no
    job directory left behind (a directory with only .hydra/ reads as a job killed mid-run)."""
    outputs = lambda cwd: [p for p in (cwd / "outputs").glob("*/*")]  # noqa: E731
    moments = {
        "importing torch": lambda proc, cwd: loading_torch(proc.pid),
        "job dir made": lambda proc, cwd: bool(outputs(cwd)),
        ".hydra written": lambda proc, cwd: any((p / ".hydra").is_dir() for p in outputs(cwd)),
    }
    for moment, ready in moments.items():
        cwd = tmp_path / moment.replace(" ", "_")
        cwd.mkdir()
        proc = start(cwd)
        wait_for(proc, lambda proc=proc, cwd=cwd, ready=ready: ready(proc, cwd), moment)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, (moment, err[-3000:])
        assert only_line(err) == "error: interrupted before training started; nothing recorded"
        assert outputs(cwd) == [], moment
    cwd = tmp_path / "lightning"
    cwd.mkdir()
    proc = start(cwd, "+callbacks.interrupt._target_=interrupt.InterruptAtSetup")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert only_line(err) == "error: interrupted before training started; nothing recorded"
    assert outputs(cwd) == []


# -- the checkpoint behind a result ----------------------------------------------------------
def epochs_in(ckpt: Path) -> int:
    """Whole epochs a checkpoint holds (its recorder's history)."""
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["JobRecorder"]
    return len(saved["history"]["train/mae"])


def test_an_interrupted_retry_keeps_the_result_its_checkpoint_and_settings_together(
    tmp_path: Path,
):
    """A job trains 2 epochs; resumed with trainer.max_epochs=1000 it is interrupted after 5.
    metrics.json still describes 2 epochs, checkpoints/result.ckpt is still the model behind
    it (evaluate reproduces its test MAE exactly), last.ckpt is the epoch-5 resume point, and
    the report names the interrupted retry. A Ctrl-C while a third try starts changes
    nothing."""
    job = tmp_path / "job"
    run_cli(QUIET, BATCH, "trainer.max_epochs=2", f"hydra.run.dir={job}", cwd=tmp_path)
    metrics = (job / "metrics.json").read_bytes()
    result = (job / "checkpoints" / "result.ckpt").read_bytes()
    assert result == (job / "checkpoints" / "last.ckpt").read_bytes()

    proc = run_cli(
        QUIET,
        BATCH,
        "trainer.max_epochs=1000",
        "resume=true",
        "+callbacks.interrupt._target_=interrupt.InterruptAt",
        "+callbacks.interrupt.epoch=5",
        f"hydra.run.dir={job}",
        cwd=tmp_path,
        check=False,
        env=CTRL_C,
    )
    assert proc.returncode == 1
    assert only_line(proc.stderr).startswith("error: interrupted with 5 of 1000 epochs done")
    assert (job / "metrics.json").read_bytes() == metrics
    assert (job / "checkpoints" / "result.ckpt").read_bytes() == result
    assert [epochs_in(job / "checkpoints" / f) for f in ("result.ckpt", "last.ckpt")] == [2, 5]

    m = read_metrics(job)
    assert m["epochs"] == 2 and m["config"]["trainer"]["max_epochs"] == 2
    again = evaluate(job / "checkpoints" / "result.ckpt", output_dir=tmp_path / "eval")
    assert again["mae"] == m["test/mae"]
    later = evaluate(job / "checkpoints" / "last.ckpt", output_dir=tmp_path / "eval-last")
    assert later["mae"] != m["test/mae"]

    state = read_state(job)
    assert state.status == "ok" and state.note.startswith("a later retry was interrupted (")
    md, runs = report(tmp_path, tmp_path / "report")
    assert runs == 1 and f"- job: {state.note}" in md.split("## Notes")[1]
    with open(tmp_path / "report" / "summary.csv", newline="") as f:
        assert [r["note"] for r in csv.DictReader(f)] == [state.note]

    before = {p: p.read_bytes() for p in job.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    proc = start(
        tmp_path,
        BATCH,
        "trainer.max_epochs=1000",
        "resume=true",
        "+callbacks.interrupt._target_=interrupt.InterruptAtSetup",
        f"hydra.run.dir={job}",
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and only_line(err).endswith("nothing recorded")
    after = {p: p.read_bytes() for p in job.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert after == before


def test_a_run_stopped_between_checkpoints_saves_the_model_it_tested(tmp_path: Path):
    """checkpoint_every=5 and a callback stopping after 2 of 10 epochs: the last epoch is
    saved anyway, as result.ckpt beside the metrics it produced."""
    job = tmp_path / "job"
    run_cli(
        QUIET,
        BATCH,
        "trainer.max_epochs=10",
        "checkpoint_every=5",
        "+callbacks.stop._target_=interrupt.StopAt",
        "+callbacks.stop.epochs=2",
        f"hydra.run.dir={job}",
        cwd=tmp_path,
        env=CTRL_C,
    )
    m = read_metrics(job)
    assert m["epochs"] == 2
    ckpt = job / "checkpoints" / "result.ckpt"
    assert epochs_in(ckpt) == 2
    assert evaluate(ckpt, output_dir=tmp_path / "eval")["mae"] == m["test/mae"]
    shutil.rmtree(tmp_path / "eval")
