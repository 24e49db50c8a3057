"""A progress bar over epochs, with the latest train and validation MAE.

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
                desc="training",
                unit="epoch",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0,
            )

    def on_train_epoch_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.bar is not None and epoch > self.bar.n and epoch % self.refresh_rate == 0:
            self._show(trainer)  # the epoch before this one has finished, metrics included

    def on_train_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if self.bar is not None:
            self._show(trainer)
            self.bar.close()
            self.bar = None

    def _show(self, trainer: L.Trainer) -> None:
        shown = {k: f"{v:.3f}" for k, v in trainer.callback_metrics.items() if k.endswith("/mae")}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(trainer.current_epoch - self.bar.n)
