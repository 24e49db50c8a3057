"""Whether a job trains, continues or is left as it is: resume=true and ckpt_path= checked
against what the job's directory and checkpoint record (its settings, its data file, its
epochs), each refusal one line that says how to go on."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from housing_reg.jobdir import CHECKPOINT, RECORD, load_checkpoint, read_state, training_settings
from housing_reg.settings import ConfigError

log = logging.getLogger(__name__)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """What ran, with every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True)


def already_finished(cfg: DictConfig) -> dict[str, Any] | None:
    """resume=true on a job that finished with these very settings: its metrics, untouched."""
    if not cfg.resume or cfg.ckpt_path:
        return None
    job = read_state(Path(cfg.output_dir))
    if job.status != "ok":
        return None
    same = training_settings(job.metrics["config"]) == training_settings(resolved(cfg))
    done = job.metrics["epochs"] == cfg.trainer.max_epochs
    return job.metrics if same and done else None


def check_not_replacing(cfg: DictConfig) -> None:
    """A run into a finished job's directory (without resume=true) would replace its results
    and put a second run's curves beside the first in TensorBoard: refused, in one line."""
    if cfg.resume or cfg.ckpt_path:
        return
    job = read_state(Path(cfg.output_dir))
    if job.status != "ok":
        return
    differ = differences(training_settings(job.metrics["config"]), training_settings(resolved(cfg)))
    if differ:
        raise ConfigError(
            f"{cfg.output_dir} holds a finished job trained with other settings "
            f"({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}); train into "
            "another directory (hydra.run.dir=..., or hydra.sweep.dir=... for a sweep), or "
            "resume=true with the settings it was trained with"
        )
    raise ConfigError(
        f"{cfg.output_dir} holds a finished job with these settings; resume=true keeps it (and "
        "trains only if trainer.max_epochs grew), or train into another directory "
        "(hydra.run.dir=..., or hydra.sweep.dir=... for a sweep)"
    )


def checkpoint_to_resume(
    cfg: DictConfig, data_file: dict[str, str]
) -> tuple[Path | None, tuple[int, int]]:
    """ckpt_path, else (resume=true) the job's own last checkpoint, refused unless it was
    trained with these settings (all but trainer.max_epochs and cosmetic ones); with the
    (epoch, step) it holds."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = Path(cfg.output_dir) / CHECKPOINT
        if not path.is_file():
            log.warning("resume=true: no checkpoint at %s yet, starting from scratch", path)
            return None, (0, 0)
    else:
        return None, (0, 0)
    ckpt = load_checkpoint(path)
    saved = ckpt.get("callbacks", {}).get(RECORD, {})
    if "config" not in saved:
        raise ConfigError(f"{path} records no settings to check against; train afresh")
    differ = differences(saved["config"], training_settings(resolved(cfg)))
    if differ:
        raise ConfigError(
            f"{path} was trained with other settings ({'; '.join(differ)}); resume with the "
            "settings it was trained with (only trainer.max_epochs may change), or train afresh "
            "in another directory"
        )
    trained_on = saved.get("data_file")
    if trained_on and trained_on["sha256"] != data_file["sha256"]:
        raise ConfigError(
            f"{path} was trained on {trained_on['path']}, and {data_file['path']} now holds "
            f"other contents (SHA-256 {trained_on['sha256'][:12]}... then, "
            f"{data_file['sha256'][:12]}... now): its scalers and split no longer fit the "
            "data; train afresh in another directory"
        )
    done = len(saved.get("history", {}).get("train/mae", []))  # whole epochs it holds
    if done > cfg.trainer.max_epochs:
        raise ConfigError(
            f"{path} holds {done} finished epochs, more than trainer.max_epochs="
            f"{cfg.trainer.max_epochs}; resume with trainer.max_epochs>={done}, or train "
            "afresh in another directory"
        )
    return path, (ckpt.get("epoch", 0), ckpt.get("global_step", 0))


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
