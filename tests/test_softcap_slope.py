"""The softcap's slope where tanh saturates, on every path that forms a softcapped gradient.

d/dx [c tanh(x / c)] = sech^2(x / c). Formed as 1 - (capped / c)^2 (torch's tanh backward) it cancels once
|x / c| passes a few units: the rounded tanh has lost the bits of 1 - tanh (fp32: about 100 ulp at |x / c| = 3,
thousands at 5, exactly 0 past 9). logitkit forms it from the raw logits without a subtraction
(reference/losses.cap_slope and the kernels' _cap_slope). The oracle is float64 with sech^2 = 1 / cosh^2 (no
subtraction either); fp32 gradients must match it elementwise to a few ulp while torch's do not.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import logitkit as lk

CAP = 2.0
M, V = 5, 40
ULP = 2.0**-24
# Interpreter runs of the kernels: with TRITON_INTERPRET=1 (or a GPU), as the kernel test files.
KERNELS = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or torch.cuda.is_available()
BACKENDS = ["reference"] + (["triton", "triton_looped"] if KERNELS else [])
# NumPy's warnings on inf - inf in guarded lanes of the interpreter are expected (as in the kernel test files).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(M, V, generator=g, dtype=torch.float64) * 24.0 - 12.0  # x / c in [-12, 12]: mostly saturated
    x = (u * CAP).float()
    t = torch.randint(0, V, (M,), generator=g)
    p = torch.softmax(torch.randn(M, V, generator=g, dtype=torch.float64), -1).float()
    return x, t, p


def _oracle_grad(x, target, reduction):
    """float64: (dloss / dcapped) * sech^2(x / c), the first factor by autograd on the capped logits; and each
    entry's scale, (p + q) * sech^2 with q the target distribution (p - q itself may cancel in fp32)."""
    xd = x.double()
    xc = (CAP * torch.tanh(xd / CAP)).requires_grad_()
    tgt = target.double() if target.dtype.is_floating_point else target
    (gc,) = torch.autograd.grad(F.cross_entropy(xc, tgt, reduction=reduction).sum(), xc)
    q = tgt if target.dtype.is_floating_point else F.one_hot(target, V).double()
    slope = 1.0 / torch.cosh(xd / CAP) ** 2
    div = x.shape[0] if reduction == "mean" else 1
    return gc * slope, (torch.softmax(xc.detach(), -1) + q) * slope / div


def _rel_ulps(got, want):
    want, scale = want
    return ((got.double() - want).abs() / scale / ULP).max().item()


@contextlib.contextmanager
def _backend(name):
    """'reference', or the kernels with rows in one block ('triton') or looped over blocks of 8 ('triton_looped')."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(lk.use_backend("reference" if name == "reference" else "triton"))
        if name != "reference":
            from logitkit.triton import _tuning  # only with triton installed, which BACKENDS implies for kernels

            stack.enter_context(_tuning.force_cross_entropy(8 if name == "triton_looped" else 1 << 16))
        yield


def test_torch_cancels_here():
    """The premise: torch's fp32 gradient is far off at these logits (so the tests below can fail)."""
    x, t, _ = _inputs()
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(CAP * torch.tanh(xr / CAP), t, reduction="sum"), xr)
    assert _rel_ulps(g, _oracle_grad(x, t, "sum")) > 1e4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # fused in forward / recomputed in backward
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_slope_is_accurate(backend, reduction, kind):
    x, t, p = _inputs()
    target = t if kind == "index" else p
    want = _oracle_grad(x, target, reduction)
    xr = x.clone().requires_grad_()
    with _backend(backend):
        (g,) = torch.autograd.grad(lk.cross_entropy(xr, target, reduction=reduction, softcap=CAP).sum(), xr)
    assert g.dtype == torch.float32
    assert _rel_ulps(g, want) <= 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_and_func_grad_slope_is_accurate(backend):
    """The differentiable paths: create_graph's first derivative and torch.func.grad (reference/composite)."""
    x, t, _ = _inputs()
    want = _oracle_grad(x, t, "sum")
    xr = x.clone().requires_grad_()
    with _backend(backend):
        (g,) = torch.autograd.grad(lk.cross_entropy(xr, t, reduction="sum", softcap=CAP), xr, create_graph=True)
        gf = torch.func.grad(lambda v: lk.cross_entropy(v, t, reduction="sum", softcap=CAP))(x)
    assert _rel_ulps(g.detach(), want) <= 16
    assert _rel_ulps(gf, want) <= 16
    # the values stay torch.tanh's: the composite's loss equals the ordinary path's to fp32 rounding
    with _backend(backend):
        a = lk.cross_entropy(x, t, reduction="none", softcap=CAP)
        b = torch.func.vmap(lambda v, tt: lk.cross_entropy(v, tt, softcap=CAP))(x, t)
    assert (a - b).abs().max().item() <= 4 * ULP * a.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["token_chunks", "vocab_blocks"])
def test_linear_cross_entropy_slope_is_accurate(backend, strategy):
    """An identity classifier (V = D) makes the logits the hidden states exactly, so dx is dlogits."""
    x, t, _ = _inputs()
    W = torch.eye(V)
    xr = x.clone().requires_grad_()
    with _backend(backend):
        loss = lk.linear_cross_entropy(xr, W, t, reduction="sum", softcap=CAP, strategy=strategy)
        (g,) = torch.autograd.grad(loss, xr)
    assert _rel_ulps(g, _oracle_grad(x, t, "sum")) <= 12
