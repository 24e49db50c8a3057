"""hydra/launcher=slurm: hydra-submitit-launcher's SlurmLauncher, collecting every job.

The plugin collects results in job order with submitit's job.results(), which raises
UncompletedJobError for a job that Slurm ended before it returned a result (scancel, the time
limit, out of memory, a node failure): the driver stopped there with a traceback, before it
collected the jobs after it and before the sweep's summary. And submitit's job-state watcher
waited forever for a job array's task cancelled while pending, which Slurm (22.05) keeps no
accounting record of. This launcher submits as the plugin does, then collects every job
itself, with a watcher of its own that asks squeue about the jobs sacct does not list:

- a job with a result returns it, as in the plugin;
- a job Slurm ended without one returns a NoResult (return_value None, as a failed job of this
  package returns), gets a failure.json with Slurm's state if it left no record of its own (a
  job stopped by SIGTERM writes failure.json itself; one that never started or was killed
  writes nothing), and .hydra/overrides.yaml if it never started, so that the sweep's summary
  lists it among the failed jobs with the command that finishes the sweep; the launcher names
  each such job on stderr once it has collected them all.

launch() keeps Hydra's Launcher contract: one JobReturn per override list, in their order,
whatever each override list stands for; a lost one's files go where Hydra would have put that
override list's job.

submitit learns that a job ended without a result only from `sacct` (and here `squeue`). The
watcher asks 2, 4, 8, ... s after the submission, then at most every `poll_s` seconds (600 by
default, submitit's own); once Slurm says a job ended, the launcher waits up to
`result_wait_s` (15 s, submitit's own) for its result file, which a network filesystem may show
late. Both are keys of hydra.launcher (conf/hydra/launcher/slurm.yaml).

Without the `slurm` extra this module defines no launcher (SlurmLauncher is None): Hydra's
plugin scan imports every module under hydra_plugins, and an ImportError here would print a
warning on every run.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it puts
# it in sys.modules, and @dataclass looks a string annotation's module up there (AttributeError).
import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf, open_dict

from housing_reg.lost import NoResult, record_lost_job, report_lost

try:  # the `slurm` extra; the plugin's classes and submitit's, pinned in pyproject.toml
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as SubmititSlurmLauncher,
    )
    from submitit.slurm.slurm import SlurmInfoWatcher
except ImportError:  # see the end of the docstring
    SubmititSlurmLauncher = SlurmLauncher = None

log = logging.getLogger(__name__)


def collect(jobs: Sequence[Any], watcher: Any, result_wait_s: float) -> list[JobReturn]:
    """Each submitit job's result (the JobReturn its task returned), in order; a NoResult for
    a job that, by the watcher, ended and has no result file result_wait_s seconds later.

    A job's results() is called only once its result files exist, so submitit never waits on
    its own watcher (its class attribute) for a job here."""
    returns: dict[int, JobReturn] = {}
    ended: dict[int, float] = {}  # when Slurm was first seen to have ended the job
    while len(returns) < len(jobs):
        for i, job in enumerate(jobs):
            if i in returns:
                continue
            if has_result(job):
                returns[i] = job.results()[0]
            elif watcher.is_done(job.job_id):  # asks Slurm when it is time to
                since = ended.setdefault(i, time.monotonic())
                if time.monotonic() - since >= result_wait_s:
                    returns[i] = lost(job, watcher.get_state(job.job_id, mode="cache"))
        if len(returns) < len(jobs):
            time.sleep(1)
    return [returns[i] for i in range(len(jobs))]


def has_result(job: Any) -> bool:
    """Every task of the job has written its result file."""
    folder = job.paths.folder
    # As submitit does: a chmod makes a network filesystem's client see the folder afresh.
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)
    return all(job.task(t).paths.result_pickle.exists() for t in range(job.num_tasks))


def lost(job: Any, state: str) -> NoResult:
    stderr = job.paths.stderr
    return NoResult(
        status=JobStatus.COMPLETED,  # a sweeper reads return_value: None, as for a failed job
        slurm_id=job.job_id,
        state=state.split()[0] if state else "UNKNOWN",  # "CANCELLED by 0": the uid is not needed
        log=str(stderr) if stderr.exists() else "",
    )


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """squeue's state of each of these jobs that it still knows (a job array's tasks one per
    line); None if it did not answer."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        return None  # slurmctld did not answer
    return dict(line.split("|", 1) for line in proc.stdout.split())


def job_dir(launcher: Any, overrides: list[str], number: int) -> Path:
    """Where Hydra runs the job with these overrides: composed as the job composes it, with
    the sweep's cached values (its time stamp and uid)."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config.hydra.job):
        config.hydra.job.num = number
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


if SubmititSlurmLauncher is not None:

    @dataclass
    class SlurmConf(SlurmQueueConf):
        """The plugin's submitit_slurm settings, with this launcher and its own two."""

        _target_: str = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
        poll_s: float = 600  # Slurm asked at most this often about unfinished jobs
        result_wait_s: float = 15  # for a result file once Slurm says its job ended

    # In a group of its own: a schema for conf/hydra/launcher/slurm.yaml, not a launcher choice.
    ConfigStore.instance().store(
        group="hydra/launcher/schema", name="slurm", node=SlurmConf, provider="housing_reg"
    )

    class SqueueWatcher(SlurmInfoWatcher):
        """submitit's sacct watcher (its polling schedule, its parsing), asking squeue about
        the unfinished jobs the last sacct answer did not list. Slurm (22.05) keeps no
        accounting record of a job array's task cancelled while pending: sacct went on giving
        it the state of the array's pending record, PENDING, forever. A job known to neither
        was cancelled while pending or, on a cluster without accounting, ended a while ago:
        CANCELLED. sacct also lists a just-submitted job a moment late; squeue answers for it
        meanwhile."""

        def __init__(self, delay_s: float) -> None:
            super().__init__(delay_s=delay_s)  # type: ignore[arg-type]  # a float works
            self.jobs: set[str] = set()
            self.listed: set[str] = set()  # by the last sacct answer
            self.queued: dict[str, str] = {}  # squeue's word on jobs sacct did not list

        def register_job(self, job_id: str) -> None:
            super().register_job(job_id)
            self.jobs.add(job_id)

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            info = super().read_info(string)
            self.listed = set(info)
            for job_id in info:
                self.queued.pop(job_id, None)  # sacct's word, once it has one
            return info

        def update(self) -> None:
            super().update()
            unknown = sorted(
                j for j in self.jobs - self.listed if not self.is_done(j, mode="cache")
            )
            states = squeue_states(unknown) if unknown else None
            if states is None:
                return  # nothing to ask, or no answer: nothing learnt, as when sacct fails
            for job_id in unknown:
                self.queued[job_id] = states.get(job_id, "CANCELLED")

        def get_state(self, job_id: str, mode: str = "standard") -> str:
            state = super().get_state(job_id, mode=mode)  # asks Slurm first, when it is time
            return self.queued.get(job_id, state)

    class SlurmLauncher(SubmititSlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher that collects every job (module docstring)."""

        def __init__(self, poll_s: float = 600, result_wait_s: float = 15, **params: Any) -> None:
            super().__init__(**params)
            self.poll_s = poll_s
            self.result_wait_s = result_wait_s

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            jobs = self.submit(job_overrides, initial_job_idx)
            watcher = SqueueWatcher(delay_s=self.poll_s)
            for job in jobs:
                watcher.register_job(job.job_id)
            returns = collect(jobs, watcher, self.result_wait_s)
            lost_jobs = []
            for i, ret in enumerate(returns):
                if isinstance(ret, NoResult):
                    ret.overrides = list(job_overrides[i])
                    ret.job_dir = str(job_dir(self, ret.overrides, initial_job_idx + i))
                    record_lost_job(ret)
                    lost_jobs.append(ret)
            report_lost(lost_jobs)
            return returns

        def submit(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> list[submitit.Job[JobReturn]]:
            """One job array, one task per override list: hydra-submitit-launcher 1.2's launch()
            up to its collection, as it is there."""
            assert self.config is not None
            assert len(job_overrides) > 0
            init = {"folder": self.params["submitit_folder"]}
            if "max_num_timeout" in self.params:
                init["slurm_max_num_timeout"] = self.params["max_num_timeout"]
            executor = submitit.AutoExecutor(cluster="slurm", **init)
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    k if k in shared else f"slurm_{k}": v
                    for k, v in self.params.items()
                    if k not in ("submitit_folder", "max_num_timeout")
                }
            )
            log.info(f"Submitit 'slurm' sweep output dir : {self.config.hydra.sweep.dir}")
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            job_params = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_params.append(
                    (
                        list(overrides),
                        "hydra.sweep.dir",
                        idx,
                        f"job_id_for_{idx}",
                        Singleton.get_state(),
                    )
                )
            return executor.map_array(self, *zip(*job_params, strict=True))
