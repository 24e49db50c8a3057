"""Train and test one job: `python -m housing_reg.train [overrides]`, or `-m` for a sweep.

`train(cfg)` is a plain function (tests call it with a composed config): build, fit, test.
The job's files are written by record.JobRecorder; how a run ends (its record, its line, its
exit status) is runs.py's, the command line's front cli.py's, and `main` is the thin Hydra
wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from housing_reg import cli, cores, fuse, group, memory, runs, startup
from housing_reg.fit import fit, fit_threads, threads_changed
from housing_reg.model import denormals_flushed, intra_op_threads
from housing_reg.prepare import fit_key, prepare, shapes
from housing_reg.resume import already_finished
from housing_reg.settings import ConfigError

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training rows, test on the held-out rows; returns metrics.json's contents."""
    (outcome,) = train_jobs([cfg])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def train_jobs(cfgs: Sequence[DictConfig]) -> list[dict[str, Any] | BaseException]:
    """Each job's metrics.json contents, or the error that failed it. Jobs that can share a
    fit (fuse.py) train as its replicas, each with the numbers of its lone run; a job's bad
    settings, or a fit too large for memory (memory.py), fail it before any training starts.
    Ctrl-C raises startup.Interrupted (startup.NotStarted before any training), which carries the
    outcomes so far."""
    outcomes: list[dict[str, Any] | BaseException | None] = [None] * len(cfgs)
    ready = []
    try:
        for i, cfg in enumerate(cfgs):
            try:
                finished = already_finished(cfg)
                if finished is not None:
                    log.info("resume=true: %s already finished; not rerun", cfg.output_dir)
                    outcomes[i] = finished
                else:
                    ready.append(prepare(i, cfg))
            except Exception as e:  # reported now, before any job of the group trains
                refused(cfgs, cfg, e)
                outcomes[i] = e
        cap = fuse.cap(cfgs[0].fuse.max_replicas) if cfgs else 1
        fits = []
        for jobs in fuse.groups(ready, fit_key, lambda j: j.cfg.model.replicas, cap):
            try:  # each job alone fits (prepare): does the fit of them all?
                if len(jobs) > 1:
                    memory.check([j.cfg for j in jobs], [shapes(j.data) for j in jobs])
                fits.append(jobs)
            except ConfigError as e:
                for job in jobs:
                    refused(cfgs, job.cfg, e)
                    outcomes[job.index] = e
    except KeyboardInterrupt:
        stop = startup.NotStarted()
        stop.outcomes = outcomes  # the jobs refused so far are settled
        raise stop from None
    for n, jobs in enumerate(fits, 1):
        try:
            try:
                # With-blocks, not decorators: Ray pickles this module's code by value.
                with denormals_flushed(), intra_op_threads() as set_threads:
                    threads = cores.Watch(fit_threads(jobs), set_threads, threads_changed)
                    if len(cfgs) > 1:
                        models = sum(j.cfg.model.replicas for j in jobs)
                        log.info(
                            "fit %d of %d: %d jobs, %d models, %d thread(s)",
                            *(n, len(fits), len(jobs), models, threads.current),
                        )
                    fitted = fit(jobs, threads)
                for job, outcome in zip(jobs, fitted, strict=True):
                    outcomes[job.index] = outcome
            except KeyboardInterrupt:  # between fits
                raise startup.NotStarted() from None
        except startup.Interrupted as e:
            if isinstance(e, startup.NotStarted) and n > 1:  # earlier fits trained: not nothing
                e = startup.Interrupted(f"interrupted before fit {n} of {len(fits)} started")
            e.outcomes = outcomes
            raise e from None
        except Exception as e:  # a bug: every job of this fit fails, the other fits go on
            for job in jobs:
                outcomes[job.index] = e
    return outcomes


def refused(cfgs: Sequence[DictConfig], cfg: DictConfig, e: Exception) -> None:
    """A job of a group that will not train is logged as it is found, and only then
    (`reported`: runs.run_jobs says no more of it); a lone job's error is runs.py's one line."""
    if len(cfgs) > 1:
        log.error("job %s will not train: %s", Path(str(cfg.output_dir)).name, e)
        e.reported = True


@hydra.main(version_base="1.3", config_path="pkg://housing_reg.conf", config_name="config")
def main(cfg: DictConfig) -> float | dict[int, float | None] | None:
    if cfg.fuse.group:  # a fused sweep's task: several jobs (group.py)
        return group.run_group(
            cfg.fuse.group, lambda cfgs: [v for v, _ in runs.run_jobs(train_jobs, cfgs)]
        )
    return runs.run_job(train_jobs, cfg)


if __name__ == "__main__":
    cli.start(main)
