"""A job that a launcher lost: Slurm ended it without a result (scancel, the time limit, out
of memory, a node failure). `NoResult` stands in for its JobReturn so that the sweep goes on,
and `record_lost_job` writes the failure.json it could not write itself, so that the sweep's
summary lists it. hydra/launcher=slurm makes them; the fused sweeper records each job of a
lost group task (hydra_plugins/housing_reg_launcher/).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from housing_reg.jobdir import write_json


@dataclass
class NoResult(JobReturn):
    """Stands in for a job that Slurm ended without a result, so that the sweep goes on."""

    job_dir: str = ""
    slurm_id: str = ""
    state: str = ""
    log: str = ""


def record_lost_job(job: NoResult) -> None:
    """failure.json for a job that left no record of its own: it never started, or was killed."""
    path = Path(job.job_dir)
    if (path / "metrics.json").exists() or (path / "failure.json").exists():
        return
    started = (path / ".hydra").is_dir()  # Hydra writes it as the job starts
    if not started:  # say what it would have run, as Hydra would have
        (path / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(list(job.overrides or [])), path / ".hydra/overrides.yaml")
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


def report_lost(jobs: Sequence[NoResult]) -> None:
    if not jobs:
        return
    lines = [f"Slurm ended {len(jobs)} job(s) without a result:"]
    for job in jobs:
        log_file = f"; its log: {job.log}" if job.log else ""
        lines.append(f"  {Path(job.job_dir).name}: Slurm job {job.slurm_id} {job.state}{log_file}")
    print("\n".join(lines), file=sys.stderr)
