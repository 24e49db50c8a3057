"""Head output ranges and the vectorized MLP's Keras-style initialization."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from housing_reg.model import StackedMLP

HEAD_RANGES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu": (0.0, math.inf)}


@pytest.mark.parametrize("head", ["relu", "none", "sigmoid", "tanh"])
def test_head_output_ranges(make_cfg, head: str):
    activation = instantiate(make_cfg(f"head={head}").head.activation)
    z = torch.linspace(-50, 50, 1001)
    out = activation(z)
    if head == "none":
        assert torch.equal(out, z)  # unbounded: the identity
        return
    lo, hi = HEAD_RANGES[head]
    assert out.min() >= lo and out.max() <= hi
    assert out.max() - out.min() > 0.99 * min(hi - lo, 50)  # it does reach across its range
    if head != "relu":
        inner = activation(torch.tensor([-5.0, 5.0]))
        assert lo < inner[0] and inner[1] < hi  # open interval: never reaches the bound


def test_glorot_init_zero_bias_and_per_replica_seeds():
    net = StackedMLP(13, [64, 64], seeds=[3, 4])
    w = net.weights[0]
    limit = math.sqrt(6 / (13 + 64))
    assert w.shape == (2, 13, 64) and w.abs().max() <= limit
    assert w.abs().max() > 0.9 * limit
    assert all(torch.count_nonzero(b) == 0 for b in net.biases)
    alone = StackedMLP(13, [64, 64], seeds=[4])
    assert torch.equal(alone.weights[0][0], w[1])  # replica r is the run with seed + r
    assert not torch.equal(w[0], w[1])


def test_replicas_do_not_touch_each_other():
    net = StackedMLP(13, [8], seeds=[0, 1, 2])
    x = torch.randn(3, 5, 13)
    out = net(x)
    out[1].sum().backward()
    grads = net.weights[0].grad
    assert grads[1].abs().sum() > 0
    assert grads[0].abs().sum() == 0 and grads[2].abs().sum() == 0
    assert net(torch.randn(7, 13)).shape == (3, 7, 1)  # a shared batch broadcasts
