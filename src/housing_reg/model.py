"""The 13-64-64-1 MLP with a configurable output head, as R vectorized replicas.

Every layer's weights are stacked along a leading replica axis and applied with one batched
matmul, so R independent models train in one job for about the cost of one: replica r's loss
touches only replica r's weights, and RMSprop's state is per element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional import mean_absolute_error, mean_squared_error


class StackedMLP(nn.Module):
    """R independent MLPs: x (R, B, F) or (B, F) -> (R, B, 1) before the head."""

    def __init__(self, num_features: int, hidden: Sequence[int], seeds: Sequence[int]):
        super().__init__()
        sizes = [num_features, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            self.weights.append(nn.Parameter(torch.empty(len(seeds), fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.zeros(len(seeds), 1, fan_out)))
        self.reset_parameters(seeds)

    @torch.no_grad()
    def reset_parameters(self, seeds: Sequence[int]) -> None:
        """Keras defaults: Glorot-uniform weights, zero biases; replica r draws from seeds[r]."""
        for r, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            for w in self.weights:
                limit = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
                w[r].copy_(torch.rand(w.shape[1:], generator=g) * 2 * limit - limit)

    @property
    def replicas(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.expand(self.replicas, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x


class Regressor(L.LightningModule):
    """Trains R replicas on scaled targets; reports every metric in the target's own units.

    The input standardizer and target scaler travel with the model as buffers, and the feature
    names as a hyperparameter, so a checkpoint alone turns raw CSV columns into predictions in
    original units.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: Callable[[Iterable], torch.optim.Optimizer],
        num_features: int = 13,
        hidden: Sequence[int] = (64, 64),
        seeds: Sequence[int] = (0,),
        x_shift=0.0,
        x_scale=1.0,
        y_shift=0.0,
        y_scale=1.0,
        head_name: str = "none",
        features: Sequence[str] = (),
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=["head", "optimizer", "x_shift", "x_scale", "y_shift", "y_scale"]
        )
        self.automatic_optimization = False  # one plain step per mini-batch, no closures
        self.net = StackedMLP(num_features, list(hidden), list(seeds))
        self.head = head
        self.optimizer_factory = optimizer
        for name, v in (
            ("x_shift", x_shift),
            ("x_scale", x_scale),
            ("y_shift", y_shift),
            ("y_scale", y_scale),
        ):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).reshape(-1))
        self.history: dict[str, list[list[float]]] = empty_history()
        self.test_predictions: torch.Tensor | None = None  # (R, n_test), original units
        self.test_targets: torch.Tensor | None = None
        # Set by train(): save a checkpoint there every checkpoint_every epochs and at the end.
        self.checkpoint_path: str | None = None
        self.checkpoint_every = 1

    def __setattr__(self, name: str, value: object) -> None:
        # The trainer sets this string ~20 times per batch; nn.Module.__setattr__'s parameter
        # and buffer bookkeeping on it cost ~20% of Lightning's own per-step time.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def replicas(self) -> int:
        return self.net.replicas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled features -> scaled predictions, shape (R, B, 1)."""
        return self.head(self.net(x))

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.y_scale + self.y_shift

    @torch.no_grad()
    def predict_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw CSV features (N, F) -> predictions in original units, shape (R, N)."""
        x = (x_raw.to(self.x_shift) - self.x_shift) / self.x_scale
        return self.unscale(self(x)).squeeze(-1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["history"] = self.history  # a resumed run reports the whole curve

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("history", empty_history())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    # -- training: per-step work is forward, backward, step and one buffer write ----------
    def on_train_start(self) -> None:
        self._opt = self.optimizers()  # looked up once, not per step

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        self._pred = torch.empty(self.replicas, len(loader.x), device=self.device)
        self._true = torch.empty_like(self._pred)
        self._batch_size, self._block_rows = loader.batch_size, loader.block_rows

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if all(t.device == device for t in batch):
            return batch  # already in place: skip the generic collection walk each step
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, block: tuple[torch.Tensor, torch.Tensor], block_idx: int) -> None:
        """One optimizer step per mini-batch of the block (see data.EpochBatches)."""
        x, y = block
        start, b = block_idx * self._block_rows, self._batch_size
        for i in range(0, y.shape[1], b):
            xb, yb = x[:, i : i + b], y[:, i : i + b]
            pred = self(xb)
            # Sum over replicas of each replica's mean loss, so gradients stay per replica.
            loss = F.mse_loss(pred, yb, reduction="sum") / yb.shape[1]
            self._opt.zero_grad()
            self.manual_backward(loss)
            self._opt.step()
            self._pred[:, start + i : start + i + yb.shape[1]] = pred.detach().squeeze(-1)
        self._true[:, start : start + y.shape[1]] = y.squeeze(-1)

    def on_train_epoch_end(self) -> None:
        pred, true = self._pred, self._true
        if not torch.isfinite(pred).all():
            raise FloatingPointError(
                f"training diverged in epoch {self.current_epoch + 1}: predictions became NaN/inf; "
                "lower optim.lr or scale the targets (data.target_scaling=standard)"
            )
        loss = (pred - true).square().mean()
        mae = per_replica(mean_absolute_error, self.unscale(pred), self.unscale(true))
        self.history["train/mae"].append(mae.tolist())
        self.log_spread("train/mae", mae)
        self.log("train/loss", loss)
        done = self.current_epoch + 1
        if self.checkpoint_path and (
            done % self.checkpoint_every == 0 or done == self.trainer.max_epochs
        ):
            # Here, after the NaN check, not in a ModelCheckpoint: Lightning calls each callback
            # ~5 times per step, ~10 us each for that one, whether it acts or not.
            self.trainer.save_checkpoint(self.checkpoint_path, weights_only=False)  # + optimizer

    # -- evaluation: each split is one full batch ------------------------------------------
    def predict_split(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A scaled (x, y) split -> predictions (R, N) and targets (R, N), original units."""
        x, y = batch
        pred = self.unscale(self(x)).squeeze(-1)
        return pred, self.unscale(y).squeeze(-1).expand_as(pred)

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        mae = per_replica(mean_absolute_error, *self.predict_split(batch))
        self.history["val/mae"].append(mae.tolist())
        self.log_spread("val/mae", mae)

    def test_step(self, batch, batch_idx: int) -> None:
        pred, true = self.predict_split(batch)
        self.test_predictions, self.test_targets = pred, true[0]
        self.test_mae = per_replica(mean_absolute_error, pred, true)
        self.test_mse = per_replica(mean_squared_error, pred, true)
        self.log_spread("test/mae", self.test_mae)
        self.log_spread("test/mse", self.test_mse)

    def log_spread(self, name: str, per_rep: torch.Tensor) -> None:
        """One scalar for one model; mean, std, min and max across replicas otherwise."""
        self.log(name, per_rep.mean())
        if len(per_rep) > 1:
            self.log(f"{name}_std", per_rep.std())
            self.log(f"{name}_min", per_rep.min())
            self.log(f"{name}_max", per_rep.max())


def empty_history() -> dict[str, list[list[float]]]:
    """Per-epoch metrics, one list of per-replica values per epoch."""
    return {"train/mae": [], "val/mae": []}


def per_replica(metric, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """A torchmetrics functional metric applied to each replica's row: (R, N) -> (R,)."""
    return torch.stack([metric(p, t) for p, t in zip(pred, true, strict=True)])
