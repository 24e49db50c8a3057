"""Head output ranges, the vectorized MLP's Keras-style initialization, per-job heads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from housing_reg.model import Heads, StackedMLP
from housing_reg.settings import ConfigError, check_config

pytestmark = pytest.mark.unit

HEADS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf/head").glob("*.yaml"))


@pytest.mark.parametrize("head", HEADS)
def test_each_head_states_the_output_range_it_has(make_cfg, head: str):
    """conf/head/<head>.yaml's range (what the report draws) is the activation's: outputs stay
    inside it and reach out to it (an unbounded side runs far past any target)."""
    cfg = make_cfg(f"head={head}").head
    lo, hi = (math.inf * s if v is None else v for v, s in zip(cfg.range, (-1, 1), strict=True))
    out = instantiate(cfg.activation)(torch.linspace(-1e4, 1e4, 20001))
    assert out.min() >= lo and out.max() <= hi
    assert out.min() < (lo + 1e-3 if math.isfinite(lo) else -50)
    assert out.max() > (hi - 1e-3 if math.isfinite(hi) else 50)


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


def test_a_head_that_states_no_range_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"^head.range=missing: a head must state"):
        check_config(make_cfg("~head.range"))
    with pytest.raises(ConfigError, match=r"head.range=\[1, 0\]"):
        check_config(make_cfg("head.range=[1,0]"))


def test_training_flushes_denormals_to_zero(make_cfg, tmp_path: Path):
    """A saturated sigmoid head's gradients and RMSprop state decay below float32's smallest
    normal number; the CPU's slow path for such values made a fused fit with sigmoid
    replicas twice as slow by its last epoch. Training flushes them to zero: the optimizer
    state a job saves holds none."""
    from housing_reg.jobdir import load_checkpoint
    from housing_reg.train import train

    train(make_cfg("head=sigmoid", "trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0"))
    state = load_checkpoint(tmp_path / "checkpoints/last.ckpt")["optimizer_states"][0]["state"]
    values = torch.cat([v.flatten() for s in state.values() for v in s.values() if v.dim()])
    tiny = torch.finfo(torch.float32).tiny
    assert values.numel() > 5000
    assert int(((values != 0) & (values.abs() < tiny)).sum()) == 0
    assert torch.tensor([tiny]).mul(0.5).item() > 0  # and the caller's arithmetic is as it was


@pytest.mark.parametrize("rows", [1, 7, 102])
@pytest.mark.parametrize("head", HEADS)
def test_jobs_heads_give_each_job_the_bits_of_its_own_call(make_cfg, head: str, rows: int):
    """A fit's Heads against each job's head called alone on its own replicas, forward and
    backward, bit for bit, for a training step's rows (1) and an evaluation chunk's: sizes
    1..37 put a job's elements in vectorized bodies and scalar tails. Neighbours share a call
    where that keeps their bits: relu and none over all their replicas; sigmoid, tanh and
    softplus under 16 elements, where every element takes the scalar path."""
    sizes = [1, 3, 10, 10, 10, 37, 1, 1, 8]
    made = [instantiate(make_cfg(f"head={head}").head.activation) for _ in sizes]
    heads = Heads(list(zip(sizes, made, strict=True)))
    exact = isinstance(made[0], torch.nn.Identity | torch.nn.ReLU | torch.nn.LeakyReLU)
    calls = {1: [14, 10, 10, 37, 10], 7: [1, 3, 10, 10, 10, 37, 2, 8], 102: sizes}[rows]
    assert heads.plan(rows)[0] == ([sum(sizes)] if exact else calls)
    z = (torch.randn(sum(sizes), rows, 1) * 3).requires_grad_()
    out = heads(z)
    grad_out = torch.linspace(-2, 2, out.numel()).reshape(out.shape)
    out.backward(grad_out)
    pieces = (t.split(sizes) for t in (z, out, z.grad, grad_out))
    for m, piece, fused, grad, g in zip(made, *pieces, strict=True):
        alone = piece.detach().clone().requires_grad_()
        y = m(alone)
        y.backward(g)
        assert torch.equal(y, fused) and torch.equal(alone.grad, grad)
