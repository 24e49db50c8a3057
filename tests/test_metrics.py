"""Metrics through torchmetrics, streamed: training gathers one block at a time; evaluation
in chunks of data.eval_batch_size rows gives the one-batch numbers (exactly when a split fits
in one chunk, to float summation order otherwise); the data module does its work in setup(),
as Lightning intends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics import Metric

from housing_reg.data import FitData, RegressionData
from housing_reg.fit import build_model
from housing_reg.jobdir import load_checkpoint
from housing_reg.prepare import prepare
from housing_reg.train import train

from conftest import FAST, replicas, set_up

pytestmark = pytest.mark.unit


def test_splits_come_in_chunks_of_eval_batch_size_and_setup_reads_the_file():
    data = RegressionData(eval_batch_size=7)
    assert not hasattr(data, "splits")  # constructing checks settings only; setup() reads
    data.setup("fit")
    chunks = list(data.test_dataloader())
    assert len(chunks) == len(data.test_dataloader()) == 15  # 102 test rows, 7 at a time
    assert all(len(x) == 7 for x, _ in chunks[:-1]) and len(chunks[-1][0]) == 102 - 14 * 7
    x, y = data.splits["test"]
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    splits = data.splits
    data.setup("test")  # Lightning calls it again: nothing is read twice
    assert data.splits is splits
    assert len(list(set_up().test_dataloader())) == 1  # the default: one chunk of 102 rows


def test_chunked_metrics_equal_one_batch_and_training_is_unchanged(make_cfg, tmp_path):
    """Validation, test and train MAE in chunks of 7 rows (every split takes many chunks, and
    the train MAE many updates) against the default one chunk: the same training, metrics
    equal to float summation order."""
    runs = {}
    for rows in (4096, 7):
        out = tmp_path / str(rows)
        cfg = make_cfg(
            *FAST,
            "model.replicas=3",
            "data.val_fraction=0.2",
            f"data.eval_batch_size={rows}",
            output_dir=out,
        )
        train(cfg)
        runs[rows] = out
    one, many = (replicas(runs[r]) for r in (4096, 7))
    for a, b in zip(one, many, strict=True):
        for k in ("train/mae", "val/mae", "test/mae", "test/mse"):
            assert b[k] == pytest.approx(a[k], rel=1e-6)
    weights = [load_checkpoint(runs[r] / "checkpoints/last.ckpt")["state_dict"] for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    pred = [np.load(runs[r] / "replicas.npz")["test_pred"] for r in runs]
    np.testing.assert_allclose(pred[1], pred[0], rtol=1e-6)


def test_the_model_measures_with_torchmetrics_objects_one_output_per_replica(make_cfg):
    job = prepare(0, make_cfg(*FAST, "model.replicas=4"))
    model = build_model([job], FitData([job.data]))
    assert {k: (type(m).__name__, m.num_outputs) for k, m in model.metrics.items()} == {
        "train_mae": ("MeanAbsoluteError", 4),
        "train_loss": ("MeanSquaredError", 4),
        "val_mae": ("MeanAbsoluteError", 4),
        "test_mae": ("MeanAbsoluteError", 4),
        "test_mse": ("MeanSquaredError", 4),
    }
    assert all(isinstance(m, Metric) for m in model.metrics.values())
    assert not any(k.startswith("metrics.") for k in model.state_dict())  # not checkpointed


def test_an_epoch_is_gathered_one_block_at_a_time_and_serves_every_row_once():
    """Every replica's rows for a whole epoch at once, (R, N, F), do not fit at a million rows
    and a hundred replicas: each block's tensors hold that block's rows only."""
    data = set_up(batch_size=5, steps_per_block=4, seeds=[0, 1, 2])
    rows_per_block = 5 * 4
    seen = []
    for block in data.train_dataloader():
        x, y = block[0]
        held = x.untyped_storage().nbytes() // (x.element_size() * x.shape[-1])
        assert held <= 3 * rows_per_block  # three replicas' rows of this block, no more
        seen.append(torch.cat([y for _, y in block], dim=1))
    order = torch.cat(seen, dim=1).squeeze(-1)  # (replicas, 404): each a permutation
    train_y = data.splits["train"][1].squeeze(-1)
    for r in range(3):
        assert sorted(order[r].tolist()) == sorted(train_y.tolist())
