"""Recording the jobs of a fit as it trains: each job's curves, loggers, callbacks,
checkpoint share and, after testing, its files (what a job directory holds: jobdir.py).

FitRecorder is the fit's one recording callback; it hands each epoch's and the test's
per-replica results to one JobRecorder per job, which logs and writes only its own replicas,
and it calls each job's own callbacks with that job's view of the Trainer
(callbacks.JobView), so a job's files are the same whether it trained alone or fused with
others. A job whose callback stops it (early stopping) is finished at that epoch while the
others train on: its curves, its checkpoint and the model it is tested with are those of
that epoch. checkpoints.JobCheckpoints turns the fit's checkpoint into one per job, and back.
"""

from __future__ import annotations

import csv
import functools
import io
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from housing_reg.callbacks import JobView, ordered, overridden
from housing_reg.images import Images, Request
from housing_reg.jobdir import (
    CHECKPOINT,
    METRICS,
    RESULT_CHECKPOINT,
    load_checkpoint,
    training_settings,
    write_atomic,
    write_copy,
    write_json,
    write_text,
)
from housing_reg.stats import train_targets

# The epoch metrics a job's callbacks can monitor (record_epoch), as the module logs them.
MONITORED = ("train/mae", "train/loss", "val/mae", "train/lr")


class JobRecorder:
    """One job of a fit: its replicas (a slice of the fit's), its settings, its loggers, its
    callbacks and its directory. It logs and writes only its own replicas. `error` is set once
    the job has failed (diverged, or its disk is full), `stopped` once a callback stopped it
    (its epochs and steps then); the fit goes on without it either way.
    """

    def __init__(
        self,
        config: dict[str, Any],
        data: Any,  # the job's own data.RegressionData
        loggers: list[Logger],
        replicas: slice,
        hparams: dict[str, Any],
        callbacks: list[Callback] | None = None,
    ):
        self.dir = Path(config["output_dir"])
        self.config, self.data, self.loggers = config, data, loggers
        self.replicas = replicas
        self.hparams = hparams  # the hyperparameters of this job's model, as a lone run's
        self.callbacks = ordered(callbacks or [])
        self.seeds = list(data.seeds)
        self.history: dict[str, list[list[float]]] = {"train/mae": [], "val/mae": []}
        self.fit_seconds: list[float] = []  # one entry per fit session; a resumed job has two+
        self.metrics: dict[str, Any] = {}  # metrics.json's contents, once the job has tested
        self.error: BaseException | None = None
        # The checkpoint file that holds the model as it stands (FitRecorder keeps it up to
        # date): what it resumed from, then its last.ckpt; None once it trained past a save.
        self.checkpoint: Path | None = None
        self.callback_metrics: dict[str, torch.Tensor] = {}  # its epoch's, for its callbacks
        self.stop_requested = False  # set by its callbacks, through its JobView
        self.stopped: tuple[int, int] | None = None  # (epochs, steps) when a callback stopped it
        self.weights: dict[str, torch.Tensor] | None = None  # what it is tested with, if not
        self.view: JobView | None = None  # the fit's as it stands

    # -- state carried by checkpoints ----------------------------------------------------------
    def state_dict(self, elapsed: float) -> dict[str, Any]:
        return {
            "history": self.history,
            "fit_seconds": [*self.fit_seconds, elapsed],
            "config": training_settings(self.config),
            "data_file": self.data.file,  # which file, and its contents' SHA-256
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.fit_seconds = state["history"], state["fit_seconds"]
        saved = state.get("callbacks", {})
        for c in self.callbacks:
            if c.state_key in saved:
                c.load_state_dict(saved[c.state_key])

    # -- during fit ----------------------------------------------------------------------------
    def record_epoch(self, step: int, epoch: int, results: dict[str, torch.Tensor]) -> None:
        """The epoch's curves, in history and every logger, and the metrics its callbacks
        see (the means over its replicas); FloatingPointError if it diverged."""
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
        self.callback_metrics = {k: results[k][r].mean() for k in MONITORED if k in results}
        self.log(step, "train/mae", results["train/mae"][r])
        self.log(step, "train/loss", results["train/loss"][r].mean().reshape(1))
        if "val/mae" in results:
            self.log(step, "val/mae", results["val/mae"][r])
        if self.config["lr_scheduler"]["scheduler"] is not None:  # the lr this epoch used
            self.log(step, "train/lr", results["train/lr"][r][:1])

    def log(self, step: int, name: str, per_replica: torch.Tensor) -> None:
        """One scalar for one model; mean, std, min and max across replicas otherwise. The
        x-axis is the optimizer step, for train, validation and test alike."""
        for logger in self.loggers:
            logger.log_metrics(spread({name: per_replica}), step=step)

    def stop(self, model: L.LightningModule, epochs: int, steps: int) -> None:
        """A callback stopped the job: it is tested with its weights as they are now."""
        self.stopped = (epochs, steps)
        self.weights = {
            name: p[self.replicas].detach().clone() for name, p in model.net.named_parameters()
        }

    def load_weights(self, model: L.LightningModule) -> None:
        """Put the model this job is tested with into its replicas of the fit's model: where
        it stopped early, or its best checkpoint (test_ckpt=best); else nothing to do."""
        if self.config.get("test_ckpt") == "best":
            best = self.best_checkpoint()
            state = load_checkpoint(best)["state_dict"]
            net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
            self.weights = net
            self.checkpoint = best  # result.ckpt: the model metrics.json describes
        if self.weights is None:
            return
        with torch.no_grad():
            for name, p in model.net.named_parameters():
                p[self.replicas] = self.weights[name]

    def best_checkpoint(self) -> Path:
        best = next(
            (c.best_model_path for c in self.callbacks if isinstance(c, ModelCheckpoint)), ""
        )
        if not best:
            raise FileNotFoundError(
                f"{self.dir}: test_ckpt=best, but no checkpoint callback saved a best model"
            )
        return Path(best)

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
        epochs, step = self.stopped or (trainer.current_epoch, trainer.global_step)
        metrics = self.summary(epochs, step, per_replica)
        for name in ("test/mae", "test/mse"):
            self.log(step, name, per_replica[name])
        write_predictions(self.dir / "predictions.csv", pred, true)
        write_replicas(self.dir, self.seeds, per_replica, pred, self.history)
        if self.checkpoint is not None:  # the tested model's, before the metrics that name it
            write_copy(self.dir / RESULT_CHECKPOINT, self.checkpoint)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_hparams(logger, self.config, metrics)
                log_image(logger, step, images.get(id(self)))
        write_json(self.dir / "metrics.json", metrics)
        (self.dir / "failure.json").unlink(missing_ok=True)  # an earlier failure, now retried
        self.metrics = metrics

    def image_request(self, results: dict[str, torch.Tensor]) -> Request | None:
        """What this job's TensorBoard image shows (images.py draws it), if it has one."""
        if not any(isinstance(logger, TensorBoardLogger) for logger in self.loggers):
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

    def summary(
        self, epochs: int, steps: int, per_replica: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
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
            "epochs": epochs,
            "steps": steps,
            "fit_seconds": round(sum(self.fit_seconds), 4),
            "fit_seconds_per_session": [round(s, 4) for s in self.fit_seconds],
        }
        if c.get("test_ckpt") == "best" and self.checkpoint is not None:
            metrics["tested"] = {"checkpoint": "best", "path": str(self.checkpoint)}
        metrics |= spread(per_replica)
        metrics["history"] = {
            k: [float(np.mean(epoch)) for epoch in v] for k, v in self.history.items()
        }
        metrics["config"] = c
        metrics["versions"] = dict(versions())
        return metrics

    def close(self) -> None:
        """Flush and close the job's loggers (TensorBoard's also writes hparams.yaml)."""
        for logger in self.loggers:
            try:
                logger.finalize("success" if self.error is None else "failed")
            except OSError as e:  # a full disk: the job fails unless its results are written
                if not self.metrics:
                    self.error = self.error or e


@functools.cache
def versions() -> dict[str, str]:
    """Python's and the libraries' versions: read once (each lookup scans the installed
    packages' metadata, 14 ms for these five, which a fit of 40 jobs would pay 40 times)."""
    names = ("housing_reg", "torch", "lightning", "hydra-core", "numpy")
    return {"python": platform.python_version(), **{p: version(p) for p in names}}


# Hooks FitRecorder passes on to each job's callbacks as they are, with the job's view of
# the Trainer; on_fit_start, the epochs' end, on_train_end, the test and the checkpoints'
# state have more to do and pass them on themselves.
PASSED_ON = (
    "setup",
    "teardown",
    "on_fit_end",
    "on_sanity_check_start",
    "on_sanity_check_end",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_exception",
)


# The hooks of training itself, which a job stopped early no longer gets.
TRAINING = ("on_train_epoch", "on_train_batch", "on_validation", "on_before_", "on_after_")


class FitRecorder(Checkpoint):
    """Records every job of a fit as it trains, and runs each job's callbacks as that job's.

    A Checkpoint, so Lightning calls it after the model's own epoch-end hook: the epoch's
    results exist. Each epoch: every job's curves; then its callbacks (early stopping, a best
    checkpoint); then the jobs they stopped are finished, and every job still training is
    saved. A job whose replicas diverged fails alone (its `error`), before anything of it is
    saved; the fit stops once no job trains on. Checkpoints go through JobCheckpoints, which
    writes each job's share as that job's own checkpoint. The fit's last epoch, and a job's
    where it stopped, is always saved (unless checkpoint_every=0), so that each job's
    result.ckpt, written with its metrics, is the very model they describe.
    """

    def __init__(self, jobs: list[JobRecorder], checkpoint_every: int = 1, checkpoints: Any = None):
        self.jobs = jobs
        self.checkpoint_every = checkpoint_every
        self.checkpoints = checkpoints  # the fit's checkpoints.JobCheckpoints
        self.started = False  # whether the fit has recorded anything (fit.py, on Ctrl-C)
        self._start = 0.0
        # Each hook's (job, callback) pairs, only those whose callback defines the hook: the
        # per-step ones cost nothing when no job's callback wants them.
        self.wanting = {
            hook: [(j, c) for j in jobs for c in j.callbacks if overridden(type(c), (hook,))]
            for hook in (*PASSED_ON, "on_fit_start", "on_train_epoch_end", "on_train_end")
            + ("on_test_start", "on_test_end")
        }

    @property
    def live(self) -> list[JobRecorder]:
        """The jobs still training: not failed, not stopped."""
        return [j for j in self.jobs if j.error is None and j.stopped is None]

    @property
    def finished(self) -> list[JobRecorder]:
        """The jobs that will be tested: every job that has not failed."""
        return [j for j in self.jobs if j.error is None]

    def pass_on(self, hook: str, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """The hook, called on each job's callbacks that define it, with the job's view: the
        training hooks on the jobs still training, the others on every job not failed."""
        training = hook.startswith(TRAINING)
        for job, callback in self.wanting[hook]:
            if job.error is None and (job.stopped is None or not training):
                getattr(callback, hook)(job.view or trainer, *args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._start
        return {"jobs": [j.state_dict(elapsed) for j in self.jobs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for job, saved in zip(self.jobs, state["jobs"], strict=True):
            job.load_state_dict(saved)

    def setup(self, trainer: L.Trainer, model: L.LightningModule, stage: str) -> None:
        for job in self.jobs:
            job.view = JobView(trainer, job)
        self.pass_on("setup", trainer, model, stage=stage)

    def on_fit_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        self.started = True
        self._start = time.perf_counter()
        for job in self.jobs:
            for logger in job.loggers:
                try:
                    logger.log_hyperparams(logged_hparams(job, logger))
                except OSError as e:  # a full disk: this job fails, the others train on
                    job.error = e
        self.pass_on("on_fit_start", trainer, model)

    def on_fit_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        for job in self.jobs:
            job.fit_seconds.append(elapsed)
        self.pass_on("on_fit_end", trainer, model)

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
        self.pass_on("on_train_epoch_end", trainer, model)
        stopping = [j for j in self.live if j.stop_requested]
        every = self.checkpoint_every
        if every and (done % every == 0 or done == trainer.max_epochs):
            self.save(trainer, self.live)
        else:
            for job in self.live:
                job.checkpoint = None  # trained past its last save
            if every and stopping:  # stopped between saves: saved now, as at a fit's end
                self.save(trainer, stopping)
        for job in stopping:
            job.stop(model, done, trainer.global_step)
        if not self.live:
            trainer.should_stop = True  # nothing left to train

    def on_train_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        """Stopped before max_epochs (Ctrl-C, a fit-wide callback) between saves: save now."""
        self.pass_on("on_train_end", trainer, model)
        stale = [j for j in self.live if j.checkpoint is None]
        if self.checkpoint_every and stale:
            self.save(trainer, stale)

    def save(self, trainer: L.Trainer, jobs: list[JobRecorder]) -> None:
        """Each of these jobs' share of the fit's checkpoint to its checkpoints/last.ckpt."""
        if not jobs:
            return
        with self.checkpoints.writing(jobs):
            trainer.save_checkpoint(jobs[0].dir / CHECKPOINT, weights_only=False)
        for job in jobs:
            if job.error is None:  # a job whose write failed has failed
                job.checkpoint = job.dir / CHECKPOINT

    def on_test_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        for job in self.finished:
            try:
                job.load_weights(model)
            except (OSError, FileNotFoundError) as e:
                job.error = e
        self.pass_on("on_test_start", trainer, model)

    def on_test_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        requests = {id(j): j.image_request(model.results) for j in self.finished}
        with Images({k: r for k, r in requests.items() if r is not None}) as images:
            for job in self.finished:
                try:
                    job.record_test(trainer, model.results, images)
                except OSError as e:  # a full disk: this job fails, the others still write
                    job.error = e
        self.pass_on("on_test_end", trainer, model)


def passing_on(hook: str) -> Callable[..., None]:
    def method(self: FitRecorder, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self.pass_on(hook, trainer, *args, **kwargs)

    method.__name__ = hook
    return method


for _hook in PASSED_ON:
    if _hook not in FitRecorder.__dict__:
        setattr(FitRecorder, _hook, passing_on(_hook))


def logged_hparams(job: JobRecorder, logger: Logger) -> dict[str, Any]:
    """What a logger records as the job's hyperparameters when the fit starts: the model's
    (TensorBoard's hparams.yaml, as ever; its HPARAMS tab gets the settings with the final
    metrics, log_hparams); other loggers keep no such tab, so the settings go in with them."""
    if isinstance(logger, TensorBoardLogger):
        return job.hparams
    return job.hparams | settings(job.config)


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
def settings(config: dict[str, Any]) -> dict[str, Any]:
    """The main settings of a job, as its loggers show them beside its metrics."""
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
    return hp


def log_hparams(logger: TensorBoardLogger, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """HPARAMS tab: the main settings against the final metrics, which the run logged."""
    from torch.utils.tensorboard.summary import hparams

    names = [k for k in METRICS if k in metrics]
    writer = logger.experiment  # a SummaryWriter: its file_writer writes summaries as they are
    for summary in hparams(settings(config), {k: metrics[k] for k in names}):
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
