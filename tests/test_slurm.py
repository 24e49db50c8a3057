"""Sweeps through hydra/launcher=slurm on a real one-node Slurm cluster: slurmctld, slurmd and
slurmdbd (accounting, so that sacct answers) on 127.0.0.1 with munge, started for this module
by scripts/slurm_local.sh with every file in a temporary directory (SLURM_CONF points there),
and stopped by PID however the tests end.

It needs root and Debian's slurmctld, slurmd, slurm-client, munge, slurmdbd and
mariadb-server-core (.ci/run installs them); without them, or without the `slurm` extra, the
tests skip and say why.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import job_dirs, read_metrics, scalars

# One pytest worker runs this module's tests one after another: they share the one-node Slurm.
pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("slurm")]

SCRIPT = Path(__file__).parents[1] / "scripts" / "slurm_local.sh"
QUIET = "callbacks.progress_bar.refresh_rate=0"
SLURM = [
    "-m",
    "hydra/launcher=slurm",
    # Poll sacct every second, and do not wait for results a network filesystem shows late.
    "hydra.launcher.poll_s=1",
    "hydra.launcher.result_wait_s=1",
]
HEADS = ["relu", "none", "sigmoid", "tanh"]
NOISE = ("sacct did not answer", "accounting storage is disabled", "Traceback")
DAEMONS = ("slurmd.pid", "slurmctld.pid", "slurmdbd.pid", "db/mariadbd.pid", "munge/munged.pid")


def alive(pid: int) -> bool:
    """Running, not a zombie (exited, waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """A running cluster; yields the environment a sweep needs to reach it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the `slurm` extra")
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster needs root: slurmd runs jobs as their users")
    root = Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp"))  # socket paths must be short
    pids: list[int] = []
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [str(SCRIPT), "start", str(root)], capture_output=True, text=True, timeout=180
        )
        if proc.returncode == 3:  # not installed: the script names what to install
            pytest.skip(f"no one-node Slurm: {proc.stderr.strip().removeprefix('error: ')}")
        logs = "".join(f"\n{p}:\n{p.read_text()[-2000:]}" for p in root.glob("log/*"))
        assert proc.returncode == 0, proc.stderr + logs
        print(f"cluster up in {time.monotonic() - start:.1f} s")
        pids = [int((root / f).read_text()) for f in DAEMONS]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        yield {**env, "SLURM_CONF": str(root / "slurm.conf")}
    finally:
        subprocess.run([str(SCRIPT), "stop", str(root)], capture_output=True, timeout=180)
        survivors = [p for p in pids if alive(p)]
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"daemons survived the teardown: {survivors}"


def sweep(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "housing_reg.train", *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )


def slurm_cmd(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(args, env=env, text=True, capture_output=True, check=True).stdout


def array_id(sweep_dir: Path) -> str | None:
    """The Slurm job array a sweep submitted: submitit names a folder after it."""
    folders = sweep_dir.glob(".submitit/*")
    return next((p.name for p in folders if p.name.isdigit()), None)


def files(job: Path) -> dict[str, bytes]:
    """What a job wrote, but Hydra's own records (.hydra/, train.log)."""
    return {
        str(p.relative_to(job)): p.read_bytes()
        for p in job.rglob("*")
        if p.is_file() and p.parts[len(job.parts)] not in (".hydra", "train.log")
    }


def test_four_heads_land_through_slurm(slurm: dict[str, str], tmp_path: Path):
    """The README's sweep through Slurm, fused: one Slurm task trains the four jobs, every job
    finishes with its metrics and TensorBoard run, Slurm's accounting saw the task complete,
    and the driver's output is free of noise."""
    proc = sweep(
        *SLURM,
        f"head={','.join(HEADS)}",
        "trainer.max_epochs=2",
        QUIET,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        env=slurm,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "group 0: 4 jobs, 4 models, one task" in out
    jobs = job_dirs(tmp_path / "sweep")
    assert [read_metrics(j)["head"] for j in jobs] == HEADS
    for job in jobs:
        m = read_metrics(job)
        assert m["status"] == "ok" and m["epochs"] == 2, job
        assert list(job.glob("events.out.tfevents.*")), job
        assert scalars(job)["test/mae"] == [pytest.approx(m["test/mae"])], job
    for head in HEADS:
        assert any(line.split()[:1] == [head] for line in proc.stdout.splitlines()), head

    # What the launcher asks (sacct), answered: the one Slurm job (an array of one task is
    # submitted as a plain job) completed, on our node. A job's result file can land before
    # slurmdbd records its end: wait up to 60 s for it.
    array = array_id(tmp_path / "sweep")
    expected = [f"{array}|COMPLETED|localnode"]
    deadline = time.monotonic() + 60
    while True:
        states = slurm_cmd(
            "sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList", "-j", array, env=slurm
        ).split()
        if sorted(states) == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(states) == expected
    for noise in NOISE:
        assert noise not in out


def test_a_diverging_job_fails_alone(slurm: dict[str, str], tmp_path: Path):
    proc = sweep(
        *SLURM,
        "optim.lr=1e-3,1e30",
        "trainer.max_epochs=2",
        QUIET,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        env=slurm,
    )
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    healthy, diverged = job_dirs(tmp_path / "sweep")
    assert read_metrics(healthy)["status"] == "ok"
    assert list(healthy.glob("events.out.tfevents.*"))
    assert not (diverged / "metrics.json").exists()
    assert f"1 job(s) failed: {diverged.name}: failed: FloatingPointError" in proc.stderr
    assert "Slurm ended" not in proc.stderr  # the job itself ended well: it recorded why
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cancelled_jobs_are_reported_and_the_sweep_resumes(slurm: dict[str, str], tmp_path: Path):
    """scancel one job while it runs and one before it starts (the array runs one job at a
    time): the driver names both, the summary lists them with the command that finishes the
    sweep, and that command does, without touching the job that had finished."""
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "housing_reg.train",
            *SLURM,
            "hydra.launcher.array_parallelism=1",
            "trainer.max_epochs=2,20,3",
            QUIET,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=slurm,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (array := array_id(tmp_path / "sweep")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        slurm_cmd("scancel", f"{array}_2", env=slurm)  # pending: %1 runs one job at a time
        while (
            not list(tmp_path.glob("sweep/1_*/checkpoints/last.ckpt"))
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        slurm_cmd("scancel", f"{array}_1", env=slurm)  # running, an epoch or more done
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    assert driver.returncode == 1, (out + err)[-3000:]
    assert "Traceback" not in out + err
    finished, running, pending = job_dirs(tmp_path / "sweep")
    assert (
        f"Slurm ended 2 job(s) without a result:\n  {running.name}: Slurm job {array}_1 CANCELLED"
        in err
    )
    assert f"\n  {pending.name}: Slurm job {array}_2 CANCELLED" in err
    assert f"{running.name}: interrupted: Interrupted: interrupted with " in err  # its own record
    assert (
        f"{pending.name}: cancelled: Slurm job {array}_2 ended CANCELLED before it started" in err
    )
    resume = err.split("to finish them: ", 1)[1].splitlines()[0]
    assert resume.endswith("resume=true hydra.sweep.dir=sweep")
    assert "hydra/launcher=slurm" in resume and "trainer.max_epochs=2,20,3" in resume
    assert yaml.safe_load((pending / ".hydra/overrides.yaml").read_text()) == [
        "trainer.max_epochs=3",
        QUIET,
    ]

    before = files(finished)
    argv = shlex.split(resume)
    assert argv[:3] == ["python", "-m", "housing_reg.train"]
    proc = sweep(*argv[3:], cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # metrics.json (fit_seconds included), events, predictions, checkpoint: the same bytes,
    # none added; only Hydra's records of the rerun and its log line are new.
    assert files(finished) == before
    assert "already finished; not rerun" in (finished / "train.log").read_text()
    assert [read_metrics(j)["epochs"] for j in (finished, running, pending)] == [2, 20, 3]
    assert not list(tmp_path.glob("sweep/*/failure.json"))
    assert "failed" not in proc.stderr


def test_without_accounting_a_cancelled_job_is_still_reported(slurm: dict[str, str], tmp_path):
    """A cluster without accounting: the driver's sacct fails at every poll (the launcher says
    so, once), and the launcher learns from squeue alone that a pending task was cancelled,
    instead of waiting for it forever."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        "#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n"
    )
    (bin_dir / "sacct").chmod(0o755)
    env = {**slurm, "PATH": f"{bin_dir}{os.pathsep}{slurm['PATH']}"}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "housing_reg.train",
            *SLURM,
            "hydra.launcher.array_parallelism=1",
            "trainer.max_epochs=2,3",
            QUIET,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (array := array_id(tmp_path / "sweep")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        slurm_cmd("scancel", f"{array}_1", env=slurm)  # pending: %1 runs one job at a time
        out, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    assert driver.returncode == 1, (out + err)[-3000:]
    finished, pending = job_dirs(tmp_path / "sweep")
    assert read_metrics(finished)["status"] == "ok"
    assert f"Slurm ended 1 job(s) without a result:\n  {pending.name}: Slurm job {array}_1" in err
    assert f"{pending.name}: cancelled: Slurm job {array}_1 ended CANCELLED before it" in err
    # The one sign of a cluster without accounting, with sacct's own word; said once.
    said = (out + err).count("sacct did not answer (exit status 1: sacct: error: Slurm acc")
    assert said == 1, (out + err)[-3000:]
