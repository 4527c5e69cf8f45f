"""selective_log_softmax and entropy against the oracle, dtypes, gradients."""

import pytest
import torch

import logitkit
from _tolerances import ENTROPY_REL_EPS, ULPS
from _util import BF16, F16, F32, F64, TARGET_DTYPES, grad, rows_for, worst
from logitkit.reference import oracle


# Short odd, one-past-power-of-two rows; every target dtype.
@pytest.mark.parametrize("V", [7, 1025])
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_selective_log_softmax_accuracy(backend, dtype, V):
    gen = torch.Generator().manual_seed(V)
    errs = {}
    for name, x in oracle.input_families(dtype, V, M=rows_for(V), seed=V):
        idx = torch.randint(0, V, (x.shape[0], 5), generator=gen)
        idx[:, 0] = x.double().argmax(1)  # the confident entry: log_softmax near 0
        ours = logitkit.selective_log_softmax(x, idx)
        assert ours.dtype == dtype and ours.shape == idx.shape
        errs[name] = oracle.ulp_error(ours, oracle.selective_log_softmax(x, idx, -1), dtype).max().item()
        own = logitkit.log_softmax(x, dim=-1).gather(-1, idx)
        # Both are separately rounded approximations within the target of the truth, on either side of it:
        # they agree within one target's width (not necessarily 1 ulp; fp32 kernels: 1.22 vs 1.42 ulp off).
        assert oracle.ulp_error(ours, own.double(), dtype).max() <= ULPS["selective_log_softmax"][dtype], name
    assert not worst(errs, ULPS["selective_log_softmax"][dtype]), errs


# dim 0 and the last dim of a 2-d input, and a middle dim of a 3-d one.
@pytest.mark.parametrize("shape,dim", [((9, 4), 0), ((4, 9), -1), ((3, 9, 2), 1)])
def test_selective_log_softmax_dims_and_gradcheck(backend, shape, dim):
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    ishape = list(shape)
    ishape[dim] = 3
    idx = torch.randint(0, shape[dim], ishape)
    ours = logitkit.selective_log_softmax(x, idx, dim)
    torch.testing.assert_close(ours, torch.log_softmax(x, dim).gather(dim, idx), rtol=4 * 2**-52, atol=1e-15)
    g = torch.randn(ishape, dtype=F64)
    torch.testing.assert_close(
        grad(lambda t: logitkit.selective_log_softmax(t, idx, dim), x, g),
        oracle.selective_log_softmax_bwd(x, idx, g, dim),
        rtol=1e-12,
        atol=1e-15,
    )
    assert torch.autograd.gradcheck(lambda t: logitkit.selective_log_softmax(t, idx, dim), (x,))


# Entropy: fp32 result for half inputs, the input dtype otherwise; relative accuracy against the oracle.
@pytest.mark.parametrize("V", [1, 7, 1025])
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
def test_entropy_accuracy_and_dtype(backend, dtype, V):
    out_dtype = F32 if dtype in (F16, BF16) else dtype
    errs = {}
    for name, x in oracle.input_families(dtype, V, M=rows_for(V), seed=V):
        ours = logitkit.entropy(x)
        assert ours.dtype == out_dtype and ours.shape == (x.shape[0],)
        truth = oracle.entropy(x, -1)
        rel = (ours.double() - truth).abs() / torch.maximum(truth.abs(), torch.full_like(truth, 1e-30))
        errs[name] = (rel / torch.finfo(out_dtype).eps).max().item()
    assert not worst(errs, ENTROPY_REL_EPS), errs


def test_entropy_known_values(backend):
    assert logitkit.entropy(torch.zeros(4, 8)).allclose(torch.full((4,), torch.log(torch.tensor(8.0)).item()))
    assert torch.equal(logitkit.entropy(torch.tensor([[3.0]])), torch.zeros(1))
    y = logitkit.entropy(torch.tensor([[0.0, -float("inf"), 0.0]]))  # 0 log 0 = 0
    assert torch.isfinite(y).all() and abs(y.item() - 0.6931471805599453) <= 1e-6


# The last dim and a leading dim of a 3-d input.
@pytest.mark.parametrize("dim", [-1, 0])
def test_entropy_gradcheck_and_backward(backend, dim):
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: logitkit.entropy(t, dim), (x,))
    g = torch.randn(logitkit.entropy(x, dim).shape, dtype=F64)
    torch.testing.assert_close(
        grad(lambda t: logitkit.entropy(t, dim), x, g), oracle.entropy_bwd(x, g, dim), rtol=1e-10, atol=1e-14
    )
    x32 = torch.randn(4, 33) * 5
    g32 = torch.randn(4)
    truth = oracle.entropy_bwd(x32, g32, -1)
    ours = grad(lambda t: logitkit.entropy(t), x32, g32)
    scale = oracle.softmax(x32, -1) * (1 - oracle.log_softmax(x32, -1)).abs() * g32.double().abs()[:, None] * 4
    assert oracle.scaled_error(ours, truth, scale, F32).max() <= 64


def test_entropy_of_special_rows_is_nan_on_the_reference_path():
    # NUMERICS.md: a row holding NaN or +inf is a NaN row, and so is an all -inf row without mask= (as torch's
    # softmax); the reference path's 0 * log 0 = 0 rule must not swallow them (it returned -0.0 before 2026-12-07).
    import math

    x = torch.tensor([[0.0, math.nan, 1.0], [0.0, math.inf, 1.0], [-math.inf] * 3, [0.0, -math.inf, 1.0]])
    with logitkit.use_backend("reference"):
        h = logitkit.entropy(x)
        stats = logitkit.cross_entropy_with_stats(x[[0, 3]], torch.tensor([0, 2]), reduction="none")
    assert torch.isnan(h[:3]).all() and torch.isfinite(h[3])
    assert torch.isnan(stats.entropy[0]) and torch.isfinite(stats.entropy[1])


# Empty inputs on every backend (the Triton path crashed on 0 rows / 0 columns with a reshape error before
# 2026-12-07): the result has the broadcast shape, the gradient the input's shape, and an empty row's entropy
# is 0 (the sum over no classes), as the reference path and torch.special.entr(softmax(x)).sum(-1).
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_empty_inputs(backend, dtype):
    for shape, ishape in [((0, 5), (0, 2)), ((2, 0, 5), (2, 0, 3)), ((3, 5), (3, 0))]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        out = logitkit.selective_log_softmax(x, torch.zeros(ishape, dtype=torch.long))
        assert out.shape == ishape and out.dtype == dtype
        out.sum().backward()
        assert x.grad.shape == x.shape and not x.grad.any()
    for shape in [(0, 4), (3, 0), (2, 0, 4), (2, 3, 0)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        h = logitkit.entropy(x)
        assert h.shape == shape[:-1] and h.dtype == F32
        assert torch.equal(h, torch.zeros(shape[:-1]))
        h.sum().backward()
        assert x.grad.shape == x.shape
