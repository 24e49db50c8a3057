"""One progress bar per fit, over epochs: how many jobs and models it trains, and the latest
train and validation MAE (the mean over replicas) when it trains one job.

Lightning's own bar counts the batches it is handed, and here a batch is a block of optimizer
steps (data.EpochBatches); an epoch is the unit a user reasons in (7 by default).
"""

from __future__ import annotations

import sys

import lightning as L
from tqdm import tqdm


class EpochProgress(L.Callback):
    def __init__(self, refresh_rate: int = 1):
        """refresh_rate: redraw every this many epochs; 0 hides the bar."""
        self.refresh_rate = refresh_rate
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if self.refresh_rate:
            self.bar = tqdm(
                total=trainer.max_epochs,
                initial=trainer.current_epoch,
                desc=describe(trainer.datamodule),
                unit="epoch",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0,
            )

    def on_train_epoch_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.bar is not None and epoch > self.bar.n and epoch % self.refresh_rate == 0:
            self._show(trainer, model)  # the epoch before this one has finished, metrics included

    def on_train_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if self.bar is not None:
            self._show(trainer, model)
            self.bar.close()
            self.bar = None

    def _show(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if getattr(trainer.datamodule, "jobs", 1) == 1:
            results = getattr(model, "results", {})
            shown = {
                k: f"{results[k].mean():.3f}" for k in ("train/mae", "val/mae") if k in results
            }
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(trainer.current_epoch - self.bar.n)


def describe(data: object) -> str:
    """ "training", or "training 4 jobs, 40 models" for a fused fit."""
    jobs, models = getattr(data, "jobs", 1), getattr(data, "models", 1)
    return "training" if jobs == 1 else f"training {jobs} jobs, {models} models"
