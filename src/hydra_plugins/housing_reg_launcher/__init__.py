"""hydra/launcher=parallel: a sweep's jobs in processes forked from the sweep's own.

Hydra's joblib launcher always uses loky, whose fresh workers import torch and Lightning
again (4-6 s each on 2 cores): with a few short jobs, slower than no parallelism at all.
A forked child starts with everything already imported, so a job costs what it costs in the
sweep's own process. One child per job (maxtasksperchild=1): a job that crashes or leaks
takes nothing else with it. Hydra requires launchers to live in the hydra_plugins package.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
_launcher: ForkLauncher | None = None  # what a forked child inherits instead of a pickle


class ForkLauncher(Launcher):
    def __init__(self, n_jobs: int = 2) -> None:
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        global _launcher
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        n = min(self.n_jobs, len(job_overrides))
        log.info(f"Launching {len(job_overrides)} jobs, {n} at a time in forked processes")
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        for idx, overrides in jobs:
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        _launcher = self
        context = multiprocessing.get_context("fork")
        with context.Pool(n, share_threads, (n,), maxtasksperchild=1) as pool:
            return pool.map(_run, jobs, chunksize=1)

    def run(self, idx: int, overrides: list[str]) -> JobReturn:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )


def share_threads(workers: int) -> None:
    """A worker's share of this process's torch threads: a fused fit takes its jobs' threads
    within what its process has (fit.fit_threads), and the workers run side by side."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def _run(job: tuple[int, list[str]]) -> JobReturn:
    return _launcher.run(*job)
