"""The Keras-compatible split, standardization without leakage, folds and batching; strict
numerals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from housing_reg.data import DataError, RegressionData, keras_split, load_csv


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
    dm = RegressionData(batch_size=32, steps_per_block=1, seed=7, replicas=2)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 13
    x, y = batches[0]
    assert x.shape == (2, 32, 13) and y.shape == (2, 32, 1)
    assert batches[-1][0].shape == (2, 404 - 12 * 32, 13)
    again = list(
        RegressionData(batch_size=32, steps_per_block=1, seed=7, replicas=2).train_dataloader()
    )
    assert torch.equal(batches[0][1], again[0][1])  # same seed, same order
    assert not torch.equal(y[0], y[1])  # each replica its own order
    seen = torch.cat([b[1][0] for b in batches]).squeeze(-1)
    assert sorted(seen.tolist()) == sorted(dm.splits["train"][1].squeeze(-1).tolist())


def test_blocks_are_consecutive_mini_batches():
    blocks = list(RegressionData(batch_size=5, steps_per_block=16).train_dataloader())
    singles = list(RegressionData(batch_size=5, steps_per_block=1).train_dataloader())
    assert [b[1].shape[1] for b in blocks] == [80] * 5 + [4]
    assert torch.equal(torch.cat([b[1] for b in blocks], 1), torch.cat([b[1] for b in singles], 1))


# -- strict numerals and data.path ------------------------------------------------------------
ROWS = "\n".join(f"{i},{i % 3},{2 * i + 1}" for i in range(8))


def csv_with_cell(tmp_path: Path, cell: str) -> Path:
    """A small CSV (header a,b,y) whose line 10 holds cell in column b, quoted."""
    path = tmp_path / "t.csv"
    path.write_bytes(f'a,b,y\n{ROWS}\n7,"{cell}",3\n'.encode())
    return path


@pytest.mark.parametrize(
    "cell", ["1_000", "1_0.5", "\u0661\u0662", "0x10", "1,5", "\u00a01", "1\x0c", "1e", ".", "--1"]
)
def test_a_cell_is_a_plain_numeral_or_not_a_number(tmp_path: Path, cell: str):
    path = csv_with_cell(tmp_path, cell)
    with pytest.raises(DataError) as e:
        load_csv(path, "y")
    assert str(e.value) == (
        f"{path}, line 10, column 'b': {cell!r} is not a number; fix or remove that row"
    )


@pytest.mark.parametrize(
    ("cell", "value"),
    [(" 1.5 ", 1.5), ("\t-2\t", -2), ("+.5", 0.5), ("5.", 5), ("1E-3", 1e-3), ("-0", 0)],
)
def test_sign_point_exponent_and_ascii_blanks_are_fine(tmp_path: Path, cell: str, value: float):
    for text in (f"a,b,y\n{ROWS}\n7,{cell},3\n", f'a,b,y\n{ROWS}\n7,"{cell}",3\n'):
        path = tmp_path / "t.csv"
        path.write_text(text)
        assert load_csv(path, "y").x[-1, 1] == value


@pytest.mark.parametrize("cell", ["nan", " -Infinity", "INF", "1e999"])
def test_nan_and_inf_stay_not_finite(tmp_path: Path, cell: str):
    with pytest.raises(DataError, match="line 10, column 'b': .* is not a finite number"):
        load_csv(csv_with_cell(tmp_path, cell), "y")


def test_an_empty_data_path_is_refused_and_none_is_the_bundled_file():
    for path in ["", "  "]:
        with pytest.raises(DataError) as e:
            load_csv(path)
        assert str(e.value) == (
            "data.path is empty; set it to a CSV file, or to null for the bundled data"
        )
        with pytest.raises(DataError, match="data.path is empty"):
            RegressionData(path)
    with pytest.raises(DataError, match="data.path=0 is not a file path"):
        load_csv(0)
    assert load_csv(None).x.shape == (506, 13)
