"""Guards around a job: memory estimated and refused up front, Ctrl-C while it starts, and the
checkpoint behind a finished result kept when a retry moves on. Each runs for real, mostly
through the CLI."""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from housing_reg import memory
from housing_reg.data import RegressionData
from housing_reg.evaluate import evaluate
from housing_reg.jobdir import read_state
from housing_reg.report import report
from housing_reg.runs import run_jobs
from housing_reg.settings import ConfigError
from housing_reg.train import train, train_jobs

from conftest import compose_cfg, read_metrics, run_cli

QUIET = "callbacks.progress_bar.refresh_rate=0"
BATCH = "data.batch_size=32"  # 13 steps an epoch: quick
TESTS = Path(__file__).parent
CTRL_C = {"PYTHONPATH": str(TESTS)}  # tests/interrupt.py


def cfg(*overrides: str, output_dir: Path | str = "/unused"):
    return compose_cfg(*overrides, output_dir=output_dir)


def fit_of(*overrides: str) -> memory.Fit:
    c = cfg(*overrides)
    data = RegressionData(seeds=[0])
    data.setup("fit")
    return memory.fit_of([c], [{k: tuple(x.shape) for k, (x, _) in data.splits.items()}])


def only_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- memory ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_model_too_big_for_any_machine_is_refused_before_anything_is_built(tmp_path: Path):
    """model.hidden=[200000,200000] (160 GB of weights alone) used to fail inside torch
    ("can't allocate 160000000000 bytes", printed twice): now one line, with both figures, and
    nothing built (the command line prints it and records it as any refused setting:
    tests/test_bad_input.py)."""
    job = tmp_path / "job"
    with pytest.raises(ConfigError) as e:
        train(cfg("model.hidden=[200000,200000]", QUIET, output_dir=job))
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("model.hidden=[200000, 200000] with model.replicas=1 needs ")
    expected = memory.size(fit_of("model.hidden=[200000,200000]").needed())
    assert f"needs about {expected} of memory (parameters 149 GiB, gradients 149 GiB, " in line
    where = re.search(r"more than the [\d.]+ [KMGT]iB available \((.+?)\); lower model", line)
    assert where, line
    sources = ("MemAvailable in /proc/meminfo", "the cgroup limit in /sys/", memory.ENV)
    assert where.group(1).startswith(sources), line
    assert not job.exists()  # nothing built, nothing written


@pytest.mark.unit
def test_replicas_beyond_the_memory_limit_are_refused(tmp_path: Path, monkeypatch):
    """model.replicas=100000 used to be killed by the OOM killer without a word on a small
    machine; HOUSING_REG_MEMORY_LIMIT (documented in docs/faults.md) stands for one here, a
    small one, so that the replicas' data are quick to prepare."""
    monkeypatch.setenv(memory.ENV, "64M")
    with pytest.raises(ConfigError) as e:
        train(cfg("model.replicas=2000", QUIET, output_dir=tmp_path / "job"))
    line = str(e.value)
    expected = memory.size(fit_of("model.replicas=2000").needed())
    assert line.startswith(
        f"model.hidden=[64, 64] with model.replicas=2000 needs about {expected} "
    )
    assert f"more than the {memory.size(64 * 2**20)} available ({memory.ENV})" in line
    assert not (tmp_path / "job").exists()


@pytest.mark.unit
def test_a_fused_fit_too_big_for_memory_is_refused_with_the_cap_that_fits(
    tmp_path: Path, monkeypatch
):
    """Each job fits alone, the fit of all four does not: every job is refused before any
    trains (as a fused sweep's task records it, runs.run_jobs), naming the fit, both figures
    and the fuse.max_replicas that would fit."""
    one, four = fit_of("model.replicas=16", BATCH), fit_of("model.replicas=64", BATCH)
    four = replace(four, jobs=4)  # four jobs stack their rows per replica
    limit = (one.needed() + four.needed()) // 2
    monkeypatch.setenv(memory.ENV, str(limit))
    settings = ("model.replicas=16", BATCH, "trainer.max_epochs=1", QUIET)  # 64 models: one fit
    jobs = [tmp_path / f"{k}_seed={k}" for k in range(4)]
    run_jobs(train_jobs, [cfg(f"seed={k}", *settings, output_dir=j) for k, j in enumerate(jobs)])
    cap = None
    for job in jobs:
        error = json.loads((job / "failure.json").read_text())["error"]
        assert "this fit of 4 jobs (64 models of widths [64, 64]) needs about" in error
        assert f"more than the {memory.size(limit)} available ({memory.ENV})" in error
        cap = int(re.search(r"lower fuse.max_replicas to (\d+) or less", error).group(1))
        assert not list(job.glob("events.*")) and not (job / "metrics.json").exists()
    assert 16 <= cap < 64
    assert replace(four, replicas=cap).needed() <= limit
    assert replace(four, replicas=cap + 1).needed() > limit


@pytest.mark.unit
def test_what_is_available_comes_from_the_knob_then_the_cgroup_then_meminfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemAvailable:   8000000 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "CGROUP_V2", v2)
    monkeypatch.setattr(memory, "CGROUP_V1", v1)
    monkeypatch.delenv(memory.ENV, raising=False)
    assert memory.available() == (8000000 * 1024, "MemAvailable in /proc/meminfo")
    v1.write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    assert memory.available()[1] == "MemAvailable in /proc/meminfo"
    v2.write_text("max\n")
    assert memory.available()[1] == "MemAvailable in /proc/meminfo"
    v2.write_text(f"{2**31}\n")  # 2 GiB: less what this process already holds
    have, where = memory.available()
    assert abs(have - (2**31 - memory.resident())) < 2**24  # the process grows a little
    assert where.startswith(f"the cgroup limit in {v2} 2 GiB, less the ")
    v2.write_text(f"{2**40}\n")  # a limit above what is free: what is free
    assert memory.available() == (8000000 * 1024, "MemAvailable in /proc/meminfo")
    monkeypatch.setenv(memory.ENV, "1.5G")
    assert memory.available() == (3 * 2**29, memory.ENV)
    monkeypatch.setenv(memory.ENV, "off")
    assert memory.available() is None
    monkeypatch.setenv(memory.ENV, "lots")
    with pytest.raises(ConfigError, match=f"{memory.ENV}=lots: must be a size such as 8G"):
        memory.available()


@pytest.mark.unit
def test_the_estimate_follows_the_settings_and_leaves_a_normal_job_alone():
    assert [memory.optimizer_buffers(cfg(f"optim={o}").optim) for o in ("rmsprop", "adam")] == [
        1,
        2,
    ]
    assert memory.optimizer_buffers(cfg("optim=sgd").optim) == 0
    assert memory.optimizer_buffers(cfg("optim=sgd", "optim.momentum=0.9").optim) == 1
    one, two = fit_of("model.replicas=1000"), fit_of("model.replicas=2000")
    assert two.parts()["parameters"] == 2 * one.parts()["parameters"]
    assert fit_of("optim=adam").parts()["optimizer state"] == 2 * fit_of().parts()["parameters"]
    assert fit_of("checkpoint_every=0").parts()["checkpoint"] == 0
    chunked = replace(two, eval_batch_size=10)
    assert chunked.parts()["evaluation"] < two.parts()["evaluation"]
    # The default job needs well under a megabyte for its tensors: never refused.
    assert fit_of().needed() < 2**20
    memory.check([cfg()], [{"train": (404, 13), "val": (0, 13), "test": (102, 13)}])


# -- Ctrl-C while a job starts ---------------------------------------------------------------
def start(cwd: Path, *args: str) -> subprocess.Popen:
    """The command as a terminal starts it: SIGINT at its default, even where these tests run
    in the background of a non-interactive shell (which starts them with SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "housing_reg.train", QUIET, "trainer.max_epochs=50", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **CTRL_C},
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
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


@pytest.mark.cli
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


@pytest.mark.cli
def test_an_interrupted_retry_keeps_the_result_its_checkpoint_and_settings_together(
    tmp_path: Path,
):
    """A job trains 2 epochs; resumed with trainer.max_epochs=1000 it is interrupted after 5.
    metrics.json still describes 2 epochs, checkpoints/result.ckpt is still the model behind
    it (evaluate reproduces its test MAE exactly), last.ckpt is the epoch-5 resume point, and
    the report names the interrupted retry. A Ctrl-C while a third try starts changes
    nothing."""
    job = tmp_path / "job"
    train(cfg(QUIET, BATCH, "trainer.max_epochs=2", output_dir=job))  # as a first run trains
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


@pytest.mark.unit
def test_a_run_stopped_between_checkpoints_saves_the_model_it_tested(tmp_path: Path):
    """checkpoint_every=5 and a callback stopping after 2 of 10 epochs: the last epoch is
    saved anyway, as result.ckpt beside the metrics it produced."""
    job = tmp_path / "job"
    stop = ("+callbacks.stop._target_=interrupt.StopAt", "+callbacks.stop.epochs=2")
    train(cfg(QUIET, BATCH, "trainer.max_epochs=10", "checkpoint_every=5", *stop, output_dir=job))
    m = read_metrics(job)
    assert m["epochs"] == 2
    ckpt = job / "checkpoints" / "result.ckpt"
    assert epochs_in(ckpt) == 2
    assert evaluate(ckpt, output_dir=tmp_path / "eval")["mae"] == m["test/mae"]
