"""Recording the jobs of a fit as it trains: each job's curves, TensorBoard run, checkpoint
share and, after testing, its files (what a job directory holds: jobdir.py).

FitRecorder is the one Lightning callback; it hands each epoch's and the test's per-replica
results to one JobRecorder per job, which logs and writes only its own replicas, so a job's
files are the same whether it trained alone or fused with others. JobCheckpoints turns the
fit's checkpoint into one ordinary checkpoint per job, and back.
"""

from __future__ import annotations

import csv
import functools
import io
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from housing_reg.images import Images, Request
from housing_reg.jobdir import (
    CHECKPOINT,
    METRICS,
    RESULT_CHECKPOINT,
    training_settings,
    write_atomic,
    write_copy,
    write_json,
    write_text,
)
from housing_reg.stats import train_targets


class JobRecorder:
    """One job of a fit: its replicas (a slice of the fit's), its settings, its TensorBoard
    logger and its directory. It logs and writes only its own replicas, so a job's files are
    the same whether it trained alone or fused with others. `error` is set once the job has
    failed (diverged, or its disk is full); the fit goes on without it.
    """

    def __init__(
        self,
        config: dict[str, Any],
        data: Any,  # the job's own data.RegressionData
        logger: Logger | None,
        replicas: slice,
        hparams: dict[str, Any],
    ):
        self.dir = Path(config["output_dir"])
        self.config, self.data, self.logger = config, data, logger
        self.replicas = replicas
        self.hparams = hparams  # the hyperparameters of this job's model, as a lone run's
        self.seeds = list(data.seeds)
        self.history: dict[str, list[list[float]]] = {"train/mae": [], "val/mae": []}
        self.fit_seconds: list[float] = []  # one entry per fit session; a resumed job has two+
        self.metrics: dict[str, Any] = {}  # metrics.json's contents, once the job has tested
        self.error: BaseException | None = None
        # The checkpoint file that holds the model as it stands (FitRecorder keeps it up to
        # date): what it resumed from, then its last.ckpt; None once it trained past a save.
        self.checkpoint: Path | None = None

    # -- state carried by checkpoints ----------------------------------------------------------
    def state_dict(self, elapsed: float) -> dict[str, Any]:
        return {
            "history": self.history,
            "fit_seconds": [*self.fit_seconds, elapsed],
            "config": training_settings(self.config),
            "data_file": self.data.file,  # which file, and its contents' SHA-256
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.fit_seconds = state["history"], state["fit_seconds"]

    # -- during fit ----------------------------------------------------------------------------
    def record_epoch(self, step: int, epoch: int, results: dict[str, torch.Tensor]) -> None:
        """The epoch's curves, in history and TensorBoard; FloatingPointError if it diverged."""
        r = self.replicas
        if not results["train/finite"][r].all():
            hint = " or scale the targets (data.target_scaling=standard)"
            raise FloatingPointError(
                f"training diverged in epoch {epoch}: predictions became NaN/inf; lower optim.lr"
                + (hint if self.config["data"]["target_scaling"] == "none" else "")
            )
        for name in self.history:
            if name in results:
                self.history[name].append(results[name][r].tolist())
        self.log(step, "train/mae", results["train/mae"][r])
        self.log(step, "train/loss", results["train/loss"][r].mean().reshape(1))
        if "val/mae" in results:
            self.log(step, "val/mae", results["val/mae"][r])
        if self.config["lr_scheduler"]["scheduler"] is not None:  # the lr this epoch used
            self.log(step, "train/lr", results["train/lr"][r][:1])

    def log(self, step: int, name: str, per_replica: torch.Tensor) -> None:
        """One scalar for one model; mean, std, min and max across replicas otherwise.
        TensorBoard's x-axis is the optimizer step, for train, validation and test alike."""
        if self.logger is not None:
            self.logger.log_metrics(spread({name: per_replica}), step=step)

    # -- after test: the job's files -----------------------------------------------------------
    def record_test(
        self, trainer: L.Trainer, results: dict[str, torch.Tensor], images: Images
    ) -> None:
        """The job's test scalars and files, its HPARAMS row and image, metrics.json last
        (images: this fit's, drawn in parallel; image_request made this job's)."""
        r = self.replicas
        per_replica = {"train/mae": torch.tensor(self.history["train/mae"][-1])}
        if self.history["val/mae"]:
            per_replica["val/mae"] = torch.tensor(self.history["val/mae"][-1])
        per_replica |= {k: results[k][r] for k in ("test/mae", "test/mse")}
        pred, true = results["test/pred"][r].cpu(), results["test/true"][r.start].cpu()
        metrics = self.summary(trainer, per_replica)
        step = trainer.global_step
        for name in ("test/mae", "test/mse"):
            self.log(step, name, per_replica[name])
        write_predictions(self.dir / "predictions.csv", pred, true)
        write_replicas(self.dir, self.seeds, per_replica, pred, self.history)
        if self.checkpoint is not None:  # the tested model's, before the metrics that name it
            write_copy(self.dir / RESULT_CHECKPOINT, self.checkpoint)
        if isinstance(self.logger, TensorBoardLogger):
            log_hparams(self.logger, self.config, metrics)
            log_image(self.logger, step, images.get(id(self)))
        write_json(self.dir / "metrics.json", metrics)
        (self.dir / "failure.json").unlink(missing_ok=True)  # an earlier failure, now retried
        self.metrics = metrics

    def image_request(self, results: dict[str, torch.Tensor]) -> Request | None:
        """What this job's TensorBoard image shows (images.py draws it), if it has one."""
        if not isinstance(self.logger, TensorBoardLogger):
            return None
        c, r = self.config, self.replicas
        pred, true = results["test/pred"][r].cpu(), results["test/true"][r.start].cpu()
        seeds = (
            f"seed {c['seed']}"
            if len(pred) == 1
            else f"seeds {c['seed']}-{c['seed'] + len(pred) - 1}"
        )
        fold = f", fold {c['data']['fold']}" if c["data"]["num_folds"] else ""
        scaling = c["data"]["target_scaling"].replace("none", "unscaled")
        title = f"{self.data.dataset}: {c['head']['name']}, {scaling} targets, {seeds}{fold}"
        return title, true.numpy(), pred.numpy(), self.data.target_label, self.data.target_unit

    def summary(self, trainer: L.Trainer, per_replica: dict[str, torch.Tensor]) -> dict[str, Any]:
        c, data = self.config, self.data
        metrics: dict[str, Any] = {
            "status": "ok",
            "head": c["head"]["name"],
            "dataset": data.dataset,
            "target": {"name": data.target_label, "unit": data.target_unit},
            "data_file": data.file,  # absolute path and SHA-256: resume and evaluate check it
            "train_targets": train_targets(data),  # the report's answer.png
            "seed": c["seed"],
            "replicas": len(self.seeds),
            "target_scaling": c["data"]["target_scaling"],
            "fold": c["data"]["fold"] if c["data"]["num_folds"] else None,
            "lr": c["optim"]["lr"],
            "lr_scheduler": c["lr_scheduler"]["name"],
            "batch_size": c["data"]["batch_size"],
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "fit_seconds": round(sum(self.fit_seconds), 4),
            "fit_seconds_per_session": [round(s, 4) for s in self.fit_seconds],
        }
        metrics |= spread(per_replica)
        metrics["history"] = {
            k: [float(np.mean(epoch)) for epoch in v] for k, v in self.history.items()
        }
        metrics["config"] = c
        metrics["versions"] = dict(versions())
        return metrics

    def close(self) -> None:
        """Flush and close the job's TensorBoard run (Lightning also writes hparams.yaml)."""
        if self.logger is None:
            return
        try:
            self.logger.finalize("success" if self.error is None else "failed")
        except OSError as e:  # a full disk: the job fails unless its results are written
            if not self.metrics:
                self.error = self.error or e


@functools.cache
def versions() -> dict[str, str]:
    """Python's and the libraries' versions: read once (each lookup scans the installed
    packages' metadata, 14 ms for these five, which a fit of 40 jobs would pay 40 times)."""
    names = ("housing_reg", "torch", "lightning", "hydra-core", "numpy")
    return {"python": platform.python_version(), **{p: version(p) for p in names}}


class FitRecorder(Checkpoint):
    """Records every job of a fit as it trains: per-epoch curves, checkpoints, final files.

    A Checkpoint, so Lightning calls it after the model's own epoch-end hook: the epoch's
    results exist. A job whose replicas diverged fails alone (its `error`), before anything of
    it is saved; the fit stops early only when no job is left. Checkpoints go through
    JobCheckpoints, which writes each job's share as that job's own checkpoint. The fit's last
    epoch is always saved (unless checkpoint_every=0), so that each job's result.ckpt, written
    with its metrics, is the very model they describe.
    """

    def __init__(self, jobs: list[JobRecorder], checkpoint_every: int = 1):
        self.jobs = jobs
        self.checkpoint_every = checkpoint_every
        self.started = False  # whether the fit has recorded anything (train.fit, on Ctrl-C)
        self._start = 0.0

    @property
    def live(self) -> list[JobRecorder]:
        return [j for j in self.jobs if j.error is None]

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._start
        return {"jobs": [j.state_dict(elapsed) for j in self.jobs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for job, saved in zip(self.jobs, state["jobs"], strict=True):
            job.load_state_dict(saved)

    def on_fit_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self.started = True
        self._start = time.perf_counter()
        for job in self.jobs:
            if job.logger is not None:
                try:
                    job.logger.log_hyperparams(job.hparams)
                except OSError as e:  # a full disk: this job fails, the others train on
                    job.error = e

    def on_fit_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        for job in self.jobs:
            job.fit_seconds.append(elapsed)

    def on_train_epoch_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        for job in self.live:
            try:
                job.record_epoch(trainer.global_step, done, model.results)
            except (FloatingPointError, OSError) as e:  # diverged, or its disk is full
                job.error = e
        if not self.live:
            trainer.should_stop = True  # nothing left to train
            return
        every = self.checkpoint_every
        if every and (done % every == 0 or done == trainer.max_epochs):
            self.save(trainer)
        else:
            for job in self.live:
                job.checkpoint = None  # trained past its last save

    def on_train_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        """Stopped before max_epochs (a callback's early stop) between saves: save now."""
        if self.checkpoint_every and self.live and any(j.checkpoint is None for j in self.live):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.live[0].dir / CHECKPOINT, weights_only=False)
        for job in self.live:  # a job whose write failed is no longer live
            job.checkpoint = job.dir / CHECKPOINT

    def on_test_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        requests = {id(j): j.image_request(model.results) for j in self.live}
        with Images({k: r for k, r in requests.items() if r is not None}) as images:
            for job in self.live:
                try:
                    job.record_test(trainer, model.results, images)
                except OSError as e:  # a full disk: this job fails, the others still write
                    job.error = e


def spread(per_replica: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each metric over replicas, with std, min and max when there are several."""
    out = {}
    for name, t in per_replica.items():
        out[name] = t.mean().item()
        if len(t) > 1:
            out |= {
                f"{name}_std": t.std().item(),
                f"{name}_min": t.min().item(),
                f"{name}_max": t.max().item(),
            }
    return out


# -- TensorBoard extras --------------------------------------------------------------------
def log_hparams(logger: TensorBoardLogger, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """HPARAMS tab: the main settings against the final metrics, which the run logged."""
    from torch.utils.tensorboard.summary import hparams

    c = config
    hp = {
        "head": c["head"]["name"],
        "seed": c["seed"],
        "lr": c["optim"]["lr"],
        "optimizer": c["optim"]["_target_"].rsplit(".", 1)[-1],
        "lr_scheduler": c["lr_scheduler"]["name"],
        "batch_size": c["data"]["batch_size"],
        "max_epochs": c["trainer"]["max_epochs"],
        "hidden": "x".join(map(str, c["model"]["hidden"])),
        "replicas": c["model"]["replicas"],
        "target_scaling": c["data"]["target_scaling"],
    }
    if c["data"]["num_folds"]:  # without folds, data.fold means nothing: no "fold 0.0000" column
        hp["fold"] = c["data"]["fold"]
    names = [k for k in METRICS if k in metrics]
    writer = logger.experiment  # a SummaryWriter: its file_writer writes summaries as they are
    for summary in hparams(hp, {k: metrics[k] for k in names}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def log_image(logger: TensorBoardLogger, step: int, summary: bytes) -> None:
    """IMAGES tab: the job's test predictions against the truth (images.py drew them), at the
    last optimizer step like the test scalars, as SummaryWriter.add_image logs an image."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer = logger.experiment
    writer.file_writer.add_summary(Summary.FromString(summary), global_step=step)
    writer.flush()


def write_predictions(path: Path, pred: torch.Tensor, true: torch.Tensor | None) -> None:
    """Rows in order, in the target's units: the truth and the replicas' mean prediction; the
    prediction alone where there is no truth (evaluate on a CSV without the target column)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    mean = pred.mean(dim=0).tolist()
    if true is None:
        w.writerow(["y_pred"])
        w.writerows([f"{p:.6g}"] for p in mean)
    else:
        w.writerow(["y_true", "y_pred"])
        w.writerows([f"{t:.6g}", f"{p:.6g}"] for t, p in zip(true.tolist(), mean, strict=True))
    write_text(path, buf.getvalue())


def write_replicas(
    out: Path,
    seeds: list[int],
    per_replica: dict[str, torch.Tensor],
    pred: torch.Tensor,
    history: dict[str, list[list[float]]],
) -> None:
    """replicas.csv (one readable row per replica) and replicas.npz (its predictions and
    curves), so metrics.json and predictions.csv stay small at any number of replicas."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["seed", *per_replica])
    columns = [t.tolist() for t in per_replica.values()]
    w.writerows([s, *(repr(c[r]) for c in columns)] for r, s in enumerate(seeds))
    write_text(out / "replicas.csv", buf.getvalue())
    arrays = {"seed": np.array(seeds), "test_pred": pred.numpy()}
    arrays |= {k.replace("/", "_"): np.array(v) for k, v in history.items() if v}  # (E, R)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(out / "replicas.npz", save)
