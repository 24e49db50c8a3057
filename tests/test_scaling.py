"""Target scaling and folds: statistics from the fitting rows only, exact inverse, and the
two halves of the answer in short real runs (bounded heads need scaled targets; relu needs
positive ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from housing_reg.data import (
    TARGET_SCALINGS,
    fold_split,
    keras_split,
    load_csv,
    target_scaler,
)
from housing_reg.model import Regressor
from housing_reg.train import train

from conftest import FAST, set_up

pytestmark = pytest.mark.unit

targets = arrays(np.float64, st.integers(1, 40), elements=st.floats(-1e3, 1e3))
ranges = st.tuples(st.floats(-5, 5), st.floats(0.1, 10)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=200, deadline=None)
@given(y=targets, kind=st.sampled_from(TARGET_SCALINGS), target_range=ranges)
def test_target_scaling_round_trips(y: np.ndarray, kind: str, target_range):
    scaler = target_scaler(y, kind, target_range)
    scaled = scaler(y)
    tol = 1e-9 * (1 + np.abs(y).max())
    np.testing.assert_allclose(scaler.inverse(scaled), y, rtol=0, atol=tol)
    if kind == "minmax" and np.ptp(y) > 0:
        lo, hi = target_range
        assert scaled.min() == pytest.approx(lo, abs=1e-9) and scaled.max() == pytest.approx(hi)
    if kind == "standard" and y.std() > 1e-6:
        assert scaled.mean() == pytest.approx(0, abs=1e-6) and scaled.std() == pytest.approx(1)
    # The model carries the inverse as float32 buffers: what every reported MAE goes through.
    model = Regressor(
        torch.nn.Identity(),
        torch.optim.SGD,
        y_shift=scaler.shift,
        y_scale=scaler.scale,
    )
    back = model.unscale(torch.as_tensor(scaled, dtype=torch.float32)).double().numpy()
    # float32 rounds the scaled value, the scale and the shift: each error is relative to the
    # largest of them (a narrow range far from 0, like [4, 4.1], magnifies the scaled one).
    sizes = abs(scaler.shift) + abs(scaler.scale) * np.abs(scaled).max() + np.abs(y).max()
    np.testing.assert_allclose(back, y, rtol=0, atol=4 * 2**-24 * sizes + 1e-6)


@pytest.mark.parametrize("kind", ["standard", "minmax"])
def test_fold_statistics_come_from_the_folds_training_part_only(kind: str):
    table = load_csv(None)
    train_idx, test_idx = keras_split(len(table.y))
    for fold in range(4):
        dm = set_up(num_folds=4, fold=fold, target_scaling=kind)
        fit, val = fold_split(len(train_idx), 4, fold)
        assert set(fit).isdisjoint(val) and len(fit) + len(val) == 404
        x_fit, y_fit = table.x[train_idx[fit]], table.y[train_idx[fit]]
        np.testing.assert_allclose(dm.x_scaler.shift, x_fit.mean(0))
        np.testing.assert_allclose(dm.x_scaler.scale, x_fit.std(0))
        expected = target_scaler(y_fit, kind, (0.0, 1.0))
        assert dm.y_scaler.shift == pytest.approx(expected.shift)
        assert dm.y_scaler.scale == pytest.approx(expected.scale)
        # Not the statistics of all 404 training rows: the val fold is left out.
        assert not np.allclose(dm.x_scaler.shift, table.x[train_idx].mean(0))
        # The served splits, unscaled, are exactly the fold's rows and the untouched test set.
        for name, rows in (("train", fit), ("val", val)):
            y = dm.unscale(dm.splits[name][1]).squeeze(-1).numpy()
            np.testing.assert_allclose(y, table.y[train_idx[rows]], rtol=1e-5)
        y_test = dm.unscale(dm.splits["test"][1]).squeeze(-1).numpy()
        np.testing.assert_allclose(y_test, table.y[test_idx], rtol=1e-5)


def short_run(make_cfg, tmp_path, name: str, *overrides: str) -> dict:
    cfg = make_cfg(*FAST, "model.replicas=2", *overrides, output_dir=tmp_path / name)
    return train(cfg)


def test_minmax_scaled_sigmoid_beats_unscaled_sigmoid_by_far(make_cfg, tmp_path):
    raw = short_run(make_cfg, tmp_path, "raw", "head=sigmoid")
    scaled = short_run(make_cfg, tmp_path, "minmax", "head=sigmoid", "data.target_scaling=minmax")
    # Unscaled, sigmoid cannot exceed $1000: its error is about the mean price (~22).
    assert raw["test/mae"] > 15
    assert scaled["test/mae"] < raw["test/mae"] / 3
    assert scaled["test/mae_max"] < 6


def test_relu_on_standardized_targets_is_clipped_at_the_mean(make_cfg, tmp_path):
    raw = short_run(make_cfg, tmp_path, "raw", "head=relu")
    std = short_run(make_cfg, tmp_path, "std", "head=relu", "data.target_scaling=standard")
    assert std["test/mae"] > 1.3 * raw["test/mae"]
    # relu outputs 0 for every house it would price below average: in dollars, the mean.
    pred = np.load(tmp_path / "std" / "replicas.npz")["test_pred"].T  # (rows, replicas)
    y_train = set_up(target_scaling="none").splits["train"][1].numpy()
    at_mean = np.isclose(pred, y_train.mean(), atol=1e-3).mean(axis=0)
    assert (at_mean > 0.25).all()


def test_the_extra_heads_keep_or_drop_negative_outputs(make_cfg):
    z = torch.linspace(-30, 30, 601)
    softplus = instantiate(make_cfg("head=softplus").head.activation)(z)
    leaky = instantiate(make_cfg("head=leaky_relu").head.activation)(z)
    assert (softplus > 0).all() and torch.allclose(softplus[z > 20], z[z > 20])  # relu, smooth
    assert torch.equal(leaky[z >= 0], z[z >= 0])
    assert torch.allclose(leaky[z < 0], 0.01 * z[z < 0])  # below 0: shrunk, not clipped
