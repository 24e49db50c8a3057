"""Train and test one job: `python -m housing_reg.train [overrides]`, or `-m` for a sweep.

`train(cfg)` is a plain function (tests call it with a composed config); `main` is the thin
Hydra wrapper around it that records failures so one bad job never takes a sweep down.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import os
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from housing_reg.data import DataError, RegressionData
from housing_reg.model import Regressor

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


class ConfigError(ValueError):
    """A hyperparameter that makes no sense; the message names the key and a valid range."""


def check_config(cfg: DictConfig) -> None:
    """Reject nonsense before any data is read or a model built."""
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


def build(cfg: DictConfig) -> tuple[RegressionData, Regressor, L.Trainer]:
    """Config -> data module, model and trainer, wired the same way for every entry point."""
    check_config(cfg)
    torch.set_num_threads(cfg.threads)  # 64-wide matmuls: threads cost more than they give
    L.seed_everything(cfg.seed, verbose=False)
    data: RegressionData = instantiate(cfg.data)
    model = Regressor(
        head=instantiate(cfg.head.activation),
        optimizer=instantiate(cfg.optim),
        num_features=data.num_features,
        hidden=list(cfg.model.hidden),
        seeds=data.replica_seeds(),
        head_name=cfg.head.name,
        x_shift=data.x_scaler.shift,
        x_scale=data.x_scaler.scale,
        y_shift=data.y_scaler.shift,
        y_scale=data.y_scaler.scale,
    )
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=instantiate(cfg.logger), callbacks=callbacks
    )
    return data, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit on the training rows, test on the held-out rows, write the job directory."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, model, trainer = build(cfg)

    gc.collect()
    gc.freeze()  # a full collection mid-fit would rescan every import-time object
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    trainer.test(model, datamodule=data, verbose=False)

    metrics = collect_metrics(cfg, model, trainer, fit_seconds)
    log_hparams(trainer, cfg, metrics)
    write_predictions(out / "predictions.csv", model)
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
    metrics["versions"] = {p: version(p) for p in ("housing_reg", "torch", "lightning")}
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


def write_predictions(path: Path, model: Regressor) -> None:
    """Test rows in test-set order, in the target's units; one column per replica if R > 1."""
    pred, true = model.test_predictions, model.test_targets
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
    try:
        metrics = train(cfg)
    except (ConfigError, DataError, FloatingPointError) as e:
        write_json(
            Path(cfg.output_dir) / "metrics.json",
            {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
        )
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("job failed: %s", e)  # the sweep goes on; its summary lists this job
            return None
        sys.exit(f"error: {e}")
    return metrics.get("val/mae")


if __name__ == "__main__":
    main()
