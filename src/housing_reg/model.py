"""The 13-64-64-1 MLP with a configurable output head, as R vectorized replicas.

Every layer's weights are stacked along a leading replica axis and applied with one batched
matmul, so R independent models train in one fit for about the cost of one: replica r's loss
touches only replica r's weights, and RMSprop's state is per element. The replicas of one fit
may belong to several jobs (a fused sweep, train.py): each job's replicas get its own head
(Heads), and its own inputs, targets and target scaler (per-replica buffers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]  # x (R, B, F) or (N, F), y (R, B, 1) or (N, 1)


def replica_seeds(seed: int, replicas: int) -> list[int]:
    """Replica r is the lone run with seed + r: same initial weights, same batch order."""
    return [seed + r for r in range(replicas)]


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
        weights, biases = list(self.weights), list(self.biases)
        if self.replicas == 1:
            # A batched matmul of one matrix takes another kernel than one of several, which
            # rounds differently in the last bits. A detached twin (no gradient reaches it)
            # keeps a lone model's numbers those of the same replica in any fused fit.
            x = torch.cat([x, x])
            weights = [torch.cat([w, w.detach()]) for w in weights]
            biases = [torch.cat([b, b.detach()]) for b in biases]
        last = len(weights) - 1
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x[: self.replicas]


class Heads(nn.Module):
    """Each job's own output activation on its own replicas: parts are (replicas, activation)
    in replica order, one per job, so that each call sees the very tensor shape of the job's
    lone run (elementwise kernels round their vectorized body and scalar tail differently)."""

    def __init__(self, parts: Sequence[tuple[int, nn.Module]]):
        super().__init__()
        self.sizes = [n for n, _ in parts]
        self.parts = nn.ModuleList(m for _, m in parts)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pieces = z.split(self.sizes)
        return torch.cat([m(p) for m, p in zip(self.parts, pieces, strict=True)])


class Regressor(L.LightningModule):
    """Trains R replicas on scaled targets; measures every metric in the target's own units.

    A training batch is a block of mini-batches (data.EpochBatches), one optimizer step each.
    Per-replica results of the latest epoch and test sit in `results`, for the job recorders
    (record.py), which log and write them job by job. The input standardizer and target scaler
    travel with the model as buffers, and the feature names as a hyperparameter, so a
    checkpoint alone turns raw CSV columns into predictions. In a fit of several jobs the
    buffers hold one scaler per replica, shape (R, 1, F) and (R, 1, 1), and `seeds` the seed
    of each replica.
    """

    def __init__(
        self,
        head: nn.Module,
        optimizer: Callable[[Iterable], torch.optim.Optimizer] | None,
        num_features: int = 13,
        hidden: Sequence[int] = (64, 64),
        replicas: int = 1,
        seed: int = 0,
        head_name: str = "none",
        features: Sequence[str] = (),
        x_shift=0.0,
        x_scale=1.0,
        y_shift=0.0,
        y_scale=1.0,
        seeds: Sequence[int] | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "head",
                "optimizer",
                "lr_scheduler",
                "x_shift",
                "x_scale",
                "y_shift",
                "y_scale",
                "seeds",
            ]
        )
        self.scheduler_factory = lr_scheduler
        self.automatic_optimization = False  # one plain step per mini-batch, no closures
        self.seeds = list(seeds) if seeds is not None else replica_seeds(seed, replicas)
        self.net = StackedMLP(num_features, list(hidden), self.seeds)
        self.head = head
        self.optimizer_factory = optimizer
        # Inputs are scaled in float64, as the data module does, so that evaluating a raw CSV
        # reproduces training-time predictions whatever the column offsets (timestamps, ...).
        for name, v, dtype in (
            ("x_shift", x_shift, torch.float64),
            ("x_scale", x_scale, torch.float64),
            ("y_shift", y_shift, torch.float32),
            ("y_scale", y_scale, torch.float32),
        ):
            t = torch.as_tensor(v, dtype=dtype)
            self.register_buffer(name, t if t.dim() == 3 else t.reshape(-1))
        self.results: dict[str, torch.Tensor] = {}  # per replica, see the class docstring
        self._epoch: list[Batch] = []

    @property
    def replicas(self) -> int:
        return self.net.replicas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled features (N, F) or (R, N, F) -> scaled predictions, shape (R, N, 1)."""
        return self.head(self.net(x))

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        """Scaled (R, N, 1) -> the target's own units."""
        return y * self.y_scale + self.y_shift

    @torch.no_grad()
    def scale_inputs(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw CSV features (N, F) -> the model's float32 inputs, scaled in float64."""
        return ((x_raw.to(self.x_shift) - self.x_shift) / self.x_scale).float()

    @torch.no_grad()
    def predict_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw CSV features (N, F) -> predictions in original units, shape (R, N)."""
        return self.unscale(self(self.scale_inputs(x_raw))).squeeze(-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._epoch = []  # (predictions, targets) of every mini-batch, scaled units

    def training_step(self, block: list[Batch], block_idx: int) -> None:
        """One optimizer step per mini-batch of the block."""
        opt = self.optimizers()
        for x, y in block:
            pred = self(x)
            # Sum over replicas of each replica's mean loss, so gradients stay per replica.
            loss = F.mse_loss(pred, y, reduction="sum") / y.shape[1]
            # Zeroed in place, not freed: at hundreds of replicas, allocating the gradients
            # afresh every step costs more than the step (scripts/bench.py).
            opt.zero_grad(set_to_none=False)
            self.manual_backward(loss)
            if self.hparams.gradient_clip_val is not None:
                self.clip_gradients_per_replica()
            opt.step()
            self._epoch.append((pred.detach(), y))

    @torch.no_grad()
    def clip_gradients_per_replica(self) -> None:
        """trainer.gradient_clip_val, as torch.nn.utils.clip_grad_norm_ / clip_grad_value_ do
        it, but each replica by its own gradient norm: replica r stays the lone run with seed
        + r. (Lightning's own clipping is not available under manual optimization.)"""
        limit = self.hparams.gradient_clip_val
        grads = [p.grad for p in self.net.parameters()]  # each stacked: (R, ...)
        if self.hparams.gradient_clip_algorithm == "value":
            for g in grads:
                g.clamp_(-limit, limit)
            return
        norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
        factor = (limit / (norms + 1e-6)).clamp(max=1.0)  # (R,)
        for g in grads:
            g.mul_(factor.view(-1, *[1] * (g.dim() - 1)))

    def on_train_epoch_end(self) -> None:
        """Per replica: train MAE (target units), loss (scaled units), and whether finite."""
        pred, true = (torch.cat(t, dim=1) for t in zip(*self._epoch, strict=True))
        self._epoch = []
        self.results["train/finite"] = torch.isfinite(pred).flatten(1).all(dim=1)
        self.results["train/mae"] = mae(*(self.unscale(t).squeeze(-1) for t in (pred, true)))
        self.results["train/loss"] = (pred - true).square().squeeze(-1).mean(dim=1)
        self.step_lr_scheduler()

    def step_lr_scheduler(self) -> None:
        """Once per epoch, as Lightning documents for manual optimization (it steps nothing
        itself then); plateau on this epoch's val/mae (one replica: settings.py). train/lr is
        the lr this epoch trained with."""
        opt = self.optimizers()
        lr = opt.param_groups[0]["lr"]
        self.results["train/lr"] = torch.full((self.replicas,), lr)
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(self.results["val/mae"].mean().item())
        else:
            scheduler.step()

    # -- evaluation: each split is one full batch ---------------------------------------------
    def predict_split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A scaled (x, y) split -> predictions (R, N) and targets (R, N), original units."""
        x, y = batch
        pred = self.unscale(self(x)).squeeze(-1)
        true = self.unscale(y.expand(self.replicas, -1, -1) if y.dim() == 2 else y)
        return pred, true.squeeze(-1)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.results["val/mae"] = mae(*self.predict_split(batch))

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        pred, true = self.predict_split(batch)
        self.results |= {
            "test/mae": mae(pred, true),
            "test/mse": mse(pred, true),
            "test/pred": pred,
            "test/true": true,
        }


def mae(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each replica's row: (R, N) -> (R,). Bit for bit what
    torchmetrics' mean_absolute_error gives row by row, without a Python loop over rows."""
    return (pred - true).abs().sum(dim=-1) / true.shape[-1]


def mse(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each replica's row: (R, N) -> (R,), as torchmetrics computes it."""
    diff = pred - true
    return (diff * diff).sum(dim=-1) / true.shape[-1]
