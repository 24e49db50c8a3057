"""A fit's checkpoint as one ordinary checkpoint per job, and back: JobCheckpoints is the
CheckpointIO plugin Lightning saves and loads through."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from housing_reg.jobdir import CHECKPOINT, RECORD, load_checkpoint, write_atomic
from housing_reg.record import JobRecorder

SCALERS = ("x_shift", "x_scale", "y_shift", "y_scale")


class JobCheckpoints(CheckpointIO):
    """Lightning hands this plugin the fit's checkpoint; it writes each job's share to
    JOB/checkpoints/last.ckpt as an ordinary one-job checkpoint (the job's replicas, its
    scalers, its hyperparameters and recorder state), which evaluate and resume=true read as
    they read a lone run's. Loading reads every job's own checkpoint and stacks them again.
    The `path` Lightning passes is the first job's; each job's own path is used."""

    def __init__(self, jobs: list[JobRecorder], resume_from: list[Path | None]):
        self.jobs, self.resume_from = jobs, resume_from

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options=None):
        for i, job in enumerate(self.jobs):
            if job.error is not None:
                continue
            share = job_share(checkpoint, self.jobs, i)
            try:
                target = job.dir / CHECKPOINT
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, lambda tmp, share=share: tmp.write_bytes(to_bytes(share)))
            except OSError as e:
                job.error = e

    def load_checkpoint(self, path: Any, map_location: Any = None, **kwargs: Any):
        saved = [load_checkpoint(p) for p in self.resume_from]
        return stack_shares(saved, self.jobs)

    def remove_checkpoint(self, path: Any) -> None:
        pass  # each job keeps its own last checkpoint


def job_share(ckpt: dict[str, Any], jobs: list[JobRecorder], i: int) -> dict[str, Any]:
    """Job i's part of a fit's checkpoint, shaped as a lone run of that job saves it."""
    job, total = jobs[i], jobs[-1].replicas.stop
    share = dict(ckpt)
    share["hyper_parameters"] = job.hparams
    share["callbacks"] = {RECORD: ckpt["callbacks"]["FitRecorder"]["jobs"][i]}
    if len(jobs) == 1:
        return share

    def part(t: torch.Tensor) -> torch.Tensor:
        # A copy, not a view: torch.save writes a view's whole storage, every job's replicas.
        return t[job.replicas].clone() if t.dim() and t.shape[0] == total else t

    share["state_dict"] = {
        k: v[job.replicas.start].reshape(-1).clone() if k in SCALERS else part(v)
        for k, v in ckpt["state_dict"].items()
    }
    share["optimizer_states"] = [
        {**o, "state": {p: {k: part(v) for k, v in st.items()} for p, st in o["state"].items()}}
        for o in ckpt["optimizer_states"]
    ]
    return share


def stack_shares(shares: list[dict[str, Any]], jobs: list[JobRecorder]) -> dict[str, Any]:
    """The inverse of job_share: the jobs' checkpoints as one fit's."""
    fit = dict(shares[0])
    fit["callbacks"] = {"FitRecorder": {"jobs": [s["callbacks"][RECORD] for s in shares]}}
    if len(shares) == 1:
        return fit

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors) if tensors[0].dim() else tensors[0]

    sizes = [j.replicas.stop - j.replicas.start for j in jobs]
    fit["state_dict"] = {
        k: torch.cat(
            [
                s["state_dict"][k].reshape(1, 1, -1).expand(n, 1, -1)
                for s, n in zip(shares, sizes, strict=True)
            ]
        )
        if k in SCALERS
        else cat([s["state_dict"][k] for s in shares])
        for k in shares[0]["state_dict"]
    }
    fit["optimizer_states"] = [
        {
            **o,
            "state": {
                p: {k: cat([s["optimizer_states"][n]["state"][p][k] for s in shares]) for k in st}
                for p, st in o["state"].items()
            },
        }
        for n, o in enumerate(shares[0]["optimizer_states"])
    ]
    return fit


def to_bytes(obj: Any) -> bytes:
    """torch.save into memory: written as bytes, a full disk is an OSError (torch.save into a
    file raises a RuntimeError about zip positions instead)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
