"""nll_loss: torch parity over options and shapes, float32 results for half inputs, gradients."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import logitkit
from _tolerances import F64_PARITY
from _util import BF16, F16, F32, F64, grad
from logitkit.reference import oracle


def case(shape, gen, dtype=F64, ignore=True):
    cd = 1 if len(shape) > 1 else 0
    x = torch.log_softmax(torch.randn(shape, dtype=F64, generator=gen), cd).to(dtype)
    t = torch.randint(0, shape[cd], shape[:cd] + shape[cd + 1 :], generator=gen)
    if ignore and t.numel() > 1:
        t.view(-1)[::3] = -100
    return x, t


# Batched, K-dim, unbatched and single-class shapes; every reduction, with and without class weights.
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3, 2), (5,), (4, 1)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_parity_float64(backend, shape, reduction, weighted):
    gen = torch.Generator().manual_seed(len(shape))
    x, t = case(shape, gen)
    w = torch.rand(shape[1 if len(shape) > 1 else 0], dtype=F64, generator=gen) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction)
    ref = F.nll_loss(x, t, **kw)
    ours = logitkit.nll_loss(x, t, **kw)
    assert ours.dtype == F64 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **F64_PARITY, equal_nan=True)
    torch.testing.assert_close(ours, oracle.nll_loss(x, t, **kw), **F64_PARITY, equal_nan=True)
    go = torch.rand(ref.shape, dtype=F64, generator=gen)
    torch.testing.assert_close(
        grad(lambda z: logitkit.nll_loss(z, t, **kw), x, go), oracle.nll_loss_bwd(x, t, go, **kw), **F64_PARITY
    )


# ignore_index values: torch's default, a real class index, and a positive sentinel beyond C.
@pytest.mark.parametrize("ignore_index", [-100, 2, 9])
def test_ignore_index_values(backend, ignore_index):
    gen = torch.Generator().manual_seed(0)
    x, _ = case((6, 5), gen)
    t = torch.tensor([0, 2, 4, 2, 1, 3])
    if ignore_index == 9:
        t[0] = 9
    for reduction in ("none", "mean", "sum"):
        kw = dict(ignore_index=ignore_index, reduction=reduction)
        torch.testing.assert_close(logitkit.nll_loss(x, t, **kw), F.nll_loss(x, t, **kw), **F64_PARITY)


# Half inputs: a float32 loss (the documented deviation), gradient in the input dtype.
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_inputs_return_float32(backend, dtype, reduction):
    x, t = case((8, 5), torch.Generator().manual_seed(1), dtype=dtype)
    x.requires_grad_()
    loss = logitkit.nll_loss(x, t, reduction=reduction)
    assert loss.dtype == F32
    torch.testing.assert_close(loss.double(), oracle.nll_loss(x, t, reduction=reduction), rtol=4 * 2**-23, atol=0)
    loss.sum().backward()
    assert x.grad.dtype == dtype


def test_all_ignored_and_empty(backend):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    mean = logitkit.nll_loss(x, t)
    assert math.isnan(mean.item())
    (g,) = torch.autograd.grad(mean, x)
    assert torch.equal(g, torch.zeros_like(g))
    assert logitkit.nll_loss(x, t, reduction="sum").item() == 0.0
    e = torch.randn(0, 4)
    assert math.isnan(logitkit.nll_loss(e, torch.zeros(0, dtype=torch.long)).item())
    assert logitkit.nll_loss(e, torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)


# torch's legacy pairs: each maps to one reduction and warns.
@pytest.mark.parametrize("size_average,reduce,expected", [(False, None, "sum"), (None, False, "none")])
def test_legacy_size_average_reduce(backend, size_average, reduce, expected):
    x, t = case((4, 5), torch.Generator().manual_seed(2))
    with pytest.warns((UserWarning, DeprecationWarning), match="size_average|reduce"):
        ours = logitkit.nll_loss(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours, F.nll_loss(x, t, size_average=size_average, reduce=reduce), **F64_PARITY)
    torch.testing.assert_close(ours, F.nll_loss(x, t, reduction=expected), **F64_PARITY)


# With and without weights (the mean's denominator changes).
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(backend, weighted):
    x, t = case((4, 5), torch.Generator().manual_seed(3))
    w = torch.rand(5, dtype=F64) + 0.5 if weighted else None
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: logitkit.nll_loss(z, t, weight=w), (x,))


def test_kdim_and_noncontiguous_bit_for_bit(backend):
    x, t = case((2, 5, 3), torch.Generator().manual_seed(4), dtype=F32)
    flat = logitkit.nll_loss(x.movedim(1, -1).reshape(-1, 5), t.reshape(-1), reduction="none")
    assert torch.equal(logitkit.nll_loss(x, t, reduction="none"), flat.view(2, 3))
    nc = torch.randn(5, 6).t()
    tt = torch.randint(0, 5, (6,))
    assert torch.equal(
        logitkit.nll_loss(nc, tt, reduction="none"), logitkit.nll_loss(nc.contiguous(), tt, reduction="none")
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_targets_checked_in_int64(dtype):
    # compared in the target's own dtype, ignore_index would wrap (uint8: -1 == 255) and let 255 reach a gather
    x = torch.randn(2, 5).log_softmax(1)
    bad, ii = (255, -1) if dtype == torch.uint8 else (-100, 156)
    t = torch.tensor([bad, 3], dtype=dtype)
    for fn in (logitkit.nll_loss, logitkit.cross_entropy):
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
            fn(x, t, ignore_index=ii)
    ok = torch.tensor([4, 3], dtype=dtype)
    assert torch.equal(logitkit.nll_loss(x, ok, ignore_index=ii), F.nll_loss(x, ok.long(), ignore_index=ii))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_no_classes_all_ignored_as_torch(reduction, weighted):
    x = torch.randn(3, 0, requires_grad=True)
    t = torch.full((3,), -100)
    w = torch.ones(0) if weighted else None
    got = logitkit.nll_loss(x, t, w, reduction=reduction)
    want = F.nll_loss(x.detach(), t, w, reduction=reduction)
    torch.testing.assert_close(got.detach(), want, equal_nan=True)
    (g,) = torch.autograd.grad(got.sum(), x)
    assert g.shape == (3, 0)
    with pytest.raises(IndexError, match="out of bounds"):
        logitkit.nll_loss(x, torch.tensor([0, -100, -100]), w, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched_input_takes_a_one_element_target(backend, reduction):
    # torch accepts a (1,) target for a (C,) input (forward only: its backward then fails on the shapes)
    x0 = torch.randn(5, dtype=F64).log_softmax(0)
    want = F.nll_loss(x0, torch.tensor([3]), reduction=reduction)
    x = x0.clone().requires_grad_()
    got = logitkit.nll_loss(x, torch.tensor([3]), reduction=reduction)
    assert got.shape == () and torch.equal(got.detach(), want)
    (g,) = torch.autograd.grad(got, x)
    assert torch.equal(g, -torch.nn.functional.one_hot(torch.tensor(3), 5).to(F64))
    with pytest.raises(ValueError, match="target of shape"):
        logitkit.nll_loss(x0, torch.tensor([3, 1]), reduction=reduction)
