"""Train and test one job: `python -m housing_reg.train [overrides]`, or `-m` for a sweep.

`train(cfg)` is a plain function (tests call it with a composed config); `main` is the thin
Hydra wrapper around it that records failures so one bad job never takes a sweep down, and
`cli` checks config-group choices first so a typo costs one line, not a Hydra stack of them.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import platform
import secrets
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from housing_reg.data import DataError, RegressionData
from housing_reg.model import Regressor
from housing_reg.stats import train_targets

log = logging.getLogger(__name__)
# Lightning advertises a cloud logger on every run; a sweep would print it once per job.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
# hydra/launcher=joblib: as many worker processes as there are cores for `threads` each.
OmegaConf.register_new_resolver(
    "housing_reg.parallel_jobs",
    lambda threads: max(1, (os.cpu_count() or 1) // int(threads)),
    replace=True,
)
warnings.filterwarnings("ignore", message=".*across ranks is zero")  # no val split: intended
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # lightning vs torch
warnings.filterwarnings("ignore", message=".*smaller than the logging interval")  # small CSVs

# Directory names (conf/config.yaml). uid: two runs started in the same instant never share a
# directory; cached, so every job of a sweep gets its sweep's value. path_safe: a value such as
# data.path=/tmp/x.csv names one job directory instead of nesting three.
OmegaConf.register_new_resolver(
    "uid", lambda: f"{os.getpid()}-{secrets.token_hex(2)}", use_cache=True, replace=True
)
OmegaConf.register_new_resolver(
    "path_safe", lambda s: str(s).replace("/", "_").replace("\\", "_")[:200], replace=True
)


class ConfigError(ValueError):
    """A hyperparameter that makes no sense; the message names the key and a valid range."""


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training; checkpoints/last.ckpt holds the last whole epoch."""


# Failures caused by the user's data or settings (NaN loss included): one line, no traceback.
USER_ERRORS = (ConfigError, DataError, FloatingPointError, MisconfigurationException)


def create(node: DictConfig, **kwargs: Any) -> Any:
    """instantiate(), letting our one-line errors out unwrapped (Hydra wraps them in its own)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise


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


def check_config(cfg: DictConfig) -> None:
    """Reject nonsense before any data is read or a model built."""
    for key, kind in NUMERIC_KEYS.items():
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float)):
            raise ConfigError(f"{key}={v!r} must be {'an integer' if kind is int else 'a number'}")
    for key in ("seed", "data.split_seed"):
        if not 0 <= OmegaConf.select(cfg, key) < 2**31:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be in [0, 2**31)")
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0 (e.g. optim.lr=1e-3)")
    if not cfg.model.hidden or min(cfg.model.hidden) < 1:
        raise ConfigError(
            f"model.hidden={list(cfg.model.hidden)} must be a non-empty list of "
            "positive layer widths, e.g. model.hidden=[64,64]"
        )
    if cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be >= 1")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every={cfg.checkpoint_every} must be >= 0 (0: never)")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: no such file; point it at a job's checkpoints/last.ckpt"
        )


def check_choices(args: list[str]) -> None:
    """Each config-group override (head=, optim=, hydra/launcher=, ...) names an option Hydra
    can see, plugins included; otherwise one ConfigError line lists the valid ones."""
    try:
        overrides = OverridesParser.create().parse_overrides(
            [a for a in args if "=" in a and not a.startswith("-")]
        )
    except Exception:  # malformed override: Hydra's own parser error says where
        return
    with initialize_config_module("housing_reg.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for o in overrides:
            if o.is_delete() or o.value_type not in (
                ValueType.ELEMENT,
                ValueType.CHOICE_SWEEP,
                ValueType.SIMPLE_CHOICE_SWEEP,
            ):
                continue
            options = loader.get_group_options(o.key_or_group)
            if not options:  # not a config group: a plain key such as optim.lr
                continue
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if isinstance(v, str) and v not in options:
                    raise ConfigError(
                        f"{o.key_or_group}={v} is not an available option; choose one of: "
                        f"{', '.join(options)}"
                    )


def last_checkpoint(cfg: DictConfig) -> Path:
    """Where the model saves this job's newest checkpoint (see checkpoint_every)."""
    return Path(cfg.output_dir) / "checkpoints" / "last.ckpt"


def checkpoint_to_resume(cfg: DictConfig, model: Regressor) -> Path | None:
    """ckpt_path, else (resume=true) the job's own last checkpoint, checked against the model."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = last_checkpoint(cfg)
        if not path.is_file():
            log.warning("resume=true: no checkpoint at %s yet, starting from scratch", path)
            return None
    else:
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    except Exception as e:
        raise ConfigError(f"{path}: not a readable checkpoint ({e})") from None
    differ = {k: (saved.get(k), v) for k, v in model.hparams.items() if saved.get(k) != v}
    if differ:
        raise ConfigError(
            f"{path} was trained with different settings ("
            + ", ".join(f"{k}: {old} there, {new} here" for k, (old, new) in differ.items())
            + "); resume with the settings it was trained with"
        )
    return path


def build(cfg: DictConfig) -> tuple[RegressionData, Regressor, L.Trainer]:
    """Config -> data module, model and trainer, wired the same way for every entry point."""
    check_config(cfg)
    torch.set_num_threads(cfg.threads)  # 64-wide matmuls: threads cost more than they give
    L.seed_everything(cfg.seed, verbose=False)
    data: RegressionData = create(cfg.data)
    model = Regressor(
        head=instantiate(cfg.head.activation),
        optimizer=instantiate(cfg.optim),
        num_features=data.num_features,
        hidden=list(cfg.model.hidden),
        seeds=data.replica_seeds(),
        head_name=cfg.head.name,
        features=list(data.features),
        x_shift=data.x_scaler.shift,
        x_scale=data.x_scaler.scale,
        y_shift=data.y_scaler.shift,
        y_scale=data.y_scaler.scale,
    )
    if cfg.checkpoint_every:
        model.checkpoint_path = str(last_checkpoint(cfg))
        model.checkpoint_every = cfg.checkpoint_every
    callbacks = [create(c) for c in cfg.callbacks.values() if c is not None]
    trainer: L.Trainer = create(cfg.trainer, logger=create(cfg.logger), callbacks=callbacks)
    return data, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training rows, test on the held-out rows, write the job directory."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, model, trainer = build(cfg)
    ckpt_path = checkpoint_to_resume(cfg, model)

    gc.collect()
    gc.freeze()  # a full collection mid-fit would rescan every import-time object
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:  # Lightning's graceful stop on Ctrl-C / SIGTERM
        if not trainer.interrupted:
            raise
        done = len(model.history["train/mae"])
        raise Interrupted(
            f"interrupted with {done} of {cfg.trainer.max_epochs} epochs done"
        ) from None
    finally:
        # Frozen objects are never collected: without this, every job that a sweep runs in
        # one process (basic launcher, Optuna trials, a reused Ray worker) would stay alive.
        gc.unfreeze()
    fit_seconds = time.perf_counter() - start
    trainer.test(model, datamodule=data, verbose=False)

    metrics = collect_metrics(cfg, model, trainer, fit_seconds)
    log_hparams(trainer, cfg, metrics)
    log_pred_vs_true(trainer, cfg, model)
    write_predictions(out / "predictions.csv", model.test_predictions, model.test_targets)
    write_json(out / "metrics.json", metrics)
    return metrics


def collect_metrics(
    cfg: DictConfig, model: Regressor, trainer: L.Trainer, fit_seconds: float
) -> dict[str, Any]:
    """Per-replica numbers plus their mean (and std when there are several)."""
    per_replica: dict[str, list[float]] = {
        "train/mae": model.history["train/mae"][-1],
        "test/mae": model.test_mae.tolist(),
        "test/mse": model.test_mse.tolist(),
    }
    if model.history["val/mae"]:
        per_replica["val/mae"] = model.history["val/mae"][-1]
    seeds = list(model.hparams.seeds)
    metrics: dict[str, Any] = {
        "status": "ok",
        "head": cfg.head.name,
        "dataset": trainer.datamodule.dataset,
        "target": {"name": trainer.datamodule.target_label, "unit": trainer.datamodule.target_unit},
        "train_targets": train_targets(trainer.datamodule),  # the report's answer.png
        "seed": cfg.seed,
        "replicas": len(seeds),
        "target_scaling": cfg.data.target_scaling,
        "fold": cfg.data.fold if cfg.data.num_folds else None,
        "lr": cfg.optim.lr,
        "batch_size": cfg.data.batch_size,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "fit_seconds": round(fit_seconds, 4),
    }
    for name, values in per_replica.items():
        t = torch.tensor(values)
        metrics[name] = t.mean().item()
        if len(values) > 1:
            metrics[f"{name}_std"] = t.std().item()
    metrics["per_replica"] = [
        {"seed": s, **{name: values[r] for name, values in per_replica.items()}}
        for r, s in enumerate(seeds)
    ]
    metrics["history"] = model.history
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)  # what ran, no interpolation
    metrics["versions"] = {
        "python": platform.python_version(),
        **{p: version(p) for p in ("housing_reg", "torch", "lightning", "hydra-core", "numpy")},
    }
    return metrics


def log_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """HPARAMS tab: the main settings against the final metrics, which the run logged."""
    hp = {
        "head": cfg.head.name,
        "seed": cfg.seed,
        "lr": cfg.optim.lr,
        "optimizer": cfg.optim._target_.rsplit(".", 1)[-1],
        "batch_size": cfg.data.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "hidden": "x".join(map(str, cfg.model.hidden)),
        "replicas": cfg.model.replicas,
        "target_scaling": cfg.data.target_scaling,
        "fold": cfg.data.fold,
    }
    names = [k for k in ("train/mae", "val/mae", "test/mae", "test/mse") if k in metrics]
    writer = trainer.logger.experiment
    for summary in hparams(hp, {k: metrics[k] for k in names}):
        writer._get_file_writer().add_summary(summary)
    writer.flush()


def log_pred_vs_true(trainer: L.Trainer, cfg: DictConfig, model: Regressor) -> None:
    """IMAGES tab: this job's test predictions against the truth, drawn once after testing."""
    from housing_reg.report import figure_rgb, pred_vs_true_figure  # matplotlib: only here

    r = model.replicas
    seeds = f"seed {cfg.seed}" if r == 1 else f"seeds {cfg.seed}-{cfg.seed + r - 1}"
    fold = f", fold {cfg.data.fold}" if cfg.data.num_folds else ""
    dm, scaling = trainer.datamodule, cfg.data.target_scaling.replace("none", "unscaled")
    title = f"{dm.dataset}: {cfg.head.name}, {scaling} targets, {seeds}{fold}"
    pred, true, target = model.test_predictions.cpu(), model.test_targets.cpu(), dm.target_label
    fig = pred_vs_true_figure(true, pred, title, target, dm.target_unit)
    writer = trainer.logger.experiment
    writer.add_image("test/pred_vs_true", figure_rgb(fig), dataformats="HWC")
    writer.flush()


def write_predictions(path: Path, pred: torch.Tensor, true: torch.Tensor) -> None:
    """Rows in order, in the target's units; one column per replica if R > 1 (pred is (R, N))."""
    header = ["y_true", "y_pred"] + (
        [f"y_pred_{r}" for r in range(len(pred))] if len(pred) > 1 else []
    )
    mean = pred.mean(dim=0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(true)):
            extra = pred[:, i].tolist() if len(pred) > 1 else []
            w.writerow([f"{v:.6g}" for v in (true[i].item(), mean[i].item(), *extra)])
    os.replace(tmp, path)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class SweepSummary(Callback):
    """Prints head -> train MAE -> test MAE for every job once a sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows, failed = read_sweep(Path(config.hydra.sweep.dir))
        print(format_table(rows))
        if failed:
            print(f"{len(failed)} job(s) failed: " + "; ".join(failed), file=sys.stderr)
            sys.exit(1)


def read_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, failed = [], []
    for job in sorted(sweep_dir.iterdir(), key=_job_order):
        f = job / "metrics.json"
        if not f.exists():
            if (job / ".hydra").is_dir():  # started, never finished: killed or crashed hard
                failed.append(f"{job.name}: no metrics.json (killed?); rerun with resume=true")
            continue
        m = json.loads(f.read_text())
        if m.get("status") == "ok":
            rows.append({"job": job.name, **m})
        else:
            failed.append(f"{job.name}: {m.get('error', 'unknown error')}")
    return rows, failed


def _job_order(p: Path) -> tuple[int, str]:
    num = p.name.split("_", 1)[0]
    return (int(num) if num.isdigit() else sys.maxsize, p.name)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'job':<40} {'head':<8} {'train/mae':>10} {'test/mae':>10}"]
    for r in rows:
        lines.append(
            f"{r['job'][:40]:<40} {r['head']:<8} {r['train/mae']:>10.3f} {r['test/mae']:>10.3f}"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="pkg://housing_reg.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except Interrupted as e:  # stops a sweep too: Ctrl-C means stop
        record_failure(cfg, "interrupted", e)
        sys.exit(f"error: {e}; to continue, {resume_hint(cfg, multirun)}")
    except Exception as e:
        record_failure(cfg, "failed", e)
        expected = isinstance(e, USER_ERRORS)
        if not multirun:
            if expected:
                sys.exit(f"error: {e}")
            raise  # a bug: show the traceback
        # The sweep goes on; its summary lists this job. A bug's traceback goes to the job log.
        log.error("job failed: %s", e, exc_info=not expected)
        return None
    return objective(metrics)


def objective(metrics: dict[str, Any]) -> float | None:
    """What a sweeper (hparams_search=optuna) minimizes: validation MAE, never test MAE.

    None without a validation split (main returns None for a failed job too): Optuna then
    marks the trial failed and goes on.
    """
    value = metrics.get("val/mae")
    return float(value) if value is not None else None


def record_failure(cfg: DictConfig, status: str, e: BaseException) -> None:
    write_json(
        Path(cfg.output_dir) / "metrics.json",
        {
            "status": status,
            "error": f"{type(e).__name__}: {e}",
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )


def resume_hint(cfg: DictConfig, multirun: bool) -> str:
    hc = HydraConfig.get()
    if multirun:
        return f"rerun the sweep with resume=true hydra.sweep.dir={hc.sweep.dir}"
    args = [a for a in hc.overrides.task if not a.startswith(("resume=", "hydra.run.dir="))]
    return "run: python -m housing_reg.train " + " ".join(
        [*args, "resume=true", f"hydra.run.dir={cfg.output_dir}"]
    )


def cli() -> None:
    """`python -m housing_reg.train`: Hydra's app, after a one-line check of group choices."""
    try:
        check_choices(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()


if __name__ == "__main__":
    cli()
