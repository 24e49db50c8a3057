"""Every setting checked before anything is built, and config nodes turned into objects.

A nonsensical value costs the user one line that names the key, the value and a valid range,
never a traceback from deep inside PyTorch or Lightning.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from housing_reg.data import DataError, check_settings
from housing_reg.record import RecordError


class ConfigError(ValueError):
    """A hyperparameter that makes no sense; the message names the key and a valid range."""


# Failures caused by the user's data or settings (NaN loss included): one line, no traceback.
USER_ERRORS = (ConfigError, DataError, RecordError, FloatingPointError)

# Numeric settings and whether they must be whole numbers: `data.batch_size=abc` should say
# so, not fail deep inside Lightning with a TypeError.
NUMERIC_KEYS = {
    "seed": int,
    "threads": int,
    "checkpoint_every": int,
    "trainer.max_epochs": int,
    "optim.lr": float,
    "model.replicas": int,
    "data.batch_size": int,
    "data.steps_per_block": int,
    "data.test_split": float,
    "data.split_seed": int,
    "data.val_fraction": float,
    "data.num_folds": int,
    "data.fold": int,
}
# What a job reads at the top level; anything else (`+lrr=0.1`) is a typo.
TOP_LEVEL = {
    "data",
    "model",
    "head",
    "optim",
    "trainer",
    "callbacks",
    "logger",
    "seed",
    "threads",
    "output_dir",
    "checkpoint_every",
    "resume",
    "ckpt_path",
    "fuse",
}


def check_config(cfg: DictConfig) -> None:
    """Reject nonsense before any data is read or a model built."""
    unknown = sorted(set(cfg) - TOP_LEVEL)
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not a setting of housing_reg; "
            f"the top-level settings are {', '.join(sorted(TOP_LEVEL))}"
        )
    for key, kind in NUMERIC_KEYS.items():
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float)):
            raise ConfigError(f"{key}={v!r} must be {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(v):
            raise ConfigError(f"{key}={v} must be a finite number")
    for key in ("seed", "data.split_seed"):
        if not 0 <= OmegaConf.select(cfg, key) < 2**31:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be in [0, 2**31)")
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0 (e.g. optim.lr=1e-3)")
    hidden = cfg.model.hidden
    if (
        not OmegaConf.is_list(hidden)
        or not hidden
        or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)
    ):
        shown = OmegaConf.to_container(hidden) if OmegaConf.is_list(hidden) else hidden
        raise ConfigError(
            f"model.hidden={shown} must be a non-empty list of positive whole layer widths, "
            "e.g. model.hidden=[64,64]"
        )
    if cfg.model.replicas < 1:
        raise ConfigError(f"model.replicas={cfg.model.replicas} must be >= 1")
    if cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be >= 1")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every={cfg.checkpoint_every} must be >= 0 (0: never)")
    if cfg.ckpt_path is not None and not str(cfg.ckpt_path):
        raise ConfigError("ckpt_path is empty; point it at a job's checkpoints/last.ckpt")
    check_arguments(cfg.optim, "optim")
    d = cfg.data
    try:
        check_settings(
            d.test_split,
            d.val_fraction,
            d.num_folds,
            d.fold,
            d.batch_size,
            d.steps_per_block,
            d.target_scaling,
            d.target_range,
        )
    except DataError as e:
        raise ConfigError(str(e)) from None


def check_arguments(node: DictConfig, group: str) -> None:
    """Each key of a `_target_` node is an argument its class takes: `+optim.lrr=0.1` is a
    typo, which the optimizer would otherwise reject with a traceback."""
    cls = get_class(node._target_)
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in node:
        if not str(key).startswith("_") and key not in params:
            valid = [p for p in params if p not in ("self", "params")]
            raise ConfigError(
                f"{group}.{key}: {node._target_} has no such setting; "
                f"its settings are {', '.join(valid)}"
            )


def create(node: DictConfig, **kwargs: Any) -> Any:
    """instantiate(), letting our one-line errors out unwrapped (Hydra wraps them in its own),
    and turning an unknown key into one line that names it."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(cause or e))
        if unexpected:
            raise ConfigError(
                f"{unexpected.group(1)}: not a setting of {node.get('_target_')}; "
                "check the spelling of the key you added"
            ) from None
        raise
