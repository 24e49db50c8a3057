"""Hydra callbacks that make the scale-out plugins (the Ray launcher, the Optuna sweeper) safe
to use.

The plugins do the scheduling. What they leave to the user, and what a user would otherwise
rediscover by failure, is settled here before the first job starts. (hydra/launcher=slurm's
fixes are a launcher of their own: src/hydra_plugins/housing_reg_launcher/slurm.py.)
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from housing_reg.sweep import release


class RayDriver(Callback):
    """Prepares the driver for hydra-ray-launcher (Ray 2.x), before it calls ray.init.

    1. On a running cluster, drops the plugin's 75 MB object store request: ray.init refuses
       it when it connects, because the cluster has its own.
    2. Makes a relative hydra.sweep.dir absolute: each job resolves the sweep dir again on its
       worker, whose working directory is wherever the cluster was started.
    3. Keeps Ray on loopback when it runs here or on 127.0.0.1: Ray swaps 127.0.0.1 for the
       host's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
    4. Sets RAY_AUTH_MODE=token when a token exists: `ray start` then enables token
       authentication for the cluster, but the driver only sends the token in token mode.
    Variables the user has already set are left alone. Other launchers are not touched.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "hydra_ray_launcher" not in str(config.hydra.launcher.get("_target_", "")):
            return
        init = config.hydra.launcher.ray.init
        address = init.get("address")
        with read_write(config), open_dict(config):
            if address is not None:
                init.setdefault("object_store_memory", None)
            pin_sweep_dir(config)
        prepare_ray_env(address)


def pin_sweep_dir(config: DictConfig) -> None:
    """hydra.sweep.dir made absolute, in the config and in the overrides jobs are built from."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    if sweep_dir.is_absolute():
        return
    absolute = str(sweep_dir.absolute())
    if "'" in absolute or "\\" in absolute:
        sys.exit(f"error: hydra.sweep.dir={sweep_dir} is relative; pass an absolute path")
    config.hydra.sweep.dir = absolute
    config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{absolute}'")


def prepare_ray_env(address: str | None) -> None:
    if address in (None, "auto"):
        address = os.environ.get("RAY_ADDRESS", address)
    if address is None or (address != "auto" and is_loopback(address)):
        # None: the launcher starts a Ray of its own, for this machine only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def is_loopback(address: str) -> bool:
    """True for 127.x.x.x, ::1 and localhost, with or without ray:// and a port."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequireValidation(Callback):
    """Stops an Optuna search before its first trial when there is nothing to minimize.

    The objective is validation MAE (runs.objective); without a validation split every trial
    would return None, and Optuna would fail only after running them all.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        data = config.data
        if data.num_folds < 2 and data.val_fraction <= 0:
            release(Path(config.hydra.sweep.dir))  # sweep.Sweep locked it a moment ago
            sys.exit(
                "error: hparams_search minimizes val/mae, but data.val_fraction="
                f"{data.val_fraction} and data.num_folds={data.num_folds} leave no validation "
                "rows; set data.val_fraction=0.2 (or data.num_folds=5 data.fold=0)"
            )
