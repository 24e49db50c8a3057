"""Hydra callbacks that make the scale-out plugins (Ray and Slurm launchers, Optuna sweeper)
safe to use.

The plugins do the scheduling. What they leave to the user, and what a user would otherwise
rediscover by failure, is settled here before the first job starts.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from housing_reg.cli import release


class RayDriver(Callback):
    """Prepares the driver for hydra-ray-launcher (Ray 2.x), before it calls ray.init.

    1. On a running cluster, drops the plugin's 75 MB object store request: ray.init refuses
       it when it connects, because the cluster has its own.
    2. Makes a relative hydra.sweep.dir absolute: each job resolves the sweep dir again on its
       worker, whose working directory is wherever the cluster was started.
    3. Keeps Ray on loopback when it runs here or on 127.0.0.1: Ray swaps 127.0.0.1 for the
       host's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
    4. Sets RAY_AUTH_MODE=token when a token exists: `ray start` then enables token
       authentication for the cluster, but the driver only sends the token in token mode.
    Variables the user has already set are left alone. Other launchers are not touched.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "hydra_ray_launcher" not in str(config.hydra.launcher.get("_target_", "")):
            return
        init = config.hydra.launcher.ray.init
        address = init.get("address")
        with read_write(config), open_dict(config):
            if address is not None:
                init.setdefault("object_store_memory", None)
            pin_sweep_dir(config)
        prepare_ray_env(address)


def pin_sweep_dir(config: DictConfig) -> None:
    """hydra.sweep.dir made absolute, in the config and in the overrides jobs are built from."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if sweep_dir.is_absolute():
        return
    absolute = str(sweep_dir.absolute())
    if "'" in absolute or "\\" in absolute:
        sys.exit(f"error: hydra.sweep.dir={sweep_dir} is relative; pass an absolute path")
    config.hydra.sweep.dir = absolute
    config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{absolute}'")


def prepare_ray_env(address: str | None) -> None:
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS", address)
    if address is None or (address != "auto" and is_loopback(address)):
        # None: the launcher starts a Ray of its own, for this machine only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def is_loopback(address: str) -> bool:
    """True for 127.x.x.x, ::1 and localhost, with or without ray:// and a port."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequireValidation(Callback):
    """Stops an Optuna search before its first trial when there is nothing to minimize.

    The objective is validation MAE (train.objective); without a validation split every trial
    would return None, and Optuna would fail only after running them all.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        data = config.data
        if data.num_folds < 2 and data.val_fraction <= 0:
            release(Path(config.hydra.sweep.dir))  # cli.Sweep locked it a moment ago
            sys.exit(
                "error: hparams_search minimizes val/mae, but data.val_fraction="
                f"{data.val_fraction} and data.num_folds={data.num_folds} leave no validation "
                "rows; set data.val_fraction=0.2 (or data.num_folds=5 data.fold=0)"
            )


@dataclass
class NoResult(JobReturn):
    """Stands in for a Slurm job that ended without a result, so that the sweep goes on."""

    number: int = 0
    job_dir: str = ""
    slurm_id: str = ""
    state: str = ""
    log: str = ""


# The jobs of the running sweep that Slurm ended without a result (the driver is one process).
LOST: list[NoResult] = []


class SlurmDriver(Callback):
    """Under hydra/launcher=slurm, a job that Slurm ends before it returns a result (scancel, the
    time limit, out of memory, a node failure) is reported, and the sweep ends as usual.

    hydra-submitit-launcher collects results in job order with job.results(), which raises
    submitit's UncompletedJobError for such a job: the driver stopped there with a traceback,
    before collecting the jobs after it and before the sweep's summary. Here the driver collects
    every job; for a lost job that left no record of its own (a job stopped by SIGTERM writes
    failure.json itself; one that never started or was killed writes nothing) it writes
    failure.json with Slurm's state, and .hydra/overrides.yaml if the job never started, so that
    the summary lists it among the failed jobs, with the command that finishes the sweep.

    submitit learns that a job ended without a result only from `sacct`: on a cluster without
    accounting it never does, and the driver waits for that job forever. It runs sacct 2, 4,
    8, ... s after the last submission, then at most every 10 minutes, or every `poll_s` seconds
    if set; once sacct says a job ended, it waits up to 15 s (`result_wait_s`) for the job's
    result file, which a network filesystem may show late.
    """

    def __init__(self, poll_s: float | None = None, result_wait_s: float | None = None) -> None:
        self.poll_s = poll_s
        self.result_wait_s = result_wait_s

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        LOST.clear()
        target = str(config.hydra.launcher.get("_target_", ""))
        if not target.endswith("submitit_launcher.SlurmLauncher"):
            return
        collect_lost_jobs()
        from submitit.slurm.slurm import SlurmJob

        # submitit's own settings (class attributes of submitit 1.5's SlurmJob).
        SlurmJob.watcher = slurm_watcher(600 if self.poll_s is None else self.poll_s)
        if self.result_wait_s is not None:
            SlurmJob._results_timeout_s = self.result_wait_s

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Runs before cli.Sweep's (Hydra calls end hooks in reverse), so this comes first.
        if not LOST:
            return
        lines = [f"Slurm ended {len(LOST)} job(s) without a result:"]
        for job in LOST:
            log = f"; its log: {job.log}" if job.log else ""
            lines.append(f"  {Path(job.job_dir).name}: Slurm job {job.slurm_id} {job.state}{log}")
        print("\n".join(lines), file=sys.stderr)


def slurm_watcher(delay_s: float) -> Any:
    """submitit's job-state watcher, which asks sacct, asking squeue about the jobs sacct did not
    list this time. Slurm (22.05) keeps no accounting record of a job array's task cancelled
    while pending: submitit kept the state the array's pending record last gave it, PENDING,
    and waited for it forever."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        def update(self) -> None:
            super().update()
            listed = self.read_info(self._output) if self._output else {}
            unknown = sorted(j for j in self._registered - self._finished if j not in listed)
            if not unknown:
                return
            try:
                proc = subprocess.run(  # -r: a job array's tasks one per line
                    ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(unknown)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (OSError, subprocess.TimeoutExpired):
                return  # no answer: nothing learnt, as when sacct fails
            if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
                return  # slurmctld did not answer: nothing learnt
            queued = dict(line.split("|", 1) for line in proc.stdout.split())
            for job_id in unknown:
                # Known to neither: cancelled while pending (Slurm records no such task of a
                # job array), or, on a cluster without accounting, ended long ago.
                state = queued.get(job_id, "CANCELLED")
                self._info_dict[job_id] = {"JobID": job_id, "State": state}

    return Watcher(delay_s=delay_s)


def collect_lost_jobs() -> None:
    """Make hydra-submitit-launcher return a NoResult for a job that has no result."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    if getattr(BaseSubmititLauncher.launch, "collects_lost_jobs", False):
        return
    launch = BaseSubmititLauncher.launch

    def launch_collecting(
        self: BaseSubmititLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from submitit.core.core import Job
        from submitit.core.utils import UncompletedJobError

        results = Job.results

        def results_or_none(job: Job) -> list[Any]:
            try:
                return results(job)
            except UncompletedJobError:
                return [
                    NoResult(
                        status=JobStatus.COMPLETED,  # the sweeper reads return_value: None
                        slurm_id=job.job_id,
                        state=job.state.split()[0],  # "CANCELLED by 0": the uid is not needed
                        log=str(job.paths.stderr) if job.paths.stderr.exists() else "",
                    )
                ]

        Job.results = results_or_none  # only while this launch collects its jobs
        try:
            returns = launch(self, job_overrides, initial_job_idx)
        finally:
            Job.results = results
        for i, ret in enumerate(returns):
            if isinstance(ret, NoResult):
                ret.number = initial_job_idx + i
                ret.overrides = list(job_overrides[i])
                ret.job_dir = str(job_dir(self, ret.overrides, ret.number))
                record_lost_job(ret)
                LOST.append(ret)
        return returns

    launch_collecting.collects_lost_jobs = True  # type: ignore[attr-defined]
    BaseSubmititLauncher.launch = launch_collecting


def job_dir(launcher: Any, overrides: list[str], number: int) -> Path:
    """Where the job with these overrides writes (or would have written) its files: composed
    as the job composes it, with the sweep's cached values (its time stamp and uid)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config.hydra.job):
        config.hydra.job.num = number
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def record_lost_job(job: NoResult) -> None:
    """failure.json for a job that left no record of its own: it never started, or was killed."""
    from housing_reg.record import write_json

    path = Path(job.job_dir)
    if (path / "metrics.json").exists() or (path / "failure.json").exists():
        return
    started = (path / ".hydra").is_dir()  # Hydra writes it as the job starts
    if not started:  # say what it would have run, as Hydra would have
        (path / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(job.overrides), path / ".hydra" / "overrides.yaml")
    when = "while it ran" if started else "before it started"
    write_json(
        path / "failure.json",
        {
            "status": job.state.lower(),
            "error": f"Slurm job {job.slurm_id} ended {job.state} {when}"
            + (f"; see {job.log}" if job.log else ""),
            "config": None,
            "slurm_job_id": job.slurm_id,
            "slurm_state": job.state,
        },
    )
