"""The 13-64-64-1 MLP with a configurable output head, as R vectorized replicas.

Every layer's weights are stacked along a leading replica axis and applied with one batched
matmul, so R independent models train in one fit for about the cost of one: replica r's loss
touches only replica r's weights, and RMSprop's state is per element. The replicas of one fit
may belong to several jobs (a fused sweep, train.py): each job's replicas get its own head
(Heads), and its own inputs, targets and target scaler (per-replica buffers).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from housing_reg import kernels

Batch = tuple[torch.Tensor, torch.Tensor]  # x (R, B, F) or (N, F), y (R, B, 1) or (N, 1)


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Denormal floats flushed to zero while training or evaluating (this thread's setting,
    restored after): a saturated head's gradients and RMSprop state decay into them, and the
    CPU's slow path for them made a fused fit with sigmoid replicas twice as slow by its last
    epoch (docs/speed.md). The numbers stay those of the code before (scripts/study.sh: 0 of
    1,120 per-run MAEs differ), and evaluation flushes as training did."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # the default: the caller's arithmetic as it was


@contextlib.contextmanager
def intra_op_threads() -> Iterator[Callable[[int], None]]:
    """Yields torch.set_num_threads for a fit (train.py: cores.Watch sets the threads as it
    trains), and restores the process's threads after it: the next fit starts from those."""
    before = torch.get_num_threads()
    try:
        yield torch.set_num_threads
    finally:
        torch.set_num_threads(before)


def replica_seeds(seed: int, replicas: int) -> list[int]:
    """Replica r is the lone run with seed + r: same initial weights, same batch order."""
    return [seed + r for r in range(replicas)]


class StackedMLP(nn.Module):
    """R independent MLPs: x (R, B, F) or (B, F) -> (R, B, 1) before the head."""

    def __init__(self, num_features: int, hidden: Sequence[int], seeds: Sequence[int]):
        super().__init__()
        sizes = [num_features, *hidden, 1]
        self.sizes = sizes
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
        twin = self.replicas == 1 and kernels.lone_needs_twin(
            x.shape[1], self.sizes, torch.is_grad_enabled()
        )
        if twin:
            # A batched matmul of one matrix may take another kernel than one of several,
            # which rounds differently in the last bits (kernels.py says where). A detached
            # twin (no gradient reaches it) keeps a lone model's numbers those of the same
            # replica in any fused fit.
            x = torch.cat([x, x])
            weights = [torch.cat([w, w.detach()]) for w in weights]
            biases = [torch.cat([b, b.detach()]) for b in biases]
        last = len(weights) - 1
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x[: self.replicas] if twin else x


class Heads(nn.Module):
    """Each job's own output activation on its own replicas: parts are (replicas, activation)
    in replica order, one per job, so that each job's elements take the very kernel path of
    its lone run's call (elementwise kernels round their vectorized body and scalar tail
    differently). Neighbouring jobs share a call where that keeps each job's bits: over all
    their replicas for kernels.EXACT_HEADS, under kernels.SCALAR_BELOW elements for
    SMALL_HEADS where this torch is checked to keep them (kernels.small_calls_scalar). A call costs
    about 27 us a step (forward and backward), which a fit of 40 jobs would pay 40 times."""

    def __init__(self, parts: Sequence[tuple[int, nn.Module]]):
        super().__init__()
        self.replicas = [n for n, _ in parts]
        self.parts = nn.ModuleList(head for _, head in parts)
        self.plans: dict[int, tuple[list[int], list[nn.Module]]] = {}

    def plan(self, rows: int) -> tuple[list[int], list[nn.Module]]:
        """The calls for inputs of `rows` rows a replica: (replicas, activation) each."""
        sizes: list[int] = []
        heads: list[nn.Module] = []
        for n, head in zip(self.replicas, self.parts, strict=True):
            if heads and same_head(heads[-1], head):
                small = (sizes[-1] + n) * rows < kernels.SCALAR_BELOW
                if isinstance(head, kernels.EXACT_HEADS) or (
                    small and kernels.small_calls_scalar(head)
                ):
                    sizes[-1] += n
                    continue
            sizes.append(n)
            heads.append(head)
        return sizes, heads

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rows = z.numel() // z.shape[0]
        if rows not in self.plans:
            self.plans[rows] = self.plan(rows)
        sizes, heads = self.plans[rows]
        # Each activation's forward itself: a module call's hook checks cost about 9 us, which
        # a fit's thousands of steps pay once per call (these modules have no hooks).
        if len(heads) == 1:
            return heads[0].forward(z)
        return torch.cat([m.forward(p) for m, p in zip(heads, z.split(sizes), strict=True)])


def same_head(a: nn.Module, b: nn.Module) -> bool:
    """Both the same activation, settings included (a slope, softplus's beta), of a kind
    whose call jobs may share (kernels.EXACT_HEADS, SMALL_HEADS)."""
    shared = isinstance(a, kernels.EXACT_HEADS + kernels.SMALL_HEADS)
    return type(a) is type(b) and shared and repr(a) == repr(b)


class Regressor(L.LightningModule):
    """Trains R replicas on scaled targets; measures every metric in the target's own units.

    A training batch is a block of mini-batches (data.EpochBatches), one optimizer step each.
    Every metric is a torchmetrics object with one output per replica, fed in chunks of at
    least `metric_rows` rows (data.eval_batch_size; None: each epoch's training rows at once):
    memory stays bounded at any number of rows, and a split that fits in one chunk gets exactly
    the one-batch numbers. Per-replica results
    of the latest epoch and test sit in `results`, for the job recorders (record.py), which log
    and write them job by job. The input standardizer and target scaler
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
        metric_rows: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "head",
                "optimizer",
                "lr_scheduler",
                "metric_rows",
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
        r = self.replicas
        # Metric inputs are (rows, replicas): torchmetrics' multi-output layout.
        self.metrics = nn.ModuleDict(
            {
                "train_mae": MeanAbsoluteError(num_outputs=r),
                "train_loss": MeanSquaredError(num_outputs=r),  # scaled units
                "val_mae": MeanAbsoluteError(num_outputs=r),
                "test_mae": MeanAbsoluteError(num_outputs=r),
                "test_mse": MeanSquaredError(num_outputs=r),
            }
        )
        self.metric_rows = metric_rows
        self._pending: list[Batch] = []  # training predictions not yet fed to the metrics
        self._test: list[tuple[torch.Tensor, torch.Tensor]] = []

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
    def predict(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Scaled features (N, F) -> predictions in original units (R, N), `rows` rows at a
        time, as test_step sees them: every replica's activations for every row need not fit."""
        chunks = [self.unscale(self(x[i : i + rows])) for i in range(0, len(x), rows)]
        return torch.cat(chunks, dim=1).squeeze(-1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._pending = []
        self._finite = torch.ones(self.replicas, dtype=torch.bool, device=self.device)

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
            self._pending.append((pred.detach(), y))
        rows = sum(p.shape[1] for p, _ in self._pending)
        if self.metric_rows is not None and rows >= self.metric_rows:
            self.update_train_metrics()

    def update_train_metrics(self) -> None:
        """Feed the pending mini-batches' predictions to the epoch's metrics, as one chunk."""
        pred, true = (torch.cat(t, dim=1) for t in zip(*self._pending, strict=True))
        self._pending = []
        self._finite &= torch.isfinite(pred).flatten(1).all(dim=1)
        self.metrics["train_mae"].update(*(self.unscale(t).squeeze(-1).T for t in (pred, true)))
        self.metrics["train_loss"].update(pred.squeeze(-1).T, true.squeeze(-1).T)

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
        if self._pending:
            self.update_train_metrics()
        self.results["train/finite"] = self._finite
        self.results["train/mae"] = self.compute("train_mae")
        self.results["train/loss"] = self.compute("train_loss")
        self.step_lr_scheduler()

    def compute(self, name: str) -> torch.Tensor:
        """A metric's per-replica value, shape (R,); then reset for the next epoch."""
        metric = self.metrics[name]
        value = metric.compute().reshape(-1)
        metric.reset()
        return value

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

    # -- evaluation: each split in chunks of data.eval_batch_size rows ------------------------
    def predict_split(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled (x, y) rows -> predictions (R, N) and targets (R, N), original units."""
        x, y = batch
        pred = self.unscale(self(x)).squeeze(-1)
        true = self.unscale(y.expand(self.replicas, -1, -1) if y.dim() == 2 else y)
        return pred, true.squeeze(-1)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.metrics["val_mae"].update(*(t.T for t in self.predict_split(batch)))

    def on_validation_epoch_end(self) -> None:
        value = self.compute("val_mae")
        if not self.trainer.sanity_checking:  # a sanity check sees only a few chunks
            self.results["val/mae"] = value

    def on_test_epoch_start(self) -> None:
        self._test = []

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        pred, true = self.predict_split(batch)
        self.metrics["test_mae"].update(pred.T, true.T)
        self.metrics["test_mse"].update(pred.T, true.T)
        self._test.append((pred, true))

    def on_test_epoch_end(self) -> None:
        pred, true = (torch.cat(t, dim=1) for t in zip(*self._test, strict=True))
        self._test = []
        self.results |= {
            "test/mae": self.compute("test_mae"),
            "test/mse": self.compute("test_mse"),
            "test/pred": pred,
            "test/true": true,
        }


def errors(pred: torch.Tensor, true: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """Per-replica MAE and MSE of predictions (R, N) against targets (R, N) or (N,), fed to
    torchmetrics in chunks of `rows` rows (a model's own test uses Regressor.test_step)."""
    r = pred.shape[0]
    metrics = {"mae": MeanAbsoluteError(num_outputs=r), "mse": MeanSquaredError(num_outputs=r)}
    for i in range(0, pred.shape[1], rows):
        p = pred[:, i : i + rows]
        t = true[..., i : i + rows].expand_as(p)
        for metric in metrics.values():
            metric.update(p.T, t.T)
    return {name: metric.compute().reshape(-1) for name, metric in metrics.items()}
