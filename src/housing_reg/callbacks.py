"""Lightning callbacks, fit-wide or per job (conf/callbacks/).

A fit may train several jobs (a fused sweep), and a user's callbacks belong to a job: its
early stopping, its best checkpoint, its learning-rate curve. So a job's callbacks are not
handed to the Trainer: record.FitRecorder calls their hooks with a `JobView`, the Trainer as
that job alone would show it (its metrics, its loggers, its directory, its own should_stop),
whether the fit holds one job or forty. Only callbacks that show the fit rather than change
it (progress bars, model summaries) are the Trainer's own.

Each callback kind is one of:
- FIT_WIDE: the Trainer's; they see the fit (its metrics are the means over all its models).
- PER_JOB: made per job and known to act on the job alone: jobs with them fuse.
- REFUSED: they change what trains (the model, the optimizer, the batches): one line, before
  anything is built.
- anything else (a user's own, Timer, ...): made per job, but its job trains in a fit of its
  own, since nothing says it leaves the other jobs of a fit alone.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BaseFinetuning,
    BatchSizeFinder,
    Callback,
    Checkpoint,
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    ModelSummary,
    ProgressBar,
    StochasticWeightAveraging,
)

from housing_reg.progress import EpochProgress

FIT_WIDE = (ProgressBar, ModelSummary, EpochProgress)
PER_JOB = (EarlyStopping, ModelCheckpoint, LearningRateMonitor)
# What each refused kind would change, and what to do instead.
REFUSED = {
    StochasticWeightAveraging: "it averages the weights Lightning trains, which here stack "
    "every replica of the fit; average replicas instead: model.replicas=10",
    GradientAccumulationScheduler: "each mini-batch is one optimizer step here; for bigger "
    "steps raise data.batch_size",
    BatchSizeFinder: "it changes the batches Lightning is handed, which here are blocks of "
    "steps; choose data.batch_size with a sweep (-m data.batch_size=1,8,32)",
    LearningRateFinder: "it trains the fit's stacked models before the fit; search optim.lr "
    "with a sweep or hparams_search=optuna",
    BaseFinetuning: "the model has no backbone to freeze",
    BackboneFinetuning: "the model has no backbone to freeze",
    ModelPruning: "it prunes the weights of every replica of the fit at once",
}
# Hooks Lightning calls once per batch it hands over, which here is a block of
# data.steps_per_block optimizer steps (data.EpochBatches).
PER_BATCH = ("on_train_batch_start", "on_train_batch_end")


def kind(callback: type[Callback]) -> str:
    """fit-wide, per job, refused, or alone (see the module docstring). A callback class of
    your own joins PER_JOB by saying `fuses = True`: it acts on the job its JobView shows and
    changes nothing of the fit's model or optimizer."""
    if issubclass(callback, FIT_WIDE):
        return "fit-wide"
    if issubclass(callback, tuple(REFUSED)):
        return "refused"
    if issubclass(callback, PER_JOB) or getattr(callback, "fuses", False) is True:
        return "per job"
    return "alone"


def refusal(callback: type[Callback], settings: dict[str, Any], steps_per_block: int) -> str | None:
    """Why a callback of this class and these settings cannot work here, or None."""
    for cls, why in REFUSED.items():
        if issubclass(callback, cls):
            return why
    if steps_per_block > 1 and per_step(callback, settings):
        return (
            "it acts once per batch, and a batch here is a block of data.steps_per_block="
            f"{steps_per_block} optimizer steps; set data.steps_per_block=1 for one call per step"
        )
    return None


def per_step(callback: type[Callback], settings: dict[str, Any]) -> bool:
    """Whether the callback acts in its per-batch hooks (counting steps, logging each step)."""
    if issubclass(callback, FIT_WIDE + (EarlyStopping,)):
        return False  # a bar or a summary shows the blocks; early stopping checks each epoch
    if issubclass(callback, ModelCheckpoint):
        every = settings.get("every_n_train_steps")
        return bool(every) or settings.get("train_time_interval") is not None
    if issubclass(callback, LearningRateMonitor):
        return settings.get("logging_interval") == "step"
    return bool(overridden(callback, PER_BATCH))


def overridden(callback: type[Callback], hooks: tuple[str, ...]) -> list[str]:
    """The hooks among these that the callback's class defines (not Callback's own)."""
    return [h for h in hooks if getattr(callback, h) is not getattr(Callback, h)]


def ordered(callbacks: list[Callback]) -> list[Callback]:
    """As Lightning orders a Trainer's callbacks: checkpoints last, after what they save."""
    return sorted(callbacks, key=lambda c: isinstance(c, Checkpoint))


class JobView:
    """The Trainer as one job's callbacks see it: that job's epoch metrics (the means over its
    own replicas, what the module's self.log gives a lone run), its loggers, its directory,
    its checkpoint callbacks and its own should_stop; everything else is the fit's Trainer
    (its epoch, its step, its strategy, its optimizers, which the fit's jobs share).
    save_checkpoint writes the job's own share of the fit's checkpoint (checkpoints.py)."""

    def __init__(self, trainer: L.Trainer, job: Any):  # job: record.JobRecorder
        self.trainer, self.job = trainer, job

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trainer, name)

    @property
    def callback_metrics(self) -> dict[str, Any]:
        return self.job.callback_metrics

    logged_metrics = progress_bar_metrics = callback_metrics

    @property
    def should_stop(self) -> bool:
        return self.job.stop_requested

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.job.stop_requested = bool(value)

    @property
    def loggers(self) -> list[Any]:
        return self.job.loggers

    @property
    def logger(self) -> Any:
        return self.job.loggers[0] if self.job.loggers else None

    @property
    def log_dir(self) -> str:
        return str(self.job.dir)

    @property
    def default_root_dir(self) -> str:
        return str(self.job.dir)

    @property
    def callbacks(self) -> list[Callback]:
        return self.job.callbacks

    @property
    def checkpoint_callbacks(self) -> list[Checkpoint]:
        return [c for c in self.job.callbacks if isinstance(c, Checkpoint)]

    @property
    def checkpoint_callback(self) -> Checkpoint | None:
        return next(iter(self.checkpoint_callbacks), None)

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        return [c for c in self.job.callbacks if isinstance(c, EarlyStopping)]

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        return next(iter(self.early_stopping_callbacks), None)

    def save_checkpoint(
        self, filepath: Any, weights_only: bool = False, storage_options: Any = None
    ) -> None:
        self.trainer.save_checkpoint(filepath, weights_only, storage_options)
