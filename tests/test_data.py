"""The Keras-compatible split, standardization without leakage, folds and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from housing_reg.data import RegressionData, keras_split, load_csv


@pytest.fixture(scope="module")
def boston() -> RegressionData:
    return RegressionData()


def test_bundled_csv_has_506_rows_and_13_features():
    table = load_csv(None)
    assert table.x.shape == (506, 13)
    assert table.features[0] == "CRIM" and table.features[-1] == "LSTAT"
    assert table.target == "MEDV"


def test_split_matches_keras_boston_housing_load_data(boston: RegressionData):
    train_idx, test_idx = keras_split(506)
    assert len(train_idx) == 404 and len(test_idx) == 102
    assert set(train_idx).isdisjoint(test_idx) and len(set(train_idx) | set(test_idx)) == 506
    y = load_csv(None).y
    # Facts of keras.datasets.boston_housing.load_data() (see shared data README).
    assert y[train_idx[:4]].tolist() == [15.2, 42.3, 50.0, 21.1]
    assert y[train_idx].mean() == pytest.approx(22.395, abs=1e-3)
    assert y[train_idx].std() == pytest.approx(9.199, abs=1e-3)
    assert y[test_idx].mean() == pytest.approx(23.078, abs=1e-3)
    # The data module serves the same rows, targets unscaled by default.
    assert boston.splits["train"][1][:4, 0].tolist() == pytest.approx([15.2, 42.3, 50.0, 21.1])
    assert boston.splits["test"][0].shape == (102, 13)


def test_features_standardized_on_training_rows_only(boston: RegressionData):
    x_train, _ = boston.splits["train"]
    assert x_train.mean(0).abs().max() < 1e-5
    assert (x_train.std(0, unbiased=False) - 1).abs().max() < 1e-5
    # The test rows were scaled with the training statistics, so theirs are not exactly 0/1.
    x_test, _ = boston.splits["test"]
    assert x_test.mean(0).abs().max() > 1e-3
    raw = load_csv(None).x
    train_idx, _ = keras_split(506)
    np.testing.assert_allclose(boston.x_scaler.shift, raw[train_idx].mean(0))


def test_val_fraction_carves_validation_from_training_rows():
    dm = RegressionData(val_fraction=0.25)
    assert len(dm.splits["train"][0]) == 303 and len(dm.splits["val"][0]) == 101
    assert len(dm.splits["test"][0]) == 102
    x_fit, _ = dm.splits["train"]
    assert x_fit.mean(0).abs().max() < 1e-5  # statistics from the fitting rows alone


def test_folds_partition_the_training_rows():
    vals = [RegressionData(num_folds=4, fold=k).splits["val"][1] for k in range(4)]
    assert [len(v) for v in vals] == [101, 101, 101, 101]
    all_val = torch.cat(vals).squeeze(-1)
    train_y = RegressionData().splits["train"][1].squeeze(-1)
    assert sorted(all_val.tolist()) == sorted(train_y.tolist())


def test_batches_are_shuffled_per_epoch_and_seeded():
    dm = RegressionData(batch_size=32, steps_per_block=1, seeds=[7, 8])
    loader = dm.train_dataloader()
    blocks = list(loader)
    assert len(blocks) == len(loader) == 13 and all(len(b) == 1 for b in blocks)
    batches = [b[0] for b in blocks]
    x, y = batches[0]
    assert x.shape == (2, 32, 13) and y.shape == (2, 32, 1)
    assert batches[-1][0].shape == (2, 404 - 12 * 32, 13)
    again = list(RegressionData(batch_size=32, steps_per_block=1, seeds=[7, 8]).train_dataloader())
    assert torch.equal(batches[0][1], again[0][0][1])  # same seed, same order
    assert not torch.equal(y[0], y[1])  # each replica its own order
    seen = torch.cat([b[1][0] for b in batches]).squeeze(-1)
    assert sorted(seen.tolist()) == sorted(dm.splits["train"][1].squeeze(-1).tolist())


def test_blocks_are_consecutive_mini_batches():
    blocks = list(RegressionData(batch_size=5, steps_per_block=16).train_dataloader())
    singles = list(RegressionData(batch_size=5, steps_per_block=1).train_dataloader())
    assert [len(b) for b in blocks] == [16] * 5 + [1]  # 81 mini-batches of 5 rows (the last 4)
    assert [len(b) for b in singles] == [1] * 81
    ys = [torch.cat([y for block in b for _, y in block], 1) for b in (blocks, singles)]
    assert torch.equal(*ys)  # the same mini-batches in the same order
