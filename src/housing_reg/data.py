"""CSV -> validated arrays -> Keras-compatible split -> scaling -> a LightningDataModule.

Everything is held in memory as tensors: the data set is 506 rows, so a DataLoader with
per-sample collation would cost several times the model's own work at batch size 1.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

BOSTON_CSV = Path(str(files("housing_reg") / "datasets" / "boston.csv"))
# Bundled data sets (data.name, read when data.path is null): CSV in datasets/, target's unit.
BUNDLED = {"boston": ("boston.csv", "$1000s"), "diabetes": ("diabetes.csv", "")}
TARGET_SCALINGS = ("none", "standard", "minmax")


class DataError(ValueError):
    """Bad input data or data settings; the message says what, where and how to fix it."""

    def __init__(self, message: str):
        # A quoted header or cell may hold a line break; the message stays one line.
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (rows, features) float64
    y: np.ndarray  # (rows,) float64
    features: tuple[str, ...]
    target: str


def load_csv(
    path: str | Path | None,
    target: str = "MEDV",
    features: Sequence[str] | None = None,
    allow_constant: bool = False,
) -> Table:
    """Read a numeric CSV with a header row; every failure is a one-line DataError.

    Constant feature columns are refused unless allow_constant (rows to predict on, not to fit
    a standardizer on): their standard deviation is 0, and dividing by it is undefined.
    """
    path = Path(path) if path else BOSTON_CSV
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            # (line number, cells); blank lines carry nothing
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; set data.path to an existing CSV") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path}: cannot read file ({e}); set data.path to a readable UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV ({e}); fix the file") from None
    if not rows:
        raise DataError(f"{path}: file is empty; expected a header row and numeric rows")
    header = [h.strip() for h in rows[0][1]]
    if all(_is_number(h) for h in header):
        raise DataError(
            f"{path}: first row {','.join(header[:4])}... is numeric, not a "
            "header; add a header row naming the columns"
        )
    if len(set(header)) != len(header) or "" in header:
        raise DataError(
            f"{path}: header has empty or duplicate column names: "
            f"{','.join(header)}; give every column a unique name"
        )
    if target not in header:
        raise DataError(
            f"{path}: target column {target!r} not found; set data.target to "
            f"one of: {', '.join(header)}"
        )
    if features is None:
        features = [h for h in header if h != target]
    features = list(features)
    missing = [c for c in features if c not in header]
    if missing:
        raise DataError(
            f"{path}: feature column(s) {', '.join(missing)} not found; "
            f"data.features must name columns among: {', '.join(header)}"
        )
    if target in features or not features:
        raise DataError(
            f"{path}: data.features must name at least one column other than the target {target!r}"
        )
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: header but no data rows; add numeric rows")
    values = np.empty((len(body), len(header)))
    for i, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: {len(row)} fields but the header has "
                f"{len(header)}; make every row as long as the header"
            )
        for j, cell in enumerate(row):
            where = f"{path}, line {line}, column {header[j]!r}"
            if not cell.strip():
                raise DataError(f"{where}: empty cell; fill it in or remove that row")
            try:
                v = float(cell)
            except ValueError:
                raise DataError(
                    f"{where}: {cell!r} is not a number; fix or remove that row"
                ) from None
            if not math.isfinite(v):
                raise DataError(
                    f"{where}: {cell!r} is not a finite number; fill in or remove that row"
                )
            values[i, j] = v
    x = values[:, [header.index(c) for c in features]]
    constant = [c for c, col in zip(features, x.T, strict=True) if np.all(col == col[0])]
    if constant and not allow_constant:
        raise DataError(
            f"{path}: feature column(s) {', '.join(constant)} are constant and "
            "cannot be standardized; leave them out with data.features=[...]"
        )
    return Table(x, values[:, header.index(target)], tuple(features), target)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


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


def standardizer(a: np.ndarray) -> Affine:
    std = a.std(axis=0)  # population std, like Keras examples and sklearn
    return Affine(a.mean(axis=0), np.where(std > 0, std, 1.0))


def target_scaler(y: np.ndarray, kind: str, target_range: Sequence[float]) -> Affine:
    if kind == "none":
        return Affine(0.0, 1.0)
    if kind == "standard":
        return standardizer(y)
    lo, hi = target_range
    # Map [min, max] of the training targets onto [lo, hi] (a constant target onto lo).
    span = y.max() - y.min()
    scale = (span if span > 0 else 1.0) / (hi - lo)
    return Affine(y.min() - lo * scale, scale)


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
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seeds: Sequence[int],
        epoch: Callable[[], int],
        steps_per_block: int = 1,
    ):
        self.x, self.y, self.batch_size, self.seeds, self.epoch = x, y, batch_size, seeds, epoch
        self.steps_per_block = steps_per_block

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.x) / self.batch_size) / self.steps_per_block)

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        e = self.epoch()
        order = torch.from_numpy(
            np.stack([np.random.default_rng((s, e)).permutation(len(self.x)) for s in self.seeds])
        )
        x, y = self.x[order], self.y[order]  # one gather per epoch, then views
        b = self.batch_size
        steps = [(x[:, i : i + b], y[:, i : i + b]) for i in range(0, len(self.x), b)]
        for k in range(0, len(steps), self.steps_per_block):
            yield steps[k : k + self.steps_per_block]


class FullBatch:
    """A whole evaluation split as one batch (none if the split is empty)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(len(self.x) > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self.x):
            yield self.x, self.y


class RegressionData(L.LightningDataModule):
    """A numeric CSV split Keras-style into train/test, with optional validation fold."""

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
        steps_per_block: int = 16,
        target_scaling: str = "none",
        target_range: Sequence[float] = (0.0, 1.0),
        name: str = "boston",
        target_label: str | None = None,
        target_unit: str | None = None,
        seeds: Sequence[int] = (0,),
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
            target_scaling,
            target_range,
        )
        self.batch_size, self.steps_per_block, self.seeds = batch_size, steps_per_block, seeds
        if path is None and name not in BUNDLED:
            raise DataError(
                f"data.name={name!r}: choose one of {', '.join(BUNDLED)} or set data.path"
            )
        csv_file, unit = ("", "") if path is not None else BUNDLED[name]
        table = load_csv(BOSTON_CSV.with_name(csv_file) if path is None else path, target, features)
        self.features, self.target = table.features, table.target
        self.dataset = name if path is None else Path(path).stem
        self.target_label = target_label or table.target
        self.target_unit = unit if target_unit is None else target_unit
        train_idx, test_idx = keras_split(len(table.y), test_split, split_seed)
        if num_folds:
            fit_idx, val_idx = fold_split(len(train_idx), num_folds, fold)
        elif val_fraction:
            n_val = max(1, round(len(train_idx) * val_fraction))
            fit_idx, val_idx = (
                np.arange(len(train_idx) - n_val),
                np.arange(len(train_idx) - n_val, len(train_idx)),
            )
        else:
            fit_idx, val_idx = np.arange(len(train_idx)), np.arange(0)
        fit_idx, val_idx = train_idx[fit_idx], train_idx[val_idx]
        wants_val = bool(num_folds or val_fraction)
        if len(fit_idx) < 2 or len(test_idx) < 1 or (wants_val and len(val_idx) < 1):
            raise DataError(
                f"data: {len(table.y)} rows leave {len(fit_idx)} to train on, "
                f"{len(val_idx)} to validate and {len(test_idx)} to test; supply more rows "
                "or change data.test_split / data.val_fraction / data.num_folds"
            )
        if batch_size > len(fit_idx):
            raise DataError(
                f"data.batch_size={batch_size} is larger than the {len(fit_idx)} "
                "training rows; choose a batch size between 1 and that"
            )
        x_fit, y_fit = table.x[fit_idx], table.y[fit_idx]
        if np.all(y_fit == y_fit[0]):
            raise DataError(
                f"data: target {table.target!r} is constant ({y_fit[0]:g}) on all "
                f"{len(fit_idx)} training rows; there is nothing to learn, check data.target"
            )
        self.x_scaler = standardizer(x_fit)
        self.y_scaler = target_scaler(y_fit, target_scaling, target_range)
        self.splits = {
            name: (self._x(table.x[idx]), self._y(table.y[idx]))
            for name, idx in (("train", fit_idx), ("val", val_idx), ("test", test_idx))
        }

    def _x(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.x_scaler(a), dtype=torch.float32)

    def _y(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.y_scaler(a), dtype=torch.float32).unsqueeze(-1)

    @property
    def has_validation(self) -> bool:
        return len(self.splits["val"][0]) > 0

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

    def val_dataloader(self) -> FullBatch:
        return FullBatch(*self.splits["val"])

    def test_dataloader(self) -> FullBatch:
        return FullBatch(*self.splits["test"])

    def unscale(self, y: torch.Tensor) -> torch.Tensor:
        """Model outputs (or scaled targets) back in the CSV's units."""
        return self.y_scaler.inverse(y.double()).float()


def check_settings(
    test_split: float,
    val_fraction: float,
    num_folds: int,
    fold: int,
    batch_size: int,
    steps_per_block: int,
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
