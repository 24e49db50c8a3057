"""hydra/launcher=slurm's launcher (src/hydra_plugins/housing_reg_launcher/slurm.py) without a
cluster: how it collects jobs, its watcher (sacct, then squeue) against stand-in sacct and
squeue commands, that every submitit_slurm key reaches submitit, and that Hydra's plugin scan
and the CLI find it with the `slurm` extra and pass over it quietly without.
tests/test_slurm.py runs it on a real one-node Slurm.

Each test runs with only the dev extra as well (it blocks the plugin's modules itself), but
the two that need the extra's submitit and plugin.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from housing_reg.lost import NoResult
from hydra_plugins.housing_reg_launcher.slurm import SlurmWatcher, collect, ended, sacct_ids

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

    def is_done(self, job_id: str) -> bool:
        self.asked.append(job_id)
        return self.states.get(job_id, "PENDING") not in ("PENDING", "RUNNING")

    def state(self, job_id: str) -> str:
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
        def is_done(self, job_id: str) -> bool:
            if job_id == late.job_id and self.asked.count(job_id) == 1:
                late.paths.result_pickle.write_text("r2")  # a moment after Slurm said so
            return super().is_done(job_id)

    watcher = LateFile(
        {"7_1": "CANCELLED by 0", "7_2": "COMPLETED", "7_3": "TIMEOUT", "7_0": "COMPLETED"}
    )
    returns = collect([done, cancelled, late, timed_out], watcher, result_wait_s=0.6, pause_s=0.2)

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
    # Lost only after result_wait_s: Slurm was asked again meanwhile, not just once.
    assert watcher.asked.count(cancelled.job_id) > 1


@pytest.mark.unit
def test_collect_does_not_depend_on_what_a_task_stands_for(tmp_path: Path):
    """Hydra's Launcher contract, whatever each override list means (a fused sweeper's task
    may stand for several jobs): as many returns as jobs, in submission order, even when a
    later job finishes first."""
    jobs = [FakeJob(tmp_path / "f", f"9_{i}") for i in range(5)]
    for i, job in reversed(list(enumerate(jobs))):
        job.paths.result_pickle.write_text(f"task {i}")
    assert collect(jobs, FakeWatcher({}), result_wait_s=0) == [f"task {i}" for i in range(5)]


@pytest.mark.unit
def test_a_job_ends_in_any_state_but_slurms_unfinished_ones():
    for state in ("COMPLETED", "CANCELLED by 0", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
        assert ended(state), state
    for state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED", "UNKNOWN", ""):
        assert not ended(state), state


# -- the watcher: sacct first, squeue for what sacct does not list ---------------------------
@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """sacct and squeue on PATH that print what the test writes to sacct.out and squeue.out
    (and to stderr what it writes to .err; they exit with .rc); both log their arguments."""
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


def calls(fake_slurm: Path, name: str) -> list[list[str]]:
    """The arguments of each call of the fake command, in order."""
    path = fake_slurm / f"{name}.args"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def sacct_out(*rows: str) -> str:
    return "".join(f"{r}\n" for r in rows)


@pytest.mark.unit
def test_sacct_ids_expands_an_arrays_pending_record():
    assert sacct_ids("6") == ["6"] and sacct_ids("5_0") == ["5_0"]
    assert sacct_ids("5_[2]") == ["5_2"]
    assert sacct_ids("5_[2-4,7%1]") == ["5_2", "5_3", "5_4", "5_7"]
    for step_or_other in ("5_0.batch", "5_0.extern", "6.0", "JobID", "", "5_[2-]"):
        assert sacct_ids(step_or_other) == [], step_or_other


@pytest.mark.unit
def test_watcher_asks_squeue_about_jobs_sacct_does_not_list(fake_slurm: Path):
    watcher = SlurmWatcher(["5_0", "5_1", "5_2", "6"], poll_s=600)
    # Slurm 22.05: task 1 was cancelled while pending and has no record; the array's pending
    # record still names task 2; job 6 was just submitted and sacct does not list it yet.
    (fake_slurm / "sacct.out").write_text(
        sacct_out("5_0|RUNNING", "5_0.batch|RUNNING", "5_[2%1]|PENDING")
    )
    (fake_slurm / "squeue.out").write_text("5_0|RUNNING\n5_2|PENDING\n6|PENDING\n")
    watcher.update()
    assert [watcher.state(j) for j in ("5_0", "5_1", "5_2", "6")] == [
        "RUNNING",
        "CANCELLED",
        "PENDING",
        "PENDING",
    ]
    assert watcher.is_done("5_1") and not watcher.is_done("6")  # not time to ask yet
    assert calls(fake_slurm, "sacct")[0][-4:] == ["-j", "5", "-j", "6"]  # by array
    assert calls(fake_slurm, "squeue")[0][-2:] == ["-j", "5_1,6"]  # only what sacct missed

    # Once sacct lists a job, its word wins; squeue is asked only about unlisted jobs, and
    # Slurm only about jobs not known to have ended (5_1 is not asked about again).
    (fake_slurm / "sacct.out").write_text(sacct_out("5_0|COMPLETED", "5_2|TIMEOUT", "6|RUNNING"))
    (fake_slurm / "squeue.out").write_text("")
    watcher.update()
    assert [watcher.state(j) for j in ("5_0", "5_1", "5_2", "6")] == [
        "COMPLETED",
        "CANCELLED",
        "TIMEOUT",
        "RUNNING",
    ]
    assert len(calls(fake_slurm, "squeue")) == 1  # not again
    (fake_slurm / "sacct.out").write_text(sacct_out("6|CANCELLED by 0"))
    watcher.update()
    assert calls(fake_slurm, "sacct")[-1][-2:] == ["-j", "6"]
    assert watcher.is_done("6") and watcher.state("6") == "CANCELLED by 0"
    watcher.update()  # every job ended: nothing to ask
    assert len(calls(fake_slurm, "sacct")) == 3


@pytest.mark.unit
def test_watcher_learns_nothing_when_slurmctld_does_not_answer(fake_slurm: Path):
    watcher = SlurmWatcher(["8_0"], poll_s=600)
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "squeue.out").write_text("")
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Unable to contact slurm")
    (fake_slurm / "squeue.rc").write_text("1")
    watcher.update()
    assert watcher.state("8_0") == "UNKNOWN"
    assert not watcher.is_done("8_0")  # not taken for cancelled
    # squeue's own refusal of a job id it has forgotten is an answer: the job left the queue.
    (fake_slurm / "squeue.err").write_text("slurm_load_jobs error: Invalid job id specified")
    watcher.update()
    assert watcher.state("8_0") == "CANCELLED"


@pytest.mark.unit
def test_without_accounting_the_watcher_goes_by_squeue_and_says_so_once(
    fake_slurm: Path, caplog: pytest.LogCaptureFixture
):
    """A cluster without accounting: sacct fails at every poll; the watcher warns when it
    stops answering (not at each poll, and again only after it answered meanwhile) and asks
    squeue about every unfinished job."""
    watcher = SlurmWatcher(["3_0", "3_1"], poll_s=600)
    (fake_slurm / "sacct.out").write_text("")
    (fake_slurm / "sacct.err").write_text("sacct: error: Slurm accounting storage is disabled")
    (fake_slurm / "sacct.rc").write_text("1")
    (fake_slurm / "squeue.out").write_text("3_0|RUNNING\n")
    with caplog.at_level(logging.WARNING):
        watcher.update()
        watcher.update()
    assert [watcher.state(j) for j in ("3_0", "3_1")] == ["RUNNING", "CANCELLED"]
    assert calls(fake_slurm, "squeue")[-1][-2:] == ["-j", "3_0"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert (
        "sacct did not answer (exit status 1: sacct: error: Slurm accounting storage is "
        in (warnings[0])
    )
    (fake_slurm / "sacct.rc").write_text("0")
    (fake_slurm / "sacct.out").write_text(sacct_out("3_0|RUNNING"))
    with caplog.at_level(logging.WARNING):
        watcher.update()
        (fake_slurm / "sacct.rc").write_text("1")
        watcher.update()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


@pytest.mark.unit
def test_watcher_asks_on_submitits_schedule(fake_slurm: Path):
    """Asked as often as collect likes (each second here), the watcher asks Slurm at once,
    then when more than half the time since the submission has passed since it last asked
    (2 s at least), and at most every poll_s seconds: asking a long sweep every 10 minutes
    by default, a fresh one every few seconds."""
    now = [0.0]
    watcher = SlurmWatcher(["4_0"], poll_s=10, clock=lambda: now[0])
    (fake_slurm / "sacct.out").write_text(sacct_out("4_0|RUNNING"))
    asked = []
    for second in range(60):
        now[0] = float(second)
        before = len(calls(fake_slurm, "sacct"))
        assert not watcher.is_done("4_0")
        if len(calls(fake_slurm, "sacct")) > before:
            asked.append(second)
    assert asked == [0, 3, 7, 15, 26, 37, 48, 59]


# -- the launcher's settings ----------------------------------------------------------------
@pytest.mark.unit
def test_every_submitit_slurm_key_reaches_submitit(tmp_path: Path):
    """The launcher takes every key of hydra-submitit-launcher's submitit_slurm (its schema
    extends the plugin's) and hands each to submitit's executor, which refuses an unknown
    one: the schema's defaults and a value for each key that is None by default."""
    need("submitit", "slurm")
    from omegaconf import OmegaConf

    from hydra_plugins.housing_reg_launcher.slurm import SlurmConf, SlurmLauncher

    params = OmegaConf.to_container(OmegaConf.structured(SlurmConf), resolve=False)
    assert params.pop("_target_") == "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
    assert {"poll_s", "result_wait_s", "partition", "account", "qos", "array_parallelism"} <= set(
        params
    )
    given = {
        "submitit_folder": str(tmp_path / ".submitit/%j"),
        "name": "job",
        "partition": "cpu",
        "qos": "normal",
        "comment": "c",
        "constraint": "x86",
        "exclude": "n1",
        "gres": "gpu:1",
        "cpus_per_gpu": 2,
        "gpus_per_task": 1,
        "mem_per_gpu": "4G",
        "mem_per_cpu": "1G",
        "account": "lab",
        "cpus_per_task": 2,
        "gpus_per_node": 1,
        "mem_gb": 4,
        "max_num_timeout": 3,
        "additional_parameters": OmegaConf.create({"mail-type": "END"}),
        "setup": OmegaConf.create(["echo start"]),
        "poll_s": 5,
        "result_wait_s": 1,
    }
    assert set(given) <= set(params)
    launcher = SlurmLauncher(**{**params, **given})
    assert (launcher.poll_s, launcher.result_wait_s) == (5, 1)
    assert launcher.params["additional_parameters"] == {"mail-type": "END"}  # plain containers
    assert "poll_s" not in launcher.params
    launcher.executor()  # submitit raises on a key it does not know


# -- Hydra's plugin scan and the CLI, with and without the extra -----------------------------
SCAN = """
import json, sys
if sys.argv[1] == "without":  # as without the `slurm` extra
    for name in ("submitit", "hydra_plugins.hydra_submitit_launcher"):
        sys.modules[name] = None
from hydra.core.plugins import Plugins
plugins = Plugins.instance().class_name_to_class
scanned = sorted(plugins)
slurm = sys.modules["hydra_plugins.housing_reg_launcher.slurm"]
name = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
print(json.dumps({
    "scanned": scanned,
    "registered": sorted(plugins),
    "same_class": plugins.get(name) is slurm.SlurmLauncher,
}))
"""


def scan(extra: str) -> tuple[dict, str]:
    """Hydra's own plugin scan in a fresh interpreter, with the package installed as ./run
    installs it (editable, in setuptools' strict mode: a tree of links Hydra's scan can walk)."""
    proc = subprocess.run(
        [sys.executable, "-c", SCAN, extra], text=True, capture_output=True, timeout=120
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
def test_with_the_extra_hydras_own_scan_finds_every_plugin_of_ours():
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    found, stderr = scan("with")
    ours = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
    assert ours in found["scanned"]
    fused = "hydra_plugins.housing_reg_launcher.fused."
    for name in ("FusedSweeper", "FusingLauncher", "FusedOptunaSweeper"):
        assert fused + name in found["scanned"], name
    assert found["same_class"]  # the class that hydra.launcher._target_ names
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
