"""A job checked and ready to train (its settings, its data read and split, its head, where it
resumes), before anything is built; and which prepared jobs may share a fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from housing_reg import fuse, kernels, memory
from housing_reg.data import RegressionData
from housing_reg.model import replica_seeds
from housing_reg.resume import check_not_replacing, checkpoint_to_resume, resolved
from housing_reg.settings import check_config, create


@dataclass
class Prepared:
    """A job checked and ready to train: its settings, its data and head, where it resumes."""

    index: int
    cfg: DictConfig
    data: RegressionData
    head: torch.nn.Module
    resume_from: Path | None
    progress: tuple[int, int]  # (epoch, step) it resumes from


def prepare(index: int, cfg: DictConfig) -> Prepared:
    """A job's settings checked, its data read, its memory estimated; nothing built yet."""
    check_config(cfg)
    check_not_replacing(cfg)
    data: RegressionData = create(cfg.data, seeds=replica_seeds(cfg.seed, cfg.model.replicas))
    data.setup("fit")  # now, not in trainer.fit: every job's data is checked before any trains
    memory.check([cfg], [shapes(data)])
    head = create(cfg.head.activation)
    resume_from, progress = checkpoint_to_resume(cfg, data.file)
    return Prepared(index, cfg, data, head, resume_from, progress)


def shapes(data: RegressionData) -> dict[str, tuple[int, ...]]:
    """Each split's x shape, for memory.check."""
    return {name: tuple(x.shape) for name, (x, _) in data.splits.items()}


def fit_key(job: Prepared) -> tuple:
    """Jobs share a fit when fuse.py allows it, their splits have the same sizes (folds of
    other sizes do not), they resume from the same epoch, their head learns nothing, no
    schedule follows their own metric (plateau), and this torch's stacked matmul gives a
    replica the same bits wherever it sits in the stack (kernels.stacks_exact)."""
    sizes = tuple(x.shape for x, _ in job.data.splits.values())
    learns = any(True for _ in job.head.parameters())
    plateau = job.cfg.lr_scheduler.name == "plateau"  # follows this job's own val/mae
    alone = job.index if learns or plateau or not stackable(job) else None
    return fuse.fit_key(resolved(job.cfg)), sizes, job.progress, alone


def stackable(job: Prepared) -> bool:
    """Whether every call the job's layers make (a training step's rows, each evaluation
    chunk's) gives a replica its bits wherever it sits in a stack."""
    data = job.data
    rows = {data.batch_size, *(min(len(x), data.eval_batch_size) for x, _ in data.splits.values())}
    sizes = [data.num_features, *job.cfg.model.hidden, 1]
    return kernels.stacks_exact(sorted(r for r in rows if r), sizes)
