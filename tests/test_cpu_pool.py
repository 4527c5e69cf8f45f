"""The CPU path's block pool (reference/plain.py: map_blocks): bitwise the serial loop's results, the caller's
thread settings untouched, usable from other threads and from a forked child."""

from __future__ import annotations

import multiprocessing as mp
import sys
import threading

import pytest
import torch

import logitkit as lk
from logitkit.reference import plain


def _ops(x: torch.Tensor, m: torch.Tensor) -> list[torch.Tensor]:
    """Every op whose CPU blocks go through the pool, forward and backward, masked and not."""
    out = []
    for fn in (lambda t: lk.softmax(t, dim=-1), lambda t: lk.log_softmax(t, dim=-1, mask=m),
               lambda t: lk.log_softmax(t, dim=-1), lambda t: lk.logsumexp(t, -1),
               lambda t: lk.logsumexp(t, -1, mask=m)):
        xr = x.clone().requires_grad_()
        y = fn(xr)
        (g,) = torch.autograd.grad(y, xr, torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape))
        out += [y.detach(), g]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the fast path's input dtypes
def test_pool_gives_the_serial_loops_bits(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(96, 20000, generator=g) * 4).to(dtype)  # 1.9M elements: several blocks of 2**18
    x[3, 7] = float("nan")
    x[5] = float("-inf")
    m = torch.rand(96, 20000, generator=g) > 0.2
    n = torch.get_num_threads()
    seen = []
    orig = plain.map_blocks

    def spy(fn, items, device):
        seen.append(len(items))
        return orig(fn, items, device)

    try:
        plain.map_blocks = spy
        torch.set_num_threads(2)
        pooled = _ops(x, m)
        torch.set_num_threads(1)
        serial = _ops(x, m)
    finally:
        plain.map_blocks = orig
        torch.set_num_threads(n)
    assert max(seen) >= 4  # the pool really had several blocks to share
    for a, b in zip(pooled, serial, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bits: NaN rows compare too


def test_caller_threads_unchanged_and_other_threads_work():
    x = torch.randn(64, 30000)
    n = torch.get_num_threads()
    want = lk.softmax(x, dim=-1)
    assert torch.get_num_threads() == n
    got = []
    th = threading.Thread(target=lambda: got.append(lk.softmax(x, dim=-1)))
    th.start()
    th.join(timeout=120)
    assert torch.equal(got[0], want)


def _child(q):
    x = torch.randn(64, 30000, generator=torch.Generator().manual_seed(1))
    q.put(float(lk.logsumexp(x, -1).sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_child_makes_its_own_pool():
    """A pool made before fork has no threads in the child (a DataLoader worker): the child must not hang."""
    x = torch.randn(64, 30000, generator=torch.Generator().manual_seed(1))
    want = float(lk.logsumexp(x, -1).sum())  # the parent's pool exists now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    p.join(timeout=60)
    if p.is_alive():  # hung: do not leave it behind
        p.kill()
        p.join()
    assert p.exitcode == 0
    assert q.get(timeout=5) == want
