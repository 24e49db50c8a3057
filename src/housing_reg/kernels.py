"""What fused fits rely on in torch's CPU kernels, each fact checked against the torch that runs
before it is relied on.

A fused job's numbers equal its lone run's only because of how torch computes: which kernel a
call takes, and where it rounds. Those facts live here, and nowhere else. Each is checked by
a probe (milliseconds, once per process and shape) that compares the two paths bit for bit on
inputs chosen so that a difference would show; where a probe fails, the fit takes the path
that is exact by construction (slower: a twin, a call per job, one thread, a fit per job), so a
torch upgrade may make a fit slower, never make a fused job's numbers differ from its lone
run's. The tests check that every probe passes on the torch CI installs (two versions).

- A batched matmul (torch.baddbmm) gives each replica the same bits wherever it sits in a
  stack of two or more, forward and backward: what lets models share a fit at all
  (`stack_position_free`; if not, every job trains alone).
- A stack of one replica may take another kernel than a stack of several (at 8 rows or more
  here), and round differently: a lone model then computes beside a detached twin
  (`lone_like_stacked` says when it need not).
- An elementwise kernel computes its vectorized body and its scalar tail differently for
  some activations (sigmoid, softplus), and runs calls of fewer than SCALAR_BELOW elements
  all on the scalar path: neighbouring jobs may share such a call (`small_calls_scalar`).
- torch splits an elementwise op among threads only above GRAIN elements, each part with its
  own tail: a fit may train on several threads while no call its numbers depend on is larger
  (`threads_keep_bits`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

GRAIN = 32768  # at::internal::GRAIN_SIZE: elements above which an op is split among threads
# A vectorized body needs 2 x the SIMD width: 16 floats or more on any CPU torch supports.
SCALAR_BELOW = 16
# Activations computed exactly (a maximum, a choice, one multiplication): their vectorized
# body and scalar tail give the same bits by construction, at any size.
EXACT_HEADS = (nn.Identity, nn.ReLU, nn.LeakyReLU)
# Activations whose calls jobs may share while the call is small (small_calls_scalar).
SMALL_HEADS = (nn.Sigmoid, nn.Tanh, nn.Softplus)
TRIALS = 3  # random inputs per matmul probe: a different summation order shows at once


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, up: torch.Tensor, grad: bool
) -> list[torch.Tensor]:
    """One stacked layer's output and, with grad, the gradients of x, w and b for the
    upstream gradient `up`: every number a replica's training reads from it."""
    if not grad:
        with torch.no_grad():
            return [torch.baddbmm(b, x, w)]
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    out = torch.baddbmm(b, x, w)
    out.backward(up)
    return [out.detach(), x.grad, w.grad, b.grad]


def inputs(replicas: int, rows: int, fan_in: int, fan_out: int, seed: int) -> list[torch.Tensor]:
    """x, w, b and an upstream gradient for each replica, random."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(rows, fan_in), (fan_in, fan_out), (1, fan_out), (rows, fan_out)]
    return [torch.randn(replicas, *shape, generator=g) for shape in shapes]


def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@functools.cache
@threads(1)  # the kernel's path, not the pool's: threads_keep_bits checks the pool
def stack_position_free(rows: int, fan_in: int, fan_out: int) -> bool:
    """Replicas 0 and 1 of a stack of 2 get the bits of the same replicas at positions 3 and
    4 of a stack of 5, forward and backward."""
    for seed in range(TRIALS):
        x, w, b, up = inputs(5, rows, fan_in, fan_out, seed)
        five = layer(x, w, b, up, grad=True)
        two = layer(x[3:], w[3:], b[3:], up[3:], grad=True)
        if not same([t[3:5] for t in five], [t[:2] for t in two]):
            return failed(f"a stacked matmul of {rows}x{fan_in}x{fan_out} depends on the stack")
    return True


@functools.cache
@threads(1)
def lone_like_stacked(rows: int, fan_in: int, fan_out: int, grad: bool) -> bool:
    """A stack of one replica gets the bits of the same replica in a stack of two (forward,
    and backward with grad)."""
    for seed in range(TRIALS):
        x, w, b, up = inputs(2, rows, fan_in, fan_out, seed)
        one = layer(x[:1], w[:1], b[:1], up[:1], grad)
        if not same(one, [t[:1] for t in layer(x, w, b, up, grad)]):
            return False  # not a failure: the lone model computes beside a twin
    return True


def lone_needs_twin(rows: int, sizes: Sequence[int], grad: bool) -> bool:
    """Whether a lone model's call on `rows` rows must compute beside a detached twin to get
    the bits it would get in a stack: where any of its layers' kernels differ."""
    layers = zip(sizes[:-1], sizes[1:], strict=True)
    return not all(lone_like_stacked(rows, i, o, grad) for i, o in layers)


def differing_values(f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Inputs whose f differs between the vectorized body and the scalar path (a strided
    input takes the scalar path for every element); empty where the two paths agree."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4096, generator=g) * 40 - 20
    strided = torch.empty(2 * len(x))
    strided[::2] = x
    with torch.no_grad():
        return x[f(x) != f(strided[::2])]


_SMALL: dict[tuple[type, str], bool] = {}


def small_calls_scalar(head: nn.Module) -> bool:
    """A call of fewer than SCALAR_BELOW elements of this activation (its settings included)
    gives each element the bits of its own one-element call, on inputs where the vectorized
    body would differ."""
    key = (type(head), repr(head))
    if key not in _SMALL:
        _SMALL[key] = isinstance(head, SMALL_HEADS) and _small_calls_scalar(head)
    return _SMALL[key]


def _small_calls_scalar(f: nn.Module) -> bool:
    odd = differing_values(f)
    if not len(odd):
        return True  # both paths agree on every input tried: any call is exact
    with torch.no_grad():
        for n in range(2, SCALAR_BELOW):
            x = odd.repeat(SCALAR_BELOW)[:n].contiguous()
            if not torch.equal(f(x), torch.cat([f(v.reshape(1)) for v in x])):
                return failed(f"{f!r}: a call of {n} elements is vectorized")
    return True


@functools.cache
def threads_keep_bits(n: int) -> bool:
    """On n threads, an activation's call of GRAIN elements gets its one-thread bits: it is
    not split (a split would put a scalar tail mid-call, on inputs where that differs); and a
    stack of many replicas' matmuls gets each replica its one-thread bits."""
    x, w, b, up = inputs(256, 1, 64, 64, seed=0)
    with threads(1):
        one = layer(x, w, b, up, grad=True)
    with threads(n):
        if not same(layer(x, w, b, up, grad=True), one):
            return failed(f"a stacked matmul of 256 replicas differs on {n} threads")
    for kind in SMALL_HEADS:
        f = kind()
        odd = differing_values(f)
        if not len(odd):
            continue
        x = odd.repeat(GRAIN // len(odd) + 1)[: GRAIN - 2].contiguous()  # a split mid-SIMD
        with torch.no_grad(), threads(1):
            one = f(x)
        with torch.no_grad(), threads(n):
            if not torch.equal(f(x), one):
                return failed(f"{kind.__name__} of {GRAIN - 2} elements is split on {n} threads")
    return True


def failed(what: str) -> bool:
    log.warning("torch %s: %s; training on the path exact by construction", torch.__version__, what)
    return False


def stacks_exact(rows: Sequence[int], sizes: Sequence[int]) -> bool:
    """Every layer's stacked matmul is position-free at these row counts: replicas and fused
    jobs then equal their lone runs."""
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    return all(stack_position_free(r, i, o) for r in rows for i, o in layers)


def probes() -> dict[str, bool]:
    """Every probe at the shapes of the seed experiment (13-64-64-1, batch size 1, a test
    split of 102 rows), for the tests and scripts/bench.py."""
    sizes = [13, 64, 64, 1]
    return {
        "stacked matmul position-free": stacks_exact([1, 102], sizes),
        "lone step like stacked": not lone_needs_twin(1, sizes, grad=True),
        **{f"small {k.__name__} calls scalar": small_calls_scalar(k()) for k in SMALL_HEADS},
        "2 threads keep bits below the grain": threads_keep_bits(2),
    }
