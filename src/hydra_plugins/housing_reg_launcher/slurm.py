"""hydra/launcher=slurm: a sweep's jobs as one Slurm job array, every job collected.

A Hydra launcher of this package's own, built on public interfaces only: Hydra's Launcher
(setup, launch) and its job-running path (hydra.core.utils.run_job), the config dataclasses of
hydra-submitit-launcher (its submitit_slurm keys), submitit's public API (AutoExecutor,
map_array, Job.job_id, Job.paths, Job.results) and Slurm's own commands, sacct and squeue.

launch() submits one job array through submitit, one task per override list, and each task
runs its job on the node as hydra-submitit-launcher's jobs run (RunJob: the sweep's config
composed for the overrides, hydra.job.id and num set, run_job; resubmitted by submitit when
the job is preempted or, with max_num_timeout, times out). Then it collects every job itself
(collect). hydra-submitit-launcher's own launcher waits on submitit's job.results(), which
raises UncompletedJobError for a job that Slurm ended before it returned a result (scancel,
the time limit, out of memory, a node failure): its driver stopped there with a traceback,
before the jobs after it and before the sweep's summary. Here:

- a job with a result returns it (job.results(), called once its result files exist);
- a job Slurm ended without one returns a NoResult (return_value None, as a failed job of this
  package returns), gets a failure.json with Slurm's state if it left no record of its own (a
  job stopped by SIGTERM writes failure.json itself; one that never started or was killed
  writes nothing), and .hydra/overrides.yaml if it never started, so that the sweep's summary
  lists it among the failed jobs with the command that finishes the sweep; the launcher names
  each such job on stderr once it has collected them all.

launch() keeps Hydra's Launcher contract: one JobReturn per override list, in their order,
whatever each override list stands for; a lost one's files go where Hydra would have put that
override list's job.

Slurm says that a job ended through `sacct` (SlurmWatcher). `squeue` answers for the jobs the
last sacct answer did not list: Slurm (22.05) keeps no accounting record of a job array's task
cancelled while pending, sacct lists a just-submitted job a moment late, and a cluster without
accounting has no sacct at all. The watcher asks 2, 4, 8, ... s after the submission, then at
most every `poll_s` seconds (600 by default); once Slurm says a job ended, the launcher waits
up to `result_wait_s` (15 s) for its result file, which a network filesystem may show late.
Both are keys of hydra.launcher (conf/hydra/launcher/slurm.yaml).

Without the `slurm` extra this module defines no launcher (SlurmLauncher is None): Hydra's
plugin scan imports every module under hydra_plugins, and an ImportError here would print a
warning on every run.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it puts
# it in sys.modules, and @dataclass looks a string annotation's module up there (AttributeError).
import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from housing_reg.lost import NoResult, record_lost_job, report_lost

try:  # the `slurm` extra: submitit, and the plugin whose submitit_slurm keys this launcher takes
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
except ImportError:  # see the end of the docstring
    submitit = SlurmQueueConf = None

log = logging.getLogger(__name__)

# Slurm's job states in which a job may still return a result: squeue's and sacct's states
# that are not final, and submitit's READY, UNKNOWN (no word yet) and PREEMPTED (a preempted
# job may be requeued). Any other state (COMPLETED, CANCELLED, TIMEOUT, OUT_OF_MEMORY,
# NODE_FAIL, FAILED, BOOT_FAIL, DEADLINE, ...) means that the job ended.
ACTIVE = frozenset(
    ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")
    + ("SUSPENDED", "STOPPED", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT")
    + ("RESV_DEL_HOLD", "PREEMPTED", "READY", "UNKNOWN")
)


def ended(state: str) -> bool:
    """Whether a job in this Slurm state has ended ("CANCELLED by 0": the first word)."""
    return (state.split() or ["UNKNOWN"])[0].upper() not in ACTIVE


# -- collecting: every job, in order ---------------------------------------------------------
def collect(
    jobs: Sequence[Any], watcher: Any, result_wait_s: float, pause_s: float = 1
) -> list[JobReturn]:
    """Each submitit job's result (the JobReturn its task returned), in order; a NoResult for
    a job that, by the watcher, ended and has no result file result_wait_s seconds later.

    The watcher: is_done(job_id), asking Slurm when it is time to, and state(job_id), its last
    word. A job's results() is called only once its result files exist, so that submitit never
    waits for it (and never asks Slurm about it)."""
    returns: dict[int, JobReturn] = {}
    ended_at: dict[int, float] = {}  # when Slurm was first seen to have ended the job
    while len(returns) < len(jobs):
        for i, job in enumerate(jobs):
            if i in returns:
                continue
            if has_result(job):
                returns[i] = job.results()[0]
            elif watcher.is_done(job.job_id):
                since = ended_at.setdefault(i, time.monotonic())
                if time.monotonic() - since >= result_wait_s:
                    returns[i] = lost(job, watcher.state(job.job_id))
        if len(returns) < len(jobs):
            time.sleep(pause_s)
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


# -- asking Slurm ----------------------------------------------------------------------------
class NoAnswer(Exception):
    """A Slurm command that did not answer: not installed, timed out, or failed."""


def slurm(command: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except OSError as e:
        raise NoAnswer(str(e)) from None
    except subprocess.TimeoutExpired:
        raise NoAnswer(f"{command[0]}: no answer in {timeout_s:.0f} s") from None


def failure(proc: subprocess.CompletedProcess) -> str:
    said = proc.stderr.strip().splitlines()
    return f"exit status {proc.returncode}" + (f": {said[-1]}" if said else "")


ARRAY = re.compile(r"(\d+)_\[([0-9,\-]+)(%\d+)?\]")


def sacct_ids(field: str) -> list[str]:
    """The job ids that one of sacct's JobID fields stands for: a job ("6"), an array's task
    ("5_0"), or an array's pending tasks ("5_[2-4,7%1]": 5_2, 5_3, 5_4, 5_7); none for a step
    ("5_0.batch") or anything else."""
    if re.fullmatch(r"\d+(_\d+)?", field):
        return [field]
    match = ARRAY.fullmatch(field)
    if match is None:
        return []
    main, ranges, _ = match.groups()
    ids = []
    for part in ranges.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or dash and not high.isdigit():
            return []
        ids += [f"{main}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def sacct_states(job_ids: Sequence[str]) -> dict[str, str]:
    """sacct's state of every job it lists for the arrays (or jobs) of these job ids; raises
    NoAnswer if it failed (no accounting, slurmdbd down)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    proc = slurm(
        ["sacct", "-X", "-n", "-P", "-o", "JobID,State", *(a for j in arrays for a in ("-j", j))]
    )
    if proc.returncode != 0:
        raise NoAnswer(failure(proc))
    states = {}
    for line in proc.stdout.splitlines():
        field, _, state = line.partition("|")
        for job_id in sacct_ids(field.strip()):
            states[job_id] = state.strip()
    return states


def squeue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """squeue's state of each of these jobs that it still knows (a job array's tasks one per
    line); raises NoAnswer if slurmctld did not answer. squeue refuses a list of ids it has
    all forgotten ("Invalid job id specified"): an answer, that it knows none of them."""
    proc = slurm(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(job_ids)])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise NoAnswer(failure(proc))
    return dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)


class SlurmWatcher:
    """Slurm's word on one launch's jobs, asked for all of them at once when it is time: 2, 4,
    8, ... s after the submission (half the time since), then at most every poll_s seconds,
    as submitit's own watcher asks.

    sacct first, for the arrays of the jobs not known to have ended; then squeue about those
    of them the sacct answer did not list. Slurm (22.05) keeps no accounting record of a job
    array's task cancelled while pending, so sacct never lists it again; sacct also lists a
    just-submitted job a moment late, and a cluster without accounting has no sacct. A job
    known to neither was cancelled while pending or, without accounting, ended a while ago
    (squeue forgets a job MinJobAge after its end): CANCELLED. A command that does not answer
    teaches nothing: the job keeps its last state (UNKNOWN at first, which is not an end)."""

    def __init__(
        self,
        job_ids: Sequence[str],
        poll_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_ids = list(job_ids)
        self.poll_s = poll_s
        self.clock = clock
        self.submitted = clock()
        self.asked = float("-inf")  # when Slurm was last asked
        self.states: dict[str, str] = {}  # the last word on each job
        self.sacct_answers = True  # so far: a warning when it stops

    def state(self, job_id: str) -> str:
        return self.states.get(job_id, "UNKNOWN")

    def is_done(self, job_id: str) -> bool:
        """Whether Slurm says the job ended, asking it first if it is time to."""
        now = self.clock()
        if now - self.asked > min(self.poll_s, max(2.0, (now - self.submitted) / 2)):
            self.update()
        return ended(self.state(job_id))

    def update(self) -> None:
        """Asks Slurm about every job not known to have ended."""
        todo = [j for j in self.job_ids if not ended(self.state(j))]
        if todo:
            self.learn(todo)
        self.asked = self.clock()

    def learn(self, todo: list[str]) -> None:
        try:
            listed = sacct_states(todo)
        except NoAnswer as e:
            if self.sacct_answers:
                log.warning(
                    f"sacct did not answer ({e}); until it does, Slurm's job states come from "
                    "squeue alone, which forgets a job MinJobAge after it ends: such a job is "
                    "taken for cancelled"
                )
            self.sacct_answers, listed = False, {}
        else:
            self.sacct_answers = True
        unlisted = [j for j in todo if j not in listed]
        self.states.update((j, listed[j]) for j in todo if j in listed)
        if not unlisted:
            return
        try:
            queued = squeue_states(unlisted)
        except NoAnswer as e:
            log.debug(f"squeue did not answer ({e})")
            return  # nothing learnt
        self.states.update((j, queued.get(j, "CANCELLED")) for j in unlisted)


# -- where a lost job's records go -----------------------------------------------------------
def job_dir(
    hydra_context: HydraContext, config: DictConfig, overrides: list[str], num: int
) -> Path:
    """Where Hydra runs the job with these overrides: composed as the job composes it, with
    the sweep's cached values (its time stamp and uid)."""
    job = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(job.hydra.job):
        job.hydra.job.num = num
    return Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)


if SlurmQueueConf is not None:

    @dataclass
    class SlurmConf(SlurmQueueConf):
        """hydra-submitit-launcher's submitit_slurm keys, with this launcher and its own two."""

        _target_: str = "hydra_plugins.housing_reg_launcher.slurm.SlurmLauncher"
        poll_s: float = 600  # Slurm asked at most this often about unfinished jobs
        result_wait_s: float = 15  # for a result file once Slurm says its job ended

    # In a group of its own: a schema for conf/hydra/launcher/slurm.yaml, not a launcher choice.
    ConfigStore.instance().store(
        group="hydra/launcher/schema", name="slurm", node=SlurmConf, provider="housing_reg"
    )

    # The keys that submitit's AutoExecutor takes as they are; the others are Slurm's own and
    # take the prefix slurm_ (timeout_min, but slurm_partition), as the plugin passes them.
    SHARED = frozenset(OmegaConf.structured(BaseQueueConf).keys())

    class RunJob:
        """One job of the sweep, run on its node: the sweep's config composed for the job's
        overrides, numbered, and run through Hydra's run_job, as hydra-submitit-launcher runs
        its jobs (Hydra's launchers all run a job so)."""

        def __init__(
            self, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
        ) -> None:
            self.hydra_context = hydra_context
            self.task_function = task_function
            self.config = config

        def __call__(
            self, overrides: list[str], num: int, singleton_state: dict[Any, Any]
        ) -> JobReturn:
            Singleton.set_state(singleton_state)
            setup_globals()
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(config.hydra.job):
                config.hydra.job.id = submitit.JobEnvironment().job_id  # Slurm's: "5_3"
                config.hydra.job.num = num
            HydraConfig.instance().set_config(config)
            return run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )

        def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            """submitit's checkpointing protocol: the job requeued as it was submitted, when
            Slurm preempts it or (with max_num_timeout) its time is up."""
            return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    class SlurmLauncher(Launcher):
        """A sweep's jobs as one Slurm job array, every job collected (module docstring)."""

        def __init__(self, poll_s: float = 600, result_wait_s: float = 15, **params: Any) -> None:
            self.poll_s = float(poll_s)
            self.result_wait_s = float(result_wait_s)
            # The submitit_slurm keys, for submitit: additional_parameters and setup as a plain
            # dict and list, as Hydra hands them over as DictConfig and ListConfig.
            self.params = {
                k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                for k, v in params.items()
            }
            self.config: DictConfig | None = None
            self.hydra_context: HydraContext | None = None
            self.task_function: TaskFunction | None = None

        def setup(
            self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
        ) -> None:
            self.config = config
            self.hydra_context = hydra_context
            self.task_function = task_function

        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            jobs = self.submit(job_overrides, initial_job_idx)
            log.info(f"Slurm job {jobs[0].job_id.split('_')[0]}: {len(jobs)} task(s) submitted")
            watcher = SlurmWatcher([job.job_id for job in jobs], poll_s=self.poll_s)
            returns = collect(jobs, watcher, self.result_wait_s)
            lost_jobs = []
            for i, ret in enumerate(returns):
                if isinstance(ret, NoResult):
                    ret.overrides = list(job_overrides[i])
                    number = initial_job_idx + i
                    where = job_dir(self.hydra_context, self.config, ret.overrides, number)
                    ret.job_dir = str(where)
                    record_lost_job(ret)
                    lost_jobs.append(ret)
            report_lost(lost_jobs)
            return returns

        def executor(self) -> "submitit.AutoExecutor":
            """submitit's executor for Slurm with this launcher's settings."""
            params = dict(self.params)
            folder = params.pop("submitit_folder")
            init = {}
            if "max_num_timeout" in params:  # an executor's setting, not a job's
                init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
            executor = submitit.AutoExecutor(cluster="slurm", folder=folder, **init)
            executor.update_parameters(
                **{k if k in SHARED else f"slurm_{k}": v for k, v in params.items()}
            )
            return executor

        def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
            """One job array, one task per override list; submitit's jobs, in that order."""
            assert self.config is not None and self.hydra_context is not None
            assert len(job_overrides) > 0
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            log.info(f"Slurm sweep output dir : {sweep_dir}")
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
            for num, overrides in zip(numbers, job_overrides, strict=True):
                log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            task = RunJob(self.hydra_context, self.task_function, self.config)
            state = Singleton.get_state()
            return self.executor().map_array(
                task,
                [list(o) for o in job_overrides],
                list(numbers),
                [state] * len(job_overrides),
            )

else:  # see the end of the docstring
    SlurmLauncher = None
