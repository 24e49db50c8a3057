"""A Ctrl-C, or an early stop, at a known point, for the interrupt tests (added with
+callbacks.interrupt=...)."""

import os
import signal

import lightning as L


def ctrl_c() -> None:
    """SIGINT to this process, as a user's Ctrl-C would send it.

    A process started in the background by a non-interactive shell (a CI runner's `cmd &`)
    inherits SIGINT ignored, and Python then keeps it ignored: give the signal back its usual
    meaning, as in a terminal, so the Ctrl-C lands."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(os.getpid(), signal.SIGINT)


class InterruptAt(L.Callback):
    """Ctrl-C when epoch `epoch` starts: after the previous epoch's checkpoint, before
    training ends, whatever the machine's speed. Per job in a fused fit (`fuses`): the first
    job to reach that epoch stops the whole fit, as a Ctrl-C does."""

    fuses = True

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            ctrl_c()


class InterruptAtSetup(L.Callback):
    """Ctrl-C while Lightning sets the fit up: before anything of it is recorded."""

    def setup(self, trainer: L.Trainer, model: L.LightningModule, stage: str) -> None:
        ctrl_c()


class StopAt(L.Callback):
    """Stops training once `epochs` epochs are done, as an early-stopping callback would."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, model: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
