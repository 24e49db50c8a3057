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

from housing_reg.csvfile import DIALECT, check_dialect
from housing_reg.data import EVAL_BATCH_SIZE, DataError, check_settings
from housing_reg.jobdir import RecordError


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
    "data.eval_batch_size": int,
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
    "lr_scheduler",
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
    check_fuse(cfg.fuse)
    check_head_range(cfg.head)
    check_trainer(cfg.trainer)
    check_lr_scheduler(cfg)
    d = cfg.data
    try:
        check_settings(
            d.test_split,
            d.val_fraction,
            d.num_folds,
            d.fold,
            d.batch_size,
            d.steps_per_block,
            d.get("eval_batch_size", EVAL_BATCH_SIZE),
            d.target_scaling,
            d.target_range,
        )
        check_dialect(
            d.get("delimiter", DIALECT["delimiter"]), d.get("decimal", DIALECT["decimal"])
        )
    except DataError as e:
        raise ConfigError(str(e)) from None


def check_fuse(fuse: DictConfig) -> None:
    """Every `fuse` key, as the other groups' are checked (settings.py): one line naming it."""
    if not isinstance(fuse.enabled, bool):
        raise ConfigError(f"fuse.enabled={fuse.enabled!r} must be true or false")
    cap = fuse.max_replicas
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(
            f"fuse.max_replicas={cap!r} must be a whole number >= 1 (the most models one fit "
            "trains), or null for no limit"
        )


# Trainer arguments whose meaning the manual, blocked loop changes (one optimizer step per
# mini-batch, blocks of data.steps_per_block of them per Lightning batch, validation on all
# validation rows once per epoch, one process per job): each with Lightning's default, which
# is accepted, and what to use instead. gradient_clip_val, gradient_clip_algorithm and
# enable_checkpointing work (train.trainer_settings); docs/layout.md lists them all.
TRAINER_REFUSED = {
    "accumulate_grad_batches": (
        1,
        "each mini-batch is one optimizer step; for bigger steps raise data.batch_size",
    ),
    "limit_train_batches": (
        1.0,
        "an epoch trains on every training row (it would count blocks of "
        "data.steps_per_block steps); stop sooner with trainer.max_epochs",
    ),
    "max_steps": (-1, "training is counted in epochs here; use trainer.max_epochs"),
    "min_steps": (None, "training is counted in epochs here; use trainer.max_epochs"),
    "val_check_interval": (1.0, "validation runs once per epoch, on every validation row"),
    "check_val_every_n_epoch": (1, "validation runs once per epoch, on every validation row"),
    "limit_val_batches": (None, "validation uses every validation row; set data.val_fraction"),
    "limit_test_batches": (None, "testing uses every test row; set data.test_split"),
    "overfit_batches": (0.0, "an epoch trains on every training row"),
    "devices": (
        1,
        "one process per job; run jobs in parallel with a sweep (-m) and "
        "hydra/launcher=parallel, ray or slurm",
    ),
    "num_nodes": (
        1,
        "one process per job; run jobs in parallel with a sweep (-m) and "
        "hydra/launcher=ray or slurm",
    ),
}


def check_trainer(trainer: DictConfig) -> None:
    """A trainer argument the manual, blocked loop would silently change: one line, before
    anything is built (Lightning would refuse some with a traceback, and count others in
    blocks of steps without a word)."""
    for key, (default, why) in TRAINER_REFUSED.items():
        value = trainer.get(key, default)
        if value != default and not (key == "devices" and value in (1, [0], "1")):
            raise ConfigError(f"trainer.{key}={value} is not supported: {why}")
    algorithm = trainer.get("gradient_clip_algorithm", "norm")
    if algorithm not in ("norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={algorithm} must be norm or value")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
    ):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} must be a number > 0 (or null: no clipping)"
        )


def check_head_range(head: DictConfig) -> None:
    """Every head states its output range (the report draws it and finds predictions stuck
    at its bounds): head.range = [low, high], null for an unbounded side."""
    rng = head.get("range", "missing")
    ok = OmegaConf.is_list(rng) and len(rng) == 2
    ok = ok and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in rng
    )
    if ok and None not in rng:
        ok = rng[0] < rng[1]
    if not ok:
        shown = OmegaConf.to_container(rng) if OmegaConf.is_list(rng) else rng
        raise ConfigError(
            f"head.range={shown}: a head must state its output range as [low, high] with null "
            f"for an unbounded side, e.g. range: [0, 1] in conf/head/{head.get('name')}.yaml"
        )


def check_lr_scheduler(cfg: DictConfig) -> None:
    """plateau follows val/mae: it needs validation rows, and one model per job."""
    sched = cfg.lr_scheduler.scheduler
    if sched is None:
        return
    check_arguments(sched, "lr_scheduler.scheduler")
    if cfg.lr_scheduler.name != "plateau":
        return
    if not (cfg.data.val_fraction or cfg.data.num_folds):
        raise ConfigError(
            "lr_scheduler=plateau follows val/mae, and there are no validation rows; "
            "set data.val_fraction=0.2 (or data.num_folds)"
        )
    if cfg.model.replicas > 1:
        raise ConfigError(
            f"lr_scheduler=plateau with model.replicas={cfg.model.replicas}: the replicas "
            "share one optimizer, which cannot lower one replica's lr alone; sweep seeds "
            "instead (-m 'seed=range(10)' lr_scheduler=plateau) or use step or cosine"
        )


def check_arguments(node: DictConfig, group: str) -> None:
    """Each key of a `_target_` node is an argument its class takes: `+optim.lrr=0.1` is a
    typo, which the optimizer would otherwise reject with a traceback."""
    cls = get_class(node["_target_"])
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in node:
        if not str(key).startswith("_") and key not in params:
            valid = [p for p in params if p not in ("self", "params")]
            raise ConfigError(
                f"{group}.{key}: {node['_target_']} has no such setting; "
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
