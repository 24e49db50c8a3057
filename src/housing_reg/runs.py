"""How a job's run ends, alone or in a fused sweep's group: what it records (failure.json),
what it says (one line, or the result), its exit status, and what a sweeper reads back."""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from housing_reg import startup
from housing_reg.jobdir import write_failure
from housing_reg.settings import USER_ERRORS
from housing_reg.startup import Interrupted, NotStarted
from housing_reg.sweep import Sweep, resume_args, unlock

log = logging.getLogger("housing_reg")


def run_job(train_jobs: Callable[[list[DictConfig]], list[Any]], cfg: DictConfig) -> float | None:
    """One job as Hydra runs it: alone it prints its result or one line and exits non-zero
    (a bug shows its traceback); in a sweep, run_jobs' policy."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    ((value, outcome),) = run_jobs(train_jobs, [cfg], multirun)
    if not multirun and isinstance(outcome, BaseException):
        if isinstance(outcome, (*USER_ERRORS, OSError)):  # OSError: a full disk, a bad path
            sys.exit(f"error: {one_line(outcome)}")
        raise outcome  # a bug: show the traceback
    if not multirun:
        unit = outcome.get("target", {}).get("unit", "")
        print(
            f"test MAE {outcome['test/mae']:.3f}{' ' + unit if unit else ''} "
            f"(train {outcome['train/mae']:.3f}); results in {cfg.output_dir}"
        )
    return value


def run_jobs(
    train_jobs: Callable[[list[DictConfig]], list[Any]],
    cfgs: list[DictConfig],
    multirun: bool = True,
) -> list[tuple[float | None, Any]]:
    """Jobs that train together (a fused sweep's group, or one job): each job's value for a
    sweeper and its outcome (metrics.json's contents, or the error that failed it). A failed
    job is recorded (failure.json) and, in a sweep, logged while the others go on; Ctrl-C
    records every unfinished job as interrupted and stops, with the command that continues."""
    Job.started = True
    startup.starting([cfg.output_dir for cfg in cfgs])
    startup.guard()  # until training starts, Ctrl-C stops at once (startup.py)
    quiet_known_warnings()
    # A job's log file sits in its directory: on a full disk, a failed write to it must not
    # print a stack trace (the error line still reaches the console).
    logging.raiseExceptions = False
    try:
        try:
            outcomes = train_jobs(cfgs)
        except KeyboardInterrupt:  # where train_jobs had not got as far as its own handling
            raise NotStarted() from None
    except NotStarted as e:
        for cfg, outcome in zip(cfgs, e.outcomes or [None] * len(cfgs), strict=True):
            if isinstance(outcome, BaseException):  # refused before the Ctrl-C: settled
                record_failure(cfg, "failed", outcome)
        not_started(cfgs, multirun)
    except Interrupted as e:  # stops a sweep too: Ctrl-C means stop
        for cfg, outcome in zip(cfgs, e.outcomes or [None] * len(cfgs), strict=True):
            if outcome is None:
                record_failure(cfg, "interrupted", e)
            elif isinstance(outcome, BaseException):
                record_failure(cfg, "failed", outcome)
        sys.exit(f"error: {e}; to continue, {resume_hint(cfgs[0], multirun)}")
    ends = []
    for cfg, outcome in zip(cfgs, outcomes, strict=True):
        if not isinstance(outcome, BaseException):
            ends.append((objective(outcome), outcome))
            continue
        record_failure(cfg, "failed", outcome)
        ends.append((None, outcome))
        if multirun and not getattr(outcome, "reported", False):  # train.refused said it
            # The sweep goes on; its summary lists the job. A bug's traceback goes to the log.
            expected = isinstance(outcome, (*USER_ERRORS, OSError))
            log.error(
                "job failed: %s: %s",
                Path(cfg.output_dir).name,
                one_line(outcome),
                exc_info=None if expected else outcome,
            )
    return ends


class Job:
    started = False  # whether a job's task has begun in this process (run_jobs)


def not_started(cfgs: list[DictConfig], multirun: bool) -> None:
    """Ctrl-C before training started, seen as an exception (startup.py's handler stops the
    process first wherever it can): the same line, exit status and clean-up as there."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    for cfg in cfgs:
        startup.discard(Path(str(cfg.output_dir)))
    line = startup.NOT_STARTED
    if multirun:
        line += f"; to continue, {resume_hint(cfgs[0], True)}"
    if Sweep.active is not None:
        unlock(Sweep.active)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(startup.EXIT_STATUS)


def quiet_known_warnings() -> None:
    """Two warnings Lightning prints on every run that a user can do nothing about."""
    # Lightning looks for a Slurm job whenever `srun` is on PATH; a job here is one process,
    # also under hydra/launcher=slurm, so there is nothing to launch with srun.
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # lightning 2.6 calls a torch.utils._pytree API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {text}"


def objective(metrics: dict[str, Any]) -> float | None:
    """What a sweeper (hparams_search=optuna) minimizes: validation MAE, never test MAE.

    None without a validation split (and for a failed job): Optuna marks the trial failed.
    """
    value = metrics.get("val/mae")
    return float(value) if value is not None else None


def record_failure(cfg: DictConfig, status: str, e: BaseException) -> None:
    """failure.json in the job dir; where even that cannot be written (a full disk), the
    error line still reaches the user."""
    try:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        retry = status == "interrupted" or not isinstance(e, USER_ERRORS)  # ours: a refusal
        write_failure(out, status, e, OmegaConf.to_container(cfg, resolve=True), retry)
    except Exception as again:
        log.error("could not record the failure in %s: %s", cfg.output_dir, one_line(again))


def resume_hint(cfg: DictConfig, multirun: bool) -> str:
    hc = HydraConfig.get()
    if multirun:
        return f"rerun the sweep with {resume_args(hc.sweep.dir)}"
    args = [a for a in hc.overrides.task if not a.startswith(("resume=", "hydra.run.dir="))]
    return "run: python -m housing_reg.train " + " ".join(
        [*args, "resume=true", f"hydra.run.dir={cfg.output_dir}"]
    )
