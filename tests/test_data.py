"""The Keras-compatible split, standardization without leakage, folds and batching; strict
numerals, and scaling statistics that are exact or refused."""

from __future__ import annotations

import math
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from housing_reg.data import (
    DataError,
    RegressionData,
    check_scaled,
    keras_split,
    load_csv,
    mean_std,
    standardizer,
    target_scaler,
)

from conftest import set_up

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def boston() -> RegressionData:
    return set_up()


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
    dm = set_up(val_fraction=0.25)
    assert len(dm.splits["train"][0]) == 303 and len(dm.splits["val"][0]) == 101
    assert len(dm.splits["test"][0]) == 102
    x_fit, _ = dm.splits["train"]
    assert x_fit.mean(0).abs().max() < 1e-5  # statistics from the fitting rows alone


def test_folds_partition_the_training_rows():
    vals = [set_up(num_folds=4, fold=k).splits["val"][1] for k in range(4)]
    assert [len(v) for v in vals] == [101, 101, 101, 101]
    all_val = torch.cat(vals).squeeze(-1)
    train_y = set_up().splits["train"][1].squeeze(-1)
    assert sorted(all_val.tolist()) == sorted(train_y.tolist())


def test_batches_are_shuffled_per_epoch_and_seeded():
    dm = set_up(batch_size=32, steps_per_block=1, seeds=[7, 8])
    loader = dm.train_dataloader()
    blocks = list(loader)
    assert len(blocks) == len(loader) == 13 and all(len(b) == 1 for b in blocks)
    batches = [b[0] for b in blocks]
    x, y = batches[0]
    assert x.shape == (2, 32, 13) and y.shape == (2, 32, 1)
    assert batches[-1][0].shape == (2, 404 - 12 * 32, 13)
    again = list(set_up(batch_size=32, steps_per_block=1, seeds=[7, 8]).train_dataloader())
    assert torch.equal(batches[0][1], again[0][0][1])  # same seed, same order
    assert not torch.equal(y[0], y[1])  # each replica its own order
    seen = torch.cat([b[1][0] for b in batches]).squeeze(-1)
    assert sorted(seen.tolist()) == sorted(dm.splits["train"][1].squeeze(-1).tolist())


def test_blocks_are_consecutive_mini_batches():
    blocks = list(set_up(batch_size=5, steps_per_block=16).train_dataloader())
    singles = list(set_up(batch_size=5, steps_per_block=1).train_dataloader())
    assert [len(b) for b in blocks] == [16] * 5 + [1]  # 81 mini-batches of 5 rows (the last 4)
    assert [len(b) for b in singles] == [1] * 81
    ys = [torch.cat([y for block in b for _, y in block], 1) for b in (blocks, singles)]
    assert torch.equal(*ys)  # the same mini-batches in the same order


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
            set_up(path)
    with pytest.raises(DataError, match="data.path=0 is not a file path"):
        load_csv(0)
    assert load_csv(None).x.shape == (506, 13)


# -- scaling: exact in float64, or refused up front -----------------------------------------
def exact_mean_std(column: np.ndarray) -> tuple[float, float]:
    """Population mean and std in rational arithmetic: exact until the final rounding."""
    values = [Fraction(v) for v in column.tolist()]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    k = (var.numerator.bit_length() - var.denominator.bit_length()) // 2  # var / 4**k ~ 1
    return float(mean), math.ldexp(math.sqrt(var / Fraction(4) ** k), k)


def test_standardizer_is_bit_for_bit_numpy_in_the_ordinary_range():
    x = load_csv(None).x
    s = standardizer(x)
    assert np.array_equal(s.shift, x.mean(axis=0)) and np.array_equal(s.scale, x.std(axis=0))


@pytest.mark.parametrize("factor", [1e200, 1e300, 1e-300])
def test_mean_and_std_are_exact_far_from_one(factor: float):
    """a.std() of a Boston column times 1e200 was inf: its squares overflow float64."""
    x = load_csv(None).x[:, [0, 5, 9]] * factor  # CRIM, RM, TAX
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = mean_std(x)
    for j in range(x.shape[1]):
        exact = exact_mean_std(x[:, j])
        assert mean[j] == pytest.approx(exact[0], rel=1e-14)
        assert std[j] == pytest.approx(exact[1], rel=1e-14)


def test_mean_and_std_survive_values_near_the_float64_limit():
    a = np.array([[1.7e308, 1e308, 5e-324], [-1.7e308, 1e308, 0.0], [-1.7e308, 5e307, 5e-324]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = mean_std(a)
    for j in range(a.shape[1]):
        exact = exact_mean_std(a[:, j])
        assert mean[j] == pytest.approx(exact[0], rel=1e-14, abs=1e-323)
        assert std[j] == pytest.approx(exact[1], rel=1e-14, abs=1e-323)
    mean, std = mean_std(np.array([1.79e308, -1.79e308]))  # (max - min) / 2: a float64 still
    assert mean == 0 and std == 1.79e308
    with pytest.raises(DataError, match="column 'b': non-finite values"):
        mean_std(np.array([[1.0, np.inf], [2.0, 0.0]]), ["a", "b"])


def boston_with(column: np.ndarray) -> np.ndarray:
    x = load_csv(None).x.copy()
    x[:, 5] = column  # RM
    return x


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (np.linspace(0, 1e308, 506), "values up to 1e+308 cannot be standardized in float32"),
        (np.linspace(1, 2, 506) * 1e200, "values up to 2e+200 cannot be standardized in float32"),
        (
            np.r_[3e38, np.full(505, -3e38)],
            "values from -3e+38 to 3e+38 cannot be standardized in float32",
        ),
        (np.r_[1e-39, np.zeros(505)], "values spread by only 4.44e-41 cannot be standardized"),
    ],
)
def test_standardizer_refuses_up_front_what_float32_cannot_standardize(column, message: str):
    """The model keeps shift and scale as float32 and standardizes raw features in float32."""
    names = list(load_csv(None).features)
    x = boston_with(column)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError) as e:
            standardizer(x, names)
        with pytest.raises(DataError, match=re.escape(message)):
            standardizer(x)  # unnamed, as RegressionData calls it today: "column 5"
    assert str(e.value).startswith(f"column 'RM': {message}")
    assert str(e.value).endswith("; rescale that column") and "\n" not in str(e.value)


def test_the_largest_float32_features_standardize_finely():
    column = np.linspace(-1, 1, 506) * 1.7e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = boston_with(column)
        s = standardizer(x)
        z = torch.as_tensor(s(x), dtype=torch.float32)
    assert torch.isfinite(z).all() and torch.isfinite(z.square().sum(0)).all()
    assert (z.std(0, unbiased=False) - 1).abs().max() < 1e-5


def test_a_target_whose_square_overflows_float32_needs_scaling(tmp_path: Path):
    y = np.linspace(-1e30, 1e30, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError) as e:
            target_scaler(y, "none", (0, 1), name="PRICE")
        assert str(e.value) == (
            "target column 'PRICE': values up to 1e+30 overflow float32 when squared in the MSE "
            "loss and test/mse; set data.target_scaling=standard"
        )
        assert target_scaler(y * 1e-11, "none", (0, 1)).scale == 1.0  # 1e19: its square fits
        for kind in ("standard", "minmax"):
            scaled = target_scaler(y * 1e-12, kind, (0, 1), name="PRICE")(y * 1e-12)
            assert np.abs(scaled).max() <= 2
            # test/mse is reported in the target's own units: scaling cannot save 1e30
            with pytest.raises(DataError, match="and test/mse; rescale that column"):
                target_scaler(y, kind, (0, 1), name="PRICE")
        with pytest.raises(DataError, match="target column 'PRICE': values up to 1e\\+40"):
            target_scaler(y * 1e10, "standard", (0, 1), name="PRICE")
        with pytest.raises(DataError, match="the target: values from -1e\\+18.*float32 cannot"):
            target_scaler(y * 1e-12, "minmax", (0, 1e-30))
    # Through the data module, before any training: unscaled refused, standardized fine.
    lines = "\n".join(f"{i},{i % 3},{(i - 10) * 1e17:g}" for i in range(20))
    path = tmp_path / "big.csv"
    path.write_text(f"a,b,y\n{lines}\n")
    huge = "\n".join(f"{i},{i % 3},{(i - 10) * 1e29:g}" for i in range(20))
    (tmp_path / "bigger.csv").write_text(f"a,b,y\n{huge}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="overflow float32 when squared.*target_scaling=sta"):
            set_up(str(path).replace("big", "bigger"), "y")
        dm = set_up(str(path), "y", target_scaling="standard")
    assert torch.isfinite(dm.splits["train"][1]).all()
    assert dm.unscale(dm.splits["test"][1]).abs().max() < 1e19


def test_check_scaled_refuses_rows_far_outside_the_fitted_range():
    fit = np.array([[1.0, 0.0], [1.0 + 1e-12, 1.0], [1.0 - 1e-12, 2.0]])
    s = standardizer(fit, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_scaled(s, fit, ["a", "b"])
        check_scaled(s, np.array([[2.0, 100.0]]), ["a", "b"])  # 1e12 standard deviations: fine
        with pytest.raises(DataError, match="column 'a': 1e\\+10 scales to 1.22e\\+22, too far"):
            check_scaled(s, np.array([[1.0, 1.0], [1e10, 1.0]]), ["a", "b"])
        with pytest.raises(DataError, match="column 0: 2e\\+19 scales to 2e\\+19"):
            check_scaled(target_scaler(np.array([1.0, 2.0]), "none", (0, 1)), np.array([2e19]))
