"""kernels.py: what fused fits rely on in torch's CPU kernels holds on the torch that runs (CI
runs this on two torch versions), each probe fails where its fact is wrong, and where a probe
fails the fit takes the path that is exact by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from housing_reg import fit, kernels, prepare
from housing_reg.model import Heads, StackedMLP


@pytest.mark.unit
def test_every_probe_passes_on_this_torch():
    """If one fails after a torch upgrade, fits stay exact but slower: this test says which."""
    failed = [name for name, ok in kernels.probes().items() if not ok]
    assert not failed, f"torch {torch.__version__}: {failed}"


@pytest.fixture
def fresh_probes():
    """The probes' caches emptied before and after, so that each test probes afresh."""
    caches = (kernels.stack_position_free, kernels.lone_like_stacked, kernels.threads_keep_bits)

    def clear():
        for c in caches:
            c.cache_clear()
        kernels._SMALL.clear()

    clear()
    yield
    clear()


@pytest.mark.unit
def test_each_probe_fails_where_its_fact_is_wrong(monkeypatch, fresh_probes):
    """The probes are sensitive: told a wrong boundary, each finds the difference."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "SCALAR_BELOW", 64)  # calls of 32 elements are vectorized
        assert not kernels.small_calls_scalar(nn.Sigmoid())
    with monkeypatch.context() as m:
        m.setattr(kernels, "GRAIN", 4 * 32768)  # torch splits calls that large on 2 threads
        assert not kernels.threads_keep_bits(2)
    # A lone model's kernel differs from the stacked one from 8 rows on, at these widths.
    assert kernels.lone_needs_twin(32, [13, 64, 64, 1], grad=True)
    assert not kernels.lone_needs_twin(1, [13, 64, 64, 1], grad=True)


def step(net: StackedMLP, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    """A forward and backward pass (up: each replica's upstream gradient): the output and
    every weight's gradient."""
    out = net(x)
    out.backward(up)
    return [out.detach(), *(w.grad for w in net.weights), *(b.grad for b in net.biases)]


@pytest.mark.unit
@pytest.mark.parametrize("rows", [1, 8, 102])
@pytest.mark.parametrize("twin", ["as probed", "always"])
def test_a_lone_model_gets_its_stacked_replicas_bits(monkeypatch, fresh_probes, rows, twin):
    """A lone model (one replica) gets the bits of replica 1 of a stack of three with the
    same seed, forward and backward, where the probe lets it skip the twin (a training
    step's one row) and where it computes beside one (8 rows and more); and with the twin
    always, the path exact by construction."""
    if twin == "always":
        monkeypatch.setattr(kernels, "lone_needs_twin", lambda *a: True)
    g = torch.Generator().manual_seed(rows)
    x, up = torch.randn(3, rows, 13, generator=g), torch.randn(3, rows, 1, generator=g)
    lone = step(StackedMLP(13, [64, 64], seeds=[5]), x[1:2], up[1:2])
    stack = step(StackedMLP(13, [64, 64], seeds=[4, 5, 6]), x, up)
    assert all(torch.equal(a[0], b[1]) for a, b in zip(lone, stack, strict=True))


@pytest.mark.unit
def test_where_small_calls_are_not_checked_each_job_gets_its_own_call(monkeypatch):
    monkeypatch.setattr(kernels, "small_calls_scalar", lambda head: False)
    heads = Heads([(1, nn.Sigmoid()), (1, nn.Sigmoid()), (2, nn.ReLU()), (1, nn.ReLU())])
    assert heads.plan(1)[0] == [1, 1, 3]  # relu is exact by construction: still shared


def prepared(make_cfg, tmp_path: Path, n: int) -> list[prepare.Prepared]:
    return [
        prepare.prepare(i, make_cfg(f"seed={i}", output_dir=tmp_path / str(i))) for i in range(n)
    ]


@pytest.mark.unit
def test_where_threads_are_not_checked_a_fit_keeps_its_jobs_threads(
    make_cfg, tmp_path: Path, monkeypatch
):
    jobs = [
        prepare.prepare(i, make_cfg(f"seed={i}", output_dir=tmp_path / str(i))) for i in range(3)
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fit.fit_threads(jobs) == 2
        monkeypatch.setattr(kernels, "threads_keep_bits", lambda n: False)
        assert fit.fit_threads(jobs) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.unit
def test_where_stacks_are_not_checked_each_job_trains_alone(make_cfg, tmp_path: Path, monkeypatch):
    jobs = [
        prepare.prepare(i, make_cfg(f"seed={i}", output_dir=tmp_path / str(i))) for i in range(2)
    ]
    assert prepare.fit_key(jobs[0]) == prepare.fit_key(jobs[1])  # they share a fit
    monkeypatch.setattr(kernels, "stacks_exact", lambda rows, sizes: False)
    assert prepare.fit_key(jobs[0]) != prepare.fit_key(jobs[1])  # each its own
