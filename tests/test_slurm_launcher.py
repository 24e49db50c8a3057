"""hydra/launcher=slurm's launcher (src/hydra_plugins/housing_reg_launcher/slurm.py) without a
cluster: how it collects jobs, its squeue-aware watcher against stand-in sacct and squeue
commands, and that Hydra's plugin scan and the CLI find it with the `slurm` extra and pass
over it quietly without. tests/test_slurm.py runs it on a real one-node Slurm.

Each test runs with only the dev extra as well (it blocks the plugin's modules itself), but
the watcher's, which needs submitit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hydra_plugins.housing_reg_launcher.slurm import NoResult, collect

from conftest import need

ROOT = Path(__file__).resolve().parents[1]


# -- collect: every job, in order ------------------------------------------------------------
class FakeJob:
    """What collect uses of a submitit job: its id, files, tasks and results()."""

    def __init__(self, folder: Path, job_id: str) -> None:
        self.job_id = job_id
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = SimpleNamespace(
            folder=folder,
            result_pickle=folder / f"{job_id}_0_result.pkl",
            stderr=folder / f"{job_id}_0_log.err",
        )
        self.num_tasks = 1

    def task(self, t: int) -> FakeJob:
        assert t == 0
        return self

    def results(self) -> list[str]:
        assert self.paths.result_pickle.exists(), "results() before the result file: it waits"
        return [self.paths.result_pickle.read_text()]


class FakeWatcher:
    """Slurm's word on each job: states[job_id], PENDING for others."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.asked: list[str] = []

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        self.asked.append(job_id)
        return self.states.get(job_id, "PENDING") not in ("PENDING", "RUNNING")

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.states.get(job_id, "PENDING")


@pytest.mark.unit
def test_collect_returns_one_result_per_job_in_order_and_stands_in_for_lost_ones(
    tmp_path: Path,
):
    """A job with a result returns it; a job Slurm ended without one becomes a NoResult with
    its state and log; a finished job whose result file shows late (a network filesystem)
    still returns its result, within result_wait_s."""
    done, cancelled, late, timed_out = (
        FakeJob(tmp_path / "f", i) for i in ("7_0", "7_1", "7_2", "7_3")
    )
    done.paths.result_pickle.write_text("r0")
    cancelled.paths.stderr.write_text("slurmstepd: CANCELLED")

    class LateFile(FakeWatcher):
        def is_done(self, job_id: str, mode: str = "standard") -> bool:
            if job_id == late.job_id and self.asked.count(job_id) == 1:
                late.paths.result_pickle.write_text("r2")  # a second after Slurm said so
            return super().is_done(job_id, mode)

    watcher = LateFile(
        {"7_1": "CANCELLED by 0", "7_2": "COMPLETED", "7_3": "TIMEOUT", "7_0": "COMPLETED"}
    )
    returns = collect([done, cancelled, late, timed_out], watcher, result_wait_s=3)

    assert returns[0] == "r0" and returns[2] == "r2"
    lost = returns[1]
    assert isinstance(lost, NoResult)
    assert (lost.slurm_id, lost.state, lost.log) == (
        "7_1",
        "CANCELLED",
        str(cancelled.paths.stderr),
    )
    assert lost.return_value is None  # what a sweeper reads: a failed job's None
    assert isinstance(returns[3], NoResult)
    assert (returns[3].state, returns[3].log) == ("TIMEOUT", "")  # no log: it never started
    assert done.job_id not in watcher.asked  # its result was there: Slurm was not asked


@pytest.mark.unit
def test_collect_does_not_depend_on_what_a_task_stands_for(tmp_path: Path):
    """Hydra's Launcher contract, whatever each override list means (a fused sweeper's task
    may stand for several jobs): as many returns as jobs, in submission order, even when a
    later job finishes first."""
    jobs = [FakeJob(tmp_path / "f", f"9_{i}") for i in range(5)]
    for i, job in reversed(list(enumerate(jobs))):
        job.paths.result_pickle.write_text(f"task {i}")
    assert collect(jobs, FakeWatcher({}), result_wait_s=0) == [f"task {i}" for i in range(5)]


# -- the watcher: sacct first, squeue for what sacct does not list ---------------------------
@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sacct and squeue on PATH that print what the test writes to sacct.out and squeue.out
    (squeue exits with squeue.rc); both log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sacct", "squeue"):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "$*" >>"{tmp_path}/{name}.args"\n'
            f'cat "{tmp_path}/{name}.out"\n'
            f'[ -f "{tmp_path}/{name}.err" ] && cat "{tmp_path}/{name}.err" >&2\n'
            f'exit $(cat "{tmp_path}/{name}.rc" 2>/dev/null || echo 0)\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def sacct_out(*rows: str) -> str:
    return "JobID|State|NodeList\n" + "".join(f"{r}\n" for r in rows)


@pytest.mark.unit
def test_watcher_asks_squeue_about_jobs_sacct_does_not_list(fake_slurm: Path):
    need("submitit", "slurm")
    from hydra_plugins.housing_reg_launcher.slurm import SqueueWatcher

    watcher = SqueueWatcher(delay_s=600)
    for job_id in ("5_0", "5_1", "5_2", "6"):
        watcher.register_job(job_id)
    # Slurm 22.05: task 1 was cancelled while pending and has no record; the array's pending
    # record still names task 2; job 6 was just submitted and sacct does not list it yet.
    (fake_slurm / "sacct.out").write_text(sacct_out("5_0|RUNNING|n1", "5_[2]|PENDING|"))
    (fake_slurm / "squeue.out").write_text("5_0|RUNNING\n5_2|PENDING\n6|PENDING\n")
    assert watcher.get_state("5_1", mode="force") == "CANCELLED"
    assert [watcher.get_state(j, mode="cache") for j in ("5_0", "5_2", "6")] == [
        "RUNNING",
        "PENDING",
        "PENDING",
    ]
    assert watcher.is_done("5_1", mode="cache") and not watcher.is_done("6", mode="cache")
    squeue_args = (fake_slurm / "squeue.args").read_text().split()
    assert squeue_args[-2:] == ["-j", "5_1,6"]  # only what sacct did not list

    # Once sacct lists a job, its word wins; squeue is asked only about unlisted jobs.
    (fake_slurm / "sacct.out").write_text(
        sacct_out("5_0|COMPLETED|n1", "5_2|TIMEOUT|n1", "6|RUNNING|n1")
    )
    (fake_slurm / "squeue.out").write_text("")
    assert watcher.get_state("6", mode="force") == "RUNNING"
    assert watcher.get_state("5_2", mode="cache") == "TIMEOUT"
    assert watcher.get_state("5_1", mode="cache") == "CANCELLED"
    assert len((fake_slurm / "squeue.args").read_text().splitlines()) == 1  # not again


@pytest.mark.unit
def test_watcher_learns_nothing_when_slurmctld_does_not_answer(fake_slurm: Path):
    need("submitit", "slurm")
    from hydra_plugins.housing_reg_launcher.slurm import SqueueWatcher

    watcher = SqueueWatcher(delay_s=600)
    watcher.register_job("8_0")
    (fake_slurm / "sacct.out").write_text(sacct_out())
    (fake_slurm / "squeue.out").write_text("")
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Unable to contact slurm")
    (fake_slurm / "squeue.rc").write_text("1")
    assert watcher.get_state("8_0", mode="force") == "UNKNOWN"
    assert not watcher.is_done("8_0", mode="cache")  # not taken for cancelled
    # squeue's own refusal of a job id it has forgotten is an answer: the job left the queue.
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Invalid job id specified")
    assert watcher.get_state("8_0", mode="force") == "CANCELLED"


# -- Hydra's plugin scan and the CLI, with and without the extra -----------------------------
SCAN = """
import json, sys
if sys.argv[1] == "without":  # as without the `slurm` extra
    for name in ("submitit", "hydra_plugins.hydra_submitit_launcher"):
        sys.modules[name] = None
from hydra.core.plugins import Plugins
scanned = sorted(Plugins.instance().class_name_to_class)
from housing_reg.cli import register_launchers
register_launchers()
plugins = Plugins.instance().class_name_to_class
slurm = sys.modules["hydra_plugins.housing_reg_launcher.slurm"]
name = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
print(json.dumps({
    "scanned": scanned,
    "registered": sorted(plugins),
    "same_class": plugins.get(name) is slurm.SlurmLauncher,
}))
"""


def scan(extra: str) -> tuple[dict, str]:
    """Hydra's own plugin scan in a fresh interpreter, src/ first on sys.path so that it sees
    src/hydra_plugins as an installed wheel's would be seen (an editable install hides it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", SCAN, extra], env=env, text=True, capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


@pytest.mark.cli
def test_without_the_extra_the_scan_passes_over_the_launcher_quietly():
    found, stderr = scan("without")
    assert "hydra_plugins.housing_reg_launcher.ForkLauncher" in found["scanned"]
    assert not [n for n in found["registered"] if "SlurmLauncher" in n]
    assert "Error importing" not in stderr and "Hydra plugins scanner" not in stderr, stderr


@pytest.mark.cli
def test_with_the_extra_the_scan_and_the_cli_register_one_launcher():
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    found, stderr = scan("with")
    ours = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
    assert ours in found["scanned"] and ours in found["registered"]
    assert found["same_class"]  # the one its jobs unpickle by name
    assert "Error importing" not in stderr and "Hydra plugins scanner" not in stderr, stderr


@pytest.mark.cli
def test_without_the_extra_the_slurm_preset_names_the_extra(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy\n"
            "for m in ('submitit', 'hydra_plugins.hydra_submitit_launcher'):\n"
            "    sys.modules[m] = None\n"
            "sys.argv = ['housing_reg.train', '-m', 'hydra/launcher=slurm', 'head=relu']\n"
            "runpy.run_module('housing_reg.train', run_name='__main__')\n",
        ],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm needs the `slurm` extra: pip install -e '.[slurm]' "
        "(or EXTRAS=dev,slurm ./run setup)"
    ]
    assert not list(tmp_path.iterdir())
