"""Validated arrays -> Keras-compatible split -> scaling -> a LightningDataModule.

Everything is held in memory as tensors: the data set is 506 rows, so a DataLoader with
per-sample collation would cost several times the model's own work at batch size 1.
The CSV itself is read by csvfile.load_csv.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from housing_reg.csvfile import BOSTON_CSV, DIALECT, DataError, load_csv

# Bundled data sets (data.name, read when data.path is null): CSV in datasets/, target's unit.
BUNDLED = {"boston": ("boston.csv", "$1000s"), "diabetes": ("diabetes.csv", "")}
TARGET_SCALINGS = ("none", "standard", "minmax")
# Defaults of settings that jobs recorded before them lack (memory.py, settings.py, evaluate.py
# read them from here): optimizer steps per block handed to Lightning, rows per evaluation chunk.
STEPS_PER_BLOCK = 16
EVAL_BATCH_SIZE = 4096


# The model trains, and keeps its scalers, in float32.
F32_MAX = float(np.finfo(np.float32).max)  # 3.4e38
F32_TINY = float(np.finfo(np.float32).tiny)  # 1.2e-38, the smallest normal float32
F32_SQRT_MAX = math.sqrt(F32_MAX)  # 1.8e19: the square of anything larger overflows float32


def keras_split(n: int, test_split: float = 0.2, seed: int = 113) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of keras.datasets.boston_housing.load_data(test_split, seed)."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    n_train = int(n * (1 - test_split))
    return idx[:n_train], idx[n_train:]


def fold_split(n: int, num_folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous K-fold over rows that the Keras split has already shuffled."""
    chunks = np.array_split(np.arange(n), num_folds)
    val = chunks[fold]
    return np.concatenate([c for k, c in enumerate(chunks) if k != fold]), val


@dataclass(frozen=True)
class Affine:
    """x -> (x - shift) / scale, fitted on training rows only."""

    shift: np.ndarray | float
    scale: np.ndarray | float

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return (a - self.shift) / self.scale

    def inverse(self, a):
        return a * self.scale + self.shift


def mean_std(
    a: np.ndarray, names: Sequence[str] | None = None, what: str = "column"
) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and standard deviation of each column (like Keras examples, sklearn).

    Exact in float64 for any finite input: each column is first scaled by the power of two at
    its largest magnitude, which changes no digit, so nothing squared can overflow (a.std() of a
    column of 1e200s is inf). In float64's ordinary range the result is bit for bit
    a.mean(axis=0) and a.std(axis=0). A non-finite value is a DataError naming the column (from
    names, if given).
    """
    a = np.asarray(a, dtype=np.float64)
    finite = np.atleast_1d(np.isfinite(a).all(axis=0))
    if not finite.all():
        j = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{_column(names, j, what)}: non-finite values cannot be standardized")
    _, exp = np.frexp(np.abs(a).max(axis=0))
    unit = np.ldexp(a, -exp)  # every |value| < 1
    # The mean lies in the column's range: rounding must not carry it past float64's.
    mean = np.ldexp(np.clip(unit.mean(axis=0), unit.min(axis=0), unit.max(axis=0)), exp)
    with np.errstate(over="ignore"):  # (max - min) / 2 at most, but rounding could pass F64MAX
        std = np.ldexp(unit.std(axis=0), exp)
    wide = ~np.isfinite(np.atleast_1d(std))
    if wide.any():
        j = int(np.flatnonzero(wide)[0])
        raise DataError(
            f"{_column(names, j, what)}: values spread too widely to standardize in float64; "
            "rescale that column"
        )
    return mean, std


def standardizer(a: np.ndarray, names: Sequence[str] | None = None) -> Affine:
    """x -> (x - mean) / std for each column of a (the training rows), from mean_std; a column
    of zero spread gets scale 1.

    The model trains in float32, so a column that float32 cannot hold or standardize is
    refused up front: a DataError naming it (from names, if given). That is a column with
    values beyond float32's range (3.4e38), or a spread below its smallest normal number
    (1.2e-38). The standardized
    rows are then within sqrt(rows) of 0, so they and their squares fit float32 whatever the
    column; rows not fitted on can be farther (see check_scaled).
    """
    return _standardizer(a, names, min_spread=F32_TINY)


def _standardizer(
    a: np.ndarray, names: Sequence[str] | None, min_spread: float, what: str = "column"
) -> Affine:
    a = np.asarray(a, dtype=np.float64)
    mean, std = mean_std(a, names, what)
    peak = np.atleast_1d(np.abs(a).max(axis=0))
    if (peak > F32_MAX).any():
        j = int(np.flatnonzero(peak > F32_MAX)[0])
        raise DataError(
            f"{_column(names, j, what)}: values up to {peak[j]:.3g} cannot be standardized in "
            f"float32 (at most {F32_MAX:.3g}); rescale that column"
        )
    # x - shift, in float32: values near both ends of its range are too far apart
    reach = np.atleast_1d(np.abs(a - mean).max(axis=0))
    if (reach > F32_MAX).any():
        j = int(np.flatnonzero(reach > F32_MAX)[0])
        raise DataError(
            f"{_column(names, j, what)}: values from {np.atleast_1d(a.min(axis=0))[j]:.3g} to "
            f"{np.atleast_1d(a.max(axis=0))[j]:.3g} cannot be standardized in float32 "
            f"(differences of at most {F32_MAX:.3g}); rescale that column"
        )
    spread = np.atleast_1d(std)
    tiny = (spread > 0) & (spread < min_spread)
    if tiny.any():
        j = int(np.flatnonzero(tiny)[0])
        raise DataError(
            f"{_column(names, j, what)}: values spread by only {spread[j]:.3g} cannot be "
            f"standardized in float32 (at least {min_spread:.3g}); rescale that column"
        )
    return Affine(mean, np.where(std > 0, std, 1.0))


def target_scaler(
    y: np.ndarray, kind: str, target_range: Sequence[float], name: str | None = None
) -> Affine:
    """The target's scaler; name (the target column) goes into its error messages.

    Refused up front, as the model trains and reports in float32: targets beyond
    sqrt(float32 max) = 1.8e19, whose squared errors (the loss unscaled, test/mse always)
    overflow float32; with minmax, a shift or scale beyond float32's range.
    """
    label = f"target column {name!r}" if name else "the target"
    peak = float(np.abs(y).max())
    if not peak <= F32_SQRT_MAX:  # test/mse is reported in the target's units, in float32
        hint = "set data.target_scaling=standard" if kind == "none" else "rescale that column"
        raise DataError(
            f"{label}: values up to {peak:.3g} overflow float32 when squared in the MSE "
            f"loss and test/mse; {hint}"
        )
    if kind == "none":
        return Affine(0.0, 1.0)
    if kind == "standard":
        # A spread too small for float32 only costs the unscaled target less than itself.
        return _standardizer(y, name and [name], min_spread=0.0, what="target column")
    lo, hi = target_range
    # Map [min, max] of the training targets onto [lo, hi] (a constant target onto lo).
    y_min, y_max = float(y.min()), float(y.max())
    span = y_max - y_min  # Python floats: beyond float64, inf and no warning
    scale = (span if span > 0 else 1.0) / (hi - lo)
    shift = y_min - lo * scale
    if not max(-y_min, y_max, abs(shift), scale) <= F32_MAX:
        raise DataError(
            f"{label}: values from {y_min:.3g} to {y_max:.3g} mapped onto [{lo:g}, {hi:g}] "
            f"need shift {shift:.3g} and scale {scale:.3g}, which float32 cannot hold; "
            "rescale that column"
        )
    return Affine(np.float64(shift), np.float64(scale))


def check_scaled(scaler: Affine, a: np.ndarray, names: Sequence[str] | None = None) -> None:
    """Refuse values that scaler takes beyond what the model can train on in float32.

    A scaled value beyond sqrt(float32 max) = 1.8e19 in magnitude has a square (in an MSE loss,
    a variance) that overflows float32. The rows a standardizer was fitted on never scale that
    far; other rows (validation, test) can, if far outside the range of those.
    """
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.asarray(scaler(a)).reshape(len(a), -1)
    far = ~(np.abs(z) <= F32_SQRT_MAX)  # inf and nan too
    if far.any():
        i, j = (int(k[0]) for k in np.nonzero(far))
        raise DataError(
            f"{_column(names, j)}: {a.reshape(len(a), -1)[i, j]:.6g} scales to {z[i, j]:.3g}, "
            "too far from the rows the scaler was fitted on for float32; check that row or "
            "rescale that column"
        )


def _column(names: Sequence[str] | None, j: int, what: str = "column") -> str:
    if names:
        return f"{what} {names[j]!r}"
    return "the target" if what == "target column" else f"{what} {j}"


class EpochBatches:
    """One epoch of mini-batches for R replicas, each replica with its own seeded order.

    Lightning is handed blocks: lists of `steps_per_block` consecutive mini-batches, each x of
    shape (R, B, F) and y of shape (R, B, 1), which the model takes as one optimizer step each.
    Lightning's loop costs about as much per batch it hands over as a whole batch-size-1 step,
    so blocks keep that cost off most steps (scripts/bench.py, "steps_per_block=1" row); the
    training is the same for any block size. The order for replica r in epoch e depends only
    on (seed_r, e), so a resumed run or a lone replica sees the same mini-batches.

    The contract, for anyone writing a callback: on_train_batch_start/end fire once per block;
    trainer.global_step counts optimizer steps (one per mini-batch), and TensorBoard's x-axis
    and the progress bar (epochs) never show blocks.
    """

    def __init__(
        self,
        x: torch.Tensor,  # (N, F), or (R, N, F): one set of rows per replica
        y: torch.Tensor,  # (N, 1) or (R, N, 1)
        batch_size: int,
        seeds: Sequence[int],
        epoch: Callable[[], int],
        steps_per_block: int = 1,
    ):
        self.x, self.y, self.batch_size, self.seeds, self.epoch = x, y, batch_size, seeds, epoch
        self.steps_per_block = steps_per_block

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.rows / self.batch_size) / self.steps_per_block)

    @property
    def rows(self) -> int:
        return self.x.shape[-2]

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        e = self.epoch()
        index = np.int32 if self.rows < 2**31 else np.int64  # R x N of them: half the memory
        order = torch.from_numpy(
            np.stack(
                [
                    np.random.default_rng((s, e)).permutation(self.rows).astype(index)
                    for s in self.seeds
                ]
            )
        )
        b = self.batch_size
        per_block = b * self.steps_per_block
        r = torch.arange(len(self.seeds)).unsqueeze(1)
        # Gathered one block at a time: a whole epoch for every replica, (R, N, F), would not
        # fit at a million rows and a hundred replicas.
        for k in range(0, self.rows, per_block):
            rows = order[:, k : k + per_block]
            if self.x.dim() == 2:  # rows shared by every replica
                x, y = self.x[rows], self.y[rows]
            else:  # each replica its own rows (jobs with other folds or scalers in one fit)
                x, y = self.x[r, rows], self.y[r, rows]
            yield [(x[:, i : i + b], y[:, i : i + b]) for i in range(0, rows.shape[1], b)]


class Chunks:
    """An evaluation split in chunks of `rows` rows (none if the split is empty): the
    activations of every replica for every row at once would not fit at scale."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: int):
        self.x, self.y, self.rows = x, y, rows

    def __len__(self) -> int:
        return math.ceil(self.x.shape[-2] / self.rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.x.shape[-2], self.rows):
            yield self.x[..., i : i + self.rows, :], self.y[..., i : i + self.rows, :]


class Batches(L.LightningDataModule):
    """Serves `splits` ({"train", "val", "test"}: scaled x and y) to Lightning: training rows
    in seeded blocks, evaluation splits in chunks of eval_batch_size rows."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    seeds: Sequence[int]
    batch_size: int
    steps_per_block: int
    eval_batch_size: int

    @property
    def has_validation(self) -> bool:
        return self.splits["val"][0].shape[-2] > 0

    def train_dataloader(self) -> EpochBatches:
        x, y = self.splits["train"]
        return EpochBatches(
            x,
            y,
            self.batch_size,
            self.seeds,
            lambda: self.trainer.current_epoch if self.trainer else 0,
            self.steps_per_block,
        )

    def val_dataloader(self) -> Chunks:
        return Chunks(*self.splits["val"], self.eval_batch_size)

    def test_dataloader(self) -> Chunks:
        return Chunks(*self.splits["test"], self.eval_batch_size)


class RegressionData(Batches):
    """A numeric CSV split Keras-style into train/test, with optional validation fold.

    The settings are checked on construction; the file is read, split and scaled in setup(),
    as Lightning intends. train.py calls setup() itself before the model is built (the model
    carries the scalers); Lightning's own call then finds it done.
    """

    def __init__(
        self,
        path: str | None = None,
        target: str = "MEDV",
        features: Sequence[str] | None = None,
        test_split: float = 0.2,
        split_seed: int = 113,
        val_fraction: float = 0.0,
        num_folds: int = 0,
        fold: int = 0,
        batch_size: int = 1,
        steps_per_block: int = STEPS_PER_BLOCK,
        eval_batch_size: int = EVAL_BATCH_SIZE,
        target_scaling: str = "none",
        target_range: Sequence[float] = (0.0, 1.0),
        name: str = "boston",
        target_label: str | None = None,
        target_unit: str | None = None,
        seeds: Sequence[int] = (0,),
        delimiter: str = DIALECT["delimiter"],
        decimal: str = DIALECT["decimal"],
    ):
        """seeds: one shuffling order per model replica (model.replica_seeds)."""
        super().__init__()
        check_settings(
            test_split,
            val_fraction,
            num_folds,
            fold,
            batch_size,
            steps_per_block,
            eval_batch_size,
            target_scaling,
            target_range,
        )
        if path is None and name not in BUNDLED:
            raise DataError(
                f"data.name={name!r}: choose one of {', '.join(BUNDLED)} or set data.path"
            )
        self.path, self.target, self.wanted_features = path, target, features
        self.test_split, self.split_seed = test_split, split_seed
        self.val_fraction, self.num_folds, self.fold = val_fraction, num_folds, fold
        self.batch_size, self.steps_per_block, self.seeds = batch_size, steps_per_block, seeds
        self.eval_batch_size = eval_batch_size
        self.target_scaling, self.target_range = target_scaling, target_range
        self.name, self.label, self.unit = name, target_label, target_unit
        self.delimiter, self.decimal = delimiter, decimal

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "splits"):
            return
        path, name = self.path, self.name
        csv_file, unit = ("", "") if path is not None else BUNDLED[name]
        source = BOSTON_CSV.with_name(csv_file) if path is None else path
        # one-line errors for a bad path too
        table = load_csv(
            source,
            self.target,
            self.wanted_features,
            delimiter=self.delimiter,
            decimal=self.decimal,
        )
        self.file = file_fingerprint(Path(source))  # recorded: resume and evaluate check it
        self.features, self.target = table.features, table.target
        self.dataset = name if path is None else Path(path).stem
        self.target_label = self.label or table.target
        self.target_unit = unit if self.unit is None else self.unit
        train_idx, test_idx = keras_split(len(table.y), self.test_split, self.split_seed)
        if self.num_folds:
            fit_idx, val_idx = fold_split(len(train_idx), self.num_folds, self.fold)
        elif self.val_fraction:
            n_val = max(1, round(len(train_idx) * self.val_fraction))
            fit_idx, val_idx = (
                np.arange(len(train_idx) - n_val),
                np.arange(len(train_idx) - n_val, len(train_idx)),
            )
        else:
            fit_idx, val_idx = np.arange(len(train_idx)), np.arange(0)
        fit_idx, val_idx = train_idx[fit_idx], train_idx[val_idx]
        wants_val = bool(self.num_folds or self.val_fraction)
        if len(fit_idx) < 2 or len(test_idx) < 1 or (wants_val and len(val_idx) < 1):
            raise DataError(
                f"data: {len(table.y)} rows leave {len(fit_idx)} to train on, "
                f"{len(val_idx)} to validate and {len(test_idx)} to test; supply more rows "
                "or change data.test_split / data.val_fraction / data.num_folds"
            )
        if self.batch_size > len(fit_idx):
            raise DataError(
                f"data.batch_size={self.batch_size} is larger than the {len(fit_idx)} "
                "training rows; choose a batch size between 1 and that"
            )
        x_fit, y_fit = table.x[fit_idx], table.y[fit_idx]
        if np.all(y_fit == y_fit[0]):
            raise DataError(
                f"data: target {table.target!r} is constant ({y_fit[0]:g}) on all "
                f"{len(fit_idx)} training rows; there is nothing to learn, check data.target"
            )
        self.x_scaler = standardizer(x_fit, table.features)
        self.y_scaler = target_scaler(y_fit, self.target_scaling, self.target_range, table.target)
        # Rows not fitted on (validation, test) can lie far outside the training range.
        check_scaled(self.x_scaler, table.x, table.features)
        check_scaled(self.y_scaler, table.y, [table.target])
        self.splits = {
            split: (self._x(table.x[idx]), self._y(table.y[idx]))
            for split, idx in (("train", fit_idx), ("val", val_idx), ("test", test_idx))
        }

    def _x(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.x_scaler(a), dtype=torch.float32)

    def _y(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.y_scaler(a), dtype=torch.float32).unsqueeze(-1)

    @property
    def num_features(self) -> int:
        return len(self.features)

    def model_inputs(self) -> dict[str, Any]:
        """What the model must carry to turn raw CSV columns into predictions on its own."""
        return {
            "num_features": self.num_features,
            "features": list(self.features),
            "x_shift": self.x_scaler.shift,
            "x_scale": self.x_scaler.scale,
            "y_shift": self.y_scaler.shift,
            "y_scale": self.y_scaler.scale,
        }

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        """Model outputs (or scaled targets) back in the CSV's units."""
        return self.y_scaler.inverse(y.double()).float()


class FitData(Batches):
    """The rows of one fit of several jobs: each job's own rows and scalers (its
    RegressionData, set up), one copy per replica, stacked in replica order. A fit of one job
    shares its rows across its replicas, as a lone run always has."""

    def __init__(self, jobs: Sequence[RegressionData]):
        super().__init__()
        self.parts = jobs
        first = jobs[0]
        self.batch_size, self.steps_per_block = first.batch_size, first.steps_per_block
        self.eval_batch_size = first.eval_batch_size
        self.seeds = [s for d in jobs for s in d.seeds]
        self.jobs = len(jobs)

    @property
    def has_validation(self) -> bool:
        return self.parts[0].has_validation

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "splits"):
            return
        for d in self.parts:
            d.setup(stage)
        if len(self.parts) == 1:
            self.splits = self.parts[0].splits
            return
        self.splits = {
            name: tuple(
                torch.cat([d.splits[name][k].expand(len(d.seeds), -1, -1) for d in self.parts])
                for k in (0, 1)
            )
            for name in self.parts[0].splits
        }

    @property
    def models(self) -> int:
        return len(self.seeds)


def file_fingerprint(path: Path) -> dict[str, str]:
    """The data file's absolute path and the SHA-256 of its bytes: a job records both, so
    that resume=true and evaluate can tell the very file from another one of the same name."""
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_settings(
    test_split: float,
    val_fraction: float,
    num_folds: int,
    fold: int,
    batch_size: int,
    steps_per_block: int,
    eval_batch_size: int,
    target_scaling: str,
    target_range: Sequence[float],
) -> None:
    if not 0 < test_split < 1:
        raise DataError(
            f"data.test_split={test_split} must lie strictly between 0 and 1 (e.g. 0.2)"
        )
    if not 0 <= val_fraction < 1:
        raise DataError(
            f"data.val_fraction={val_fraction} must be in [0, 1) (0 = no validation set)"
        )
    if num_folds == 1 or num_folds < 0:
        raise DataError(f"data.num_folds={num_folds} must be 0 (no cross-validation) or >= 2")
    if num_folds and not 0 <= fold < num_folds:
        raise DataError(
            f"data.fold={fold} must be in [0, {num_folds}) for data.num_folds={num_folds}"
        )
    if num_folds and val_fraction:
        raise DataError(
            f"data.val_fraction={val_fraction} with data.num_folds={num_folds}: with folds, "
            "each fold's held-out part is the validation set; set data.val_fraction=0"
        )
    if not num_folds and fold != 0:
        raise DataError(
            f"data.fold={fold} needs cross-validation: set data.num_folds >= {max(2, fold + 1)}"
        )
    if batch_size < 1:
        raise DataError(f"data.batch_size={batch_size} must be >= 1")
    if target_scaling not in TARGET_SCALINGS:
        raise DataError(
            f"data.target_scaling={target_scaling!r} is unknown; choose one of "
            f"{', '.join(TARGET_SCALINGS)}"
        )
    if len(target_range) != 2 or not target_range[0] < target_range[1]:
        raise DataError(
            f"data.target_range={list(target_range)} must be [low, high] with "
            "low < high, e.g. [0, 1] for sigmoid or [-1, 1] for tanh"
        )
    if steps_per_block < 1:
        raise DataError(f"data.steps_per_block={steps_per_block} must be >= 1")
    if eval_batch_size < 1:
        raise DataError(
            f"data.eval_batch_size={eval_batch_size} must be >= 1 (rows per evaluation chunk)"
        )
