"""logsumexp: the mixed metric against the oracle, tuple dims, wide accumulation, gradients."""

import math

import pytest
import torch

import logitkit
from _tolerances import GRAD_SCALED, TORCH_SLACK, ULPS
from _util import (
    F16,
    F32,
    F64,
    LENGTHS,
    TARGET_DTYPES,
    all_families,
    grad,
    layout_rows,
    rows_for,
    same_bits,
    strict_specials,
    worst,
)
from logitkit.reference import oracle


# Every family (the special-value ones: lse +inf / NaN / -inf exactly), row length and target dtype; near
# lse = 0 the mixed metric applies (NUMERICS.md).
@pytest.mark.parametrize("V", LENGTHS)
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_accuracy_on_families(backend, dtype, V):
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        truth = oracle.logsumexp(x, 1, exact=name == "log_p" and V <= 33)
        ours, theirs = logitkit.logsumexp(x, 1), torch.logsumexp(x, 1)
        assert ours.dtype == dtype and ours.shape == (x.shape[0],)
        ours_err[name] = strict_specials(oracle.lse_error(ours, truth, x, 1), ours, truth).max().item()
        torch_err[name] = strict_specials(oracle.lse_error(theirs, truth, x, 1), theirs, truth).max().item()
    assert not worst(ours_err, ULPS["logsumexp"][dtype]), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


# NUMERICS.md's constant rows of 4096 and 70000 entries: lse = c + log(V) exactly in the truth, softmax 1/V
# (an fp16 subnormal at 70000), log_softmax -log(V).  torch's fp16 logsumexp returns inf at 70000 (its fp16
# accumulator overflows past 65504): the sum must be wide.  c = 0 is that case; c = -3.25 and 7.5 move lse to
# other binades.  The triton backend (the interpreter here: 1.5-2.5 s per dtype for one 70000-long row and
# the three ops) takes the c = 0 row only at 70000; every c at 4096.
@pytest.mark.parametrize("V", [4096, 70000])
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_constant_rows_accumulate_wide(backend, dtype, V):
    x = torch.tensor([0.0, -3.25, 7.5], dtype=F64)[:, None].expand(3, V).to(dtype)
    if backend == "triton" and V == 70000:
        x = x[:1]  # the interpreter's budget: c = 0 only (the case torch gets wrong)
    truth = torch.tensor([0.0, -3.25, 7.5], dtype=F64)[: x.shape[0]] + math.log(V)
    assert torch.equal(oracle.logsumexp(x, 1), truth)
    y = logitkit.logsumexp(x, 1)
    assert y.dtype == dtype and oracle.ulp_error(y, truth, dtype).max() <= ULPS["logsumexp"][dtype], y
    for op in ("softmax", "log_softmax"):
        ours = getattr(logitkit, op)(x, dim=1)
        err = oracle.ulp_error(ours, getattr(oracle, op)(x, 1), dtype)
        assert ours.dtype == dtype and err.max() <= ULPS[op][dtype], (op, err.max())
        assert (ours == ours[:, :1]).all(), op  # every entry of a constant row is the same value


# Tuple dims in several orders, negative dims, keepdim both ways, against torch float64 and the oracle.
@pytest.mark.parametrize("dims", [0, -1, (0, 2), (2, 0), (1,), (0, 1, 2), (-1, -3)])
@pytest.mark.parametrize("keepdim", [False, True])
def test_dims_and_keepdim(backend, dims, keepdim):
    x = torch.randn(3, 4, 5, dtype=F64)
    ours = logitkit.logsumexp(x, dims, keepdim)
    ref = torch.logsumexp(x, dims, keepdim)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, oracle.logsumexp(x, dims, keepdim), rtol=4 * 2**-52, atol=0)
    g = torch.randn(ref.shape, dtype=F64)
    torch.testing.assert_close(
        grad(lambda t: logitkit.logsumexp(t, dims, keepdim), x, g),
        oracle.logsumexp_bwd(x, g, dims, keepdim),
        rtol=16 * 2**-52,
        atol=0,
    )
    x32 = x.float()
    assert (
        oracle.lse_error(
            logitkit.logsumexp(x32, dims, keepdim), oracle.logsumexp(x32, dims, keepdim), x32, dims, keepdim
        ).max()
        <= ULPS["logsumexp"][F32]
    )


# A non-last reduced dim and transposed/strided views, with special values in some rows (layout_rows), give
# the bits of the contiguous last-dim case, values and gradients.
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_layouts_bit_for_bit(backend, dtype):
    base = layout_rows(dtype, 33, seed=1).view(4, 6, 33)
    for dim in range(3):
        xd = base.movedim(-1, dim)
        ref = logitkit.logsumexp(xd.movedim(dim, -1).contiguous(), -1)
        assert same_bits(logitkit.logsumexp(xd, dim), ref), dim
        assert same_bits(logitkit.logsumexp(xd.contiguous(), dim), ref), dim
        g = torch.randn(ref.shape, dtype=F64).to(dtype)
        ref_g = grad(lambda t: logitkit.logsumexp(t, -1), xd.movedim(dim, -1).contiguous(), g)
        assert same_bits(grad(lambda t, dim=dim: logitkit.logsumexp(t, dim), xd, g), ref_g.movedim(-1, dim)), dim
    wide = torch.full((48, 66), math.nan, dtype=dtype)  # NaN between the entries: a stride bug shows
    strided = wide[::2, ::2]  # every other row and column
    strided.copy_(layout_rows(dtype, 33, seed=2))
    ref = logitkit.logsumexp(strided.contiguous(), 1)
    assert same_bits(logitkit.logsumexp(strided, 1), ref)
    assert same_bits(logitkit.logsumexp(strided.t(), 0), ref)
    g = torch.randn(ref.shape, dtype=F64).to(dtype)
    ref_g = grad(lambda t: logitkit.logsumexp(t, 1), strided.contiguous(), g)
    assert same_bits(grad(lambda t: logitkit.logsumexp(t, 1), strided, g), ref_g)
    assert same_bits(grad(lambda t: logitkit.logsumexp(t, 0), strided.t(), g), ref_g.t())


# Backward g * exp(x - lse), relative to |g| p (the NUMERICS.md scale with the lse's own g).
@pytest.mark.parametrize("V", [1, 7, 1025])  # trivial row, short odd row, one past a power of two
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_backward_random_upstream(backend, dtype, V):
    gen = torch.Generator().manual_seed(V)
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        g = torch.randn(x.shape[0], generator=gen, dtype=F64).to(dtype)
        truth = oracle.logsumexp_bwd(x, g, 1)
        scale = 2 * truth.abs()  # y_i (|g| + |g| sum y_j) with y = p
        ours = grad(lambda t: logitkit.logsumexp(t, 1), x, g)
        theirs = grad(lambda t: torch.logsumexp(t, 1), x, g)
        assert ours.dtype == dtype
        # As torch: 0 at -inf entries, NaN at a +inf entry (inf - inf) and on NaN and all -inf rows.
        ours_err[name] = strict_specials(oracle.scaled_error(ours, truth, scale, dtype), ours, truth, x).max().item()
        torch_err[name] = (
            strict_specials(oracle.scaled_error(theirs, truth, scale, dtype), theirs, truth, x).max().item()
        )
    assert not worst(ours_err, GRAD_SCALED[dtype]), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


# A single dim, a tuple of two, and all three dims.
@pytest.mark.parametrize("dims", [1, (0, 2), (0, 1, 2)])
def test_gradcheck_and_gradgradcheck(backend, dims):
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    fn = lambda t: logitkit.logsumexp(t, dims)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_empty_and_zero_dim(backend):
    y = logitkit.logsumexp(torch.zeros(3, 0), 1)
    assert y.shape == (3,) and (y == -float("inf")).all()
    assert logitkit.logsumexp(torch.zeros(0, 4), 1).shape == (0,)
    z = torch.tensor(2.5, requires_grad=True)
    y0 = logitkit.logsumexp(z, 0)
    assert y0.shape == () and y0.item() == 2.5
    (gz,) = torch.autograd.grad(y0, z)
    assert gz.item() == 1.0


def test_integer_input_as_torch(backend):
    # torch.logsumexp promotes integer inputs to the default float dtype instead of raising.
    x = torch.arange(6).view(2, 3)
    ref = torch.logsumexp(x, 1)
    ours = logitkit.logsumexp(x, 1)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, rtol=2 * 2**-23, atol=0)


def test_shift_invariance_exact_shift(backend):
    x = (torch.randint(-50 * 1024, 50 * 1024, (16, 33)) / 1024).float()
    # lse(x + 100) - 100 is lse(x) up to the final rounding of a + L; allow the two roundings
    err = oracle.lse_error(logitkit.logsumexp(x + 100, 1) - 100, oracle.logsumexp(x, 1), x, 1)
    assert err.max() <= 2 * ULPS["logsumexp"][F32] + 128  # +100 moves a + L to a 128x coarser grid
