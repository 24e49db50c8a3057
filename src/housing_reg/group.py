"""A fused sweep's group task: the protocol between the fused sweeper, which writes the
composed configs of a group of jobs to SWEEP/.fused/K/group.pkl, and the task that trains them
(train.main with fuse.group set), which sets up each job's directory as Hydra's run_job would
and returns one value per job.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from housing_reg import startup
from housing_reg.jobdir import GROUPS


def write(sweep_dir: Path, number: int, jobs: Sequence[DictConfig]) -> Path:
    """The group's job configs (composed, numbered, their directories resolved) for its task."""
    path = sweep_dir / GROUPS / str(number) / "group.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(list(jobs)))
    return path


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config without its hydra node, as Hydra's run_job makes it."""
    return copy_keeping(cfg, lambda key: key != "hydra")


def hydra_config(cfg: DictConfig) -> DictConfig:
    """The job's hydra node alone, {hydra: ...}, as run_job's JobReturn holds it."""
    return copy_keeping(cfg, lambda key: key == "hydra")


def copy_keeping(cfg: DictConfig, keep: Callable[[str], bool]) -> DictConfig:
    """A copy of cfg (by pickle: a third of deepcopy's time) with the other top-level keys
    deleted, as run_job deletes the hydra node from its copy."""
    copy = pickle.loads(pickle.dumps(cfg))
    with read_write(copy), open_dict(copy):
        for key in [k for k in copy if not keep(str(k))]:
            del copy[key]
    return copy


def save_hydra_files(job: DictConfig, meta: Path) -> None:
    """.hydra/config.yaml, hydra.yaml and overrides.yaml, as Hydra's run_job writes them."""
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "config.yaml").write_text(OmegaConf.to_yaml(task_config(job)))
    (meta / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_config(job)))
    (meta / "overrides.yaml").write_text(OmegaConf.to_yaml(job.hydra.overrides.task))


def run_group(path: str, run: Callable[[list[DictConfig]], list[Any]]) -> dict[int, Any]:
    """The group task: each job's directory set up as Hydra's run_job would (.hydra/ with its
    config, hydra config and overrides; its train.log), then run(configs) on the jobs'
    resolved configs; returns {job number: value}."""
    group: list[DictConfig] = pickle.loads(Path(path).read_bytes())
    startup.starting(job.hydra.runtime.output_dir for job in group)  # a Ctrl-C now: discarded
    configs, handlers = [], []
    root = logging.getLogger()
    try:
        for job in group:
            HydraConfig.instance().set_config(job)  # ${hydra:...} now resolves to this job's
            out = Path(job.hydra.runtime.output_dir)
            if job.hydra.output_subdir is not None:
                save_hydra_files(job, out / str(job.hydra.output_subdir))
            handler = logging.FileHandler(out / f"{job.hydra.job.name}.log")
            handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
            root.addHandler(handler)
            handlers.append(handler)
            task = task_config(job)
            OmegaConf.resolve(task)  # ${hydra:...} with this job's values, set above
            configs.append(task)
        values = run(configs)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    return {int(job.hydra.job.num): v for job, v in zip(group, values, strict=True)}
