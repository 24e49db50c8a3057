"""Train and test one job: `python -m housing_reg.train [overrides]`, or `-m` for a sweep.

`train(cfg)` is a plain function (tests call it with a composed config): build, fit, test.
The job's files are written by record.JobRecorder; the command line's policy (exit codes,
one-line errors, the sweep summary) lives in cli.py, and `main` is the thin Hydra wrapper.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from housing_reg import cli
from housing_reg.data import RegressionData
from housing_reg.model import Regressor, replica_seeds
from housing_reg.record import (
    CHECKPOINT,
    JobRecorder,
    load_checkpoint,
    read_job,
    training_settings,
)
from housing_reg.settings import ConfigError, check_config, create

log = logging.getLogger(__name__)


def build(cfg: DictConfig) -> tuple[RegressionData, Regressor, L.Trainer, JobRecorder]:
    """Config -> data module, model, trainer and the job's recorder."""
    check_config(cfg)
    torch.set_num_threads(cfg.threads)  # 64-wide matmuls: threads cost more than they give
    L.seed_everything(cfg.seed, verbose=False)
    data: RegressionData = create(cfg.data, seeds=replica_seeds(cfg.seed, cfg.model.replicas))
    model: Regressor = create(
        model_settings(cfg),
        _convert_="all",  # plain lists in the checkpoint's hyperparameters
        head=create(cfg.head.activation),
        optimizer=create(cfg.optim),
        seed=cfg.seed,
        head_name=cfg.head.name,
        **data.model_inputs(),
    )
    recorder = JobRecorder(cfg.output_dir, resolved(cfg), cfg.checkpoint_every)
    callbacks = [recorder, *(create(c) for c in cfg.callbacks.values() if c is not None)]
    trainer: L.Trainer = create(
        cfg.trainer,
        logger=create(cfg.logger),
        callbacks=callbacks,
        limit_val_batches=1.0 if data.has_validation else 0,  # 0: no validation loop at all
    )
    return data, model, trainer, recorder


def model_settings(cfg: DictConfig) -> DictConfig:
    """cfg.model, resolved, without `width`: hparams_search=optuna searches model.width and
    sets model.hidden from it, and the model takes only hidden."""
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("width", None)
    return OmegaConf.create(node)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training rows, test on the held-out rows; returns metrics.json's contents."""
    finished = already_finished(cfg)
    if finished is not None:
        log.info("resume=true: %s already finished; not rerun", cfg.output_dir)
        return finished
    data, model, trainer, recorder = build(cfg)
    ckpt_path = checkpoint_to_resume(cfg)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:  # Lightning's graceful stop on Ctrl-C / SIGTERM
        if not trainer.interrupted:
            raise
        done = len(recorder.history["train/mae"])
        raise cli.Interrupted(
            f"interrupted with {done} of {cfg.trainer.max_epochs} epochs done"
        ) from None
    trainer.test(model, datamodule=data, verbose=False)
    return recorder.metrics


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """What ran, with every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True)


def already_finished(cfg: DictConfig) -> dict[str, Any] | None:
    """resume=true on a job that finished with these very settings: its metrics, untouched."""
    if not cfg.resume or cfg.ckpt_path:
        return None
    job = read_job(Path(cfg.output_dir))
    if job.status != "ok":
        return None
    same = training_settings(job.metrics["config"]) == training_settings(resolved(cfg))
    done = job.metrics["epochs"] == cfg.trainer.max_epochs
    return job.metrics if same and done else None


def checkpoint_to_resume(cfg: DictConfig) -> Path | None:
    """ckpt_path, else (resume=true) the job's own last checkpoint, refused unless it was
    trained with these settings (all but trainer.max_epochs and cosmetic ones)."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = Path(cfg.output_dir) / CHECKPOINT
        if not path.is_file():
            log.warning("resume=true: no checkpoint at %s yet, starting from scratch", path)
            return None
    else:
        return None
    saved = load_checkpoint(path).get("callbacks", {}).get(JobRecorder.__qualname__, {})
    if "config" not in saved:
        raise ConfigError(f"{path} records no settings to check against; train afresh")
    differ = differences(saved["config"], training_settings(resolved(cfg)))
    if differ:
        raise ConfigError(
            f"{path} was trained with other settings ({'; '.join(differ)}); resume with the "
            "settings it was trained with (only trainer.max_epochs may change), or train afresh "
            "in another directory"
        )
    return path


def differences(there: dict[str, Any], here: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old there, new here` for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(there) | set(here)):
        a, b = there.get(key), here.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} there, {b} here")
    return out


@hydra.main(version_base="1.3", config_path="pkg://housing_reg.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return cli.run_job(train, cfg)


if __name__ == "__main__":
    cli.start(main)
