"""softmax and log_softmax: values against the oracle, torch parity, gradients, layouts, properties."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import logitkit
from _tolerances import GRAD_SCALED, TORCH_SLACK, ULPS
from _util import (
    BF16,
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
    special_values,
    strict_specials,
    worst,
)
from logitkit.reference import oracle

OPS = ["softmax", "log_softmax"]


def test_seed_example(backend):
    x = torch.tensor([[0.3452, -0.0267, 0.4066], [0.4798, -0.6728, 1.1408]])
    sm = torch.tensor([[0.3633, 0.2505, 0.3863], [0.3074, 0.0971, 0.5955]])
    ls = torch.tensor([[-1.0126, -1.3845, -0.9512], [-1.1794, -2.3320, -0.5184]])
    # the expected values were printed from inputs with more digits than shown: 1e-4, not 5e-5
    assert (logitkit.softmax(x, dim=1) - sm).abs().max() <= 1e-4
    assert (logitkit.log_softmax(x, dim=1) - ls).abs().max() <= 1e-4


def test_headline_log_softmax(backend):
    x = torch.tensor([0.0, -20.0])
    y = logitkit.log_softmax(x, dim=0)
    assert oracle.ulp_error(y[0], torch.tensor(-2.0611537e-09, dtype=F64), F32) <= 2
    assert oracle.ulp_error(y, oracle.log_softmax(x, 0), F32).max() <= 2
    assert F.log_softmax(x, 0)[0] == 0.0  # what the textbook formula gives: the reason for this package


# Every family of NUMERICS.md (the special-value ones included: specials exact), each row length and dtype.
@pytest.mark.parametrize("V", LENGTHS)
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_accuracy_on_families(backend, op, dtype, V):
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        truth = getattr(oracle, op)(x, 1)
        ours = getattr(logitkit, op)(x, dim=1)
        assert ours.dtype == dtype and ours.shape == x.shape
        ours_err[name] = strict_specials(oracle.ulp_error(ours, truth, dtype), ours, truth, x).max().item()
        theirs = getattr(F, op)(x, 1)
        torch_err[name] = strict_specials(oracle.ulp_error(theirs, truth, dtype), theirs, truth, x).max().item()
    assert not worst(ours_err, ULPS[op][dtype]), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


# Long rows: 32768 entries, only two rows per family to stay inside the CPU budget; the special-value
# families get four, one of each kind of their "specials" rows (+inf, NaN, all -inf, one finite).
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("op", OPS)
def test_accuracy_long_rows(backend, op, dtype):
    errs = {}
    families = itertools.chain(oracle.input_families(dtype, 32768, M=2, seed=3), [special_values(dtype, 32768, 4, 3)])
    for name, x in families:
        ours, truth = getattr(logitkit, op)(x, dim=-1), getattr(oracle, op)(x, -1)
        errs[name] = strict_specials(oracle.ulp_error(ours, truth, dtype), ours, truth, x).max().item()
    assert not worst(errs, ULPS[op][dtype]), errs


# float64 has no ulp target: it must be as good as torch's float64 (checked against 200-bit mpmath).
@pytest.mark.parametrize("op", OPS)
def test_float64_not_worse_than_torch(backend, op):
    for name, x in oracle.input_families(F64, 33, M=8, seed=11):
        truth = getattr(oracle, op)(x, 1, exact=True)
        ours = oracle.ulp_error(getattr(logitkit, op)(x, dim=1), truth, F64).max()
        ref = oracle.ulp_error(getattr(F, op)(x, 1), truth, F64).max()
        assert ours <= ref + TORCH_SLACK[F64], (name, ours, ref)


# Backward with a random upstream gradient, against the oracle in the condition-scaled metric.
@pytest.mark.parametrize("V", [1, 7, 1025])  # trivial row, short odd row, one past a power of two
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_backward_random_upstream(backend, op, dtype, V):
    gen = torch.Generator().manual_seed(V)
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        g = torch.randn(x.shape, generator=gen, dtype=F64).to(dtype)
        if op == "softmax":
            truth, scale = oracle.softmax_bwd(x, g, 1), oracle.softmax_bwd_scale(x, g, 1)
        else:
            p = oracle.softmax(x, 1)
            ga = g.double().abs()
            truth, scale = oracle.log_softmax_bwd(x, g, 1), ga + p * ga.sum(1, keepdim=True)
        ours = grad(lambda t: getattr(logitkit, op)(t, dim=1), x, g)
        theirs = grad(lambda t: getattr(F, op)(t, 1), x, g)
        assert ours.dtype == dtype
        # NaN rows (NaN, +inf, all -inf) give NaN gradients, as torch; 0 at -inf entries for softmax.
        ours_err[name] = strict_specials(oracle.scaled_error(ours, truth, scale, dtype), ours, truth, x).max().item()
        torch_err[name] = (
            strict_specials(oracle.scaled_error(theirs, truth, scale, dtype), theirs, truth, x).max().item()
        )
    assert not worst(ours_err, GRAD_SCALED[dtype]), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


# dims of a 3-d tensor: first, middle, last (as negative); covers the non-last-dim paths.
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck(backend, op, dim):
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    fn = lambda t: getattr(logitkit, op)(t, dim=dim)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# Every dim of a 3-d tensor plus transposed and strided views, with special values in some rows:
# bit-for-bit the contiguous last-dim result, values and gradients (NUMERICS.md, "Edge cases").
@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("op", OPS)
def test_layouts_bit_for_bit(backend, op, dtype):
    fn = getattr(logitkit, op)
    base = layout_rows(dtype, 33, seed=1).view(4, 6, 33)
    for dim in range(3):
        xd = base.movedim(-1, dim)  # non-contiguous, softmax dim = dim
        ref = fn(xd.movedim(dim, -1).contiguous(), dim=-1).movedim(-1, dim)
        assert same_bits(fn(xd, dim=dim), ref), dim
        assert same_bits(fn(xd.contiguous(), dim=dim), ref), dim
        g = torch.randn(xd.shape, dtype=F64).to(dtype)
        ref_g = grad(lambda t: fn(t, dim=-1), xd.movedim(dim, -1).contiguous(), g.movedim(dim, -1).contiguous())
        assert same_bits(grad(lambda t, dim=dim: fn(t, dim=dim), xd, g), ref_g.movedim(-1, dim)), dim
    wide = torch.full((48, 66), math.nan, dtype=dtype)  # NaN between the entries: a stride bug shows
    strided = wide[::2, ::2]  # every other row and column
    strided.copy_(layout_rows(dtype, 33, seed=2))
    assert same_bits(fn(strided, dim=1), fn(strided.contiguous(), dim=1))
    assert same_bits(fn(strided.t(), dim=0), fn(strided.contiguous(), dim=1).t())
    g = torch.randn(strided.shape, dtype=F64).to(dtype)
    ref_g = grad(lambda t: fn(t, dim=1), strided.contiguous(), g)
    assert same_bits(grad(lambda t: fn(t, dim=1), strided, g), ref_g)
    assert same_bits(grad(lambda t: fn(t, dim=0), strided.t(), g.t()), ref_g.t())


def test_dtype_argument_casts_first(backend):
    x = torch.randn(3, 9, dtype=F16)
    for op in OPS:
        fn = getattr(logitkit, op)
        y = fn(x, dim=1, dtype=F32)
        assert y.dtype == F32 and torch.equal(y, fn(x.float(), dim=1))
        assert torch.equal(
            fn(torch.arange(6).view(2, 3), dim=1, dtype=F64), fn(torch.arange(6.0, dtype=F64).view(2, 3), dim=1)
        )


# torch's implicit dim: 0 for 0-d, 1-d and 3-d inputs, 1 otherwise; with torch's warning.
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 2, 3, 4)])
@pytest.mark.parametrize("op", OPS)
def test_dim_none_as_torch(backend, op, shape):
    x = torch.randn(shape)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        ours = getattr(logitkit, op)(x)
    implicit = 0 if len(shape) in (0, 1, 3) else 1
    assert torch.equal(ours, getattr(logitkit, op)(x, dim=implicit))
    with pytest.warns(UserWarning):
        ref = getattr(F, op)(x)
    assert oracle.ulp_error(ours, oracle.__dict__[op](x, implicit), F32).max() <= ULPS[op][F32]
    assert ref.shape == ours.shape


def test_stacklevel_positional_and_mask_keyword_only(backend):
    x = torch.randn(2, 3)
    assert torch.equal(logitkit.softmax(x, 1, 3, None), logitkit.softmax(x, dim=1))
    with pytest.raises(TypeError):
        logitkit.softmax(x, 1, 3, None, torch.ones(2, 3, dtype=torch.bool))


def test_empty_batch_and_zero_dim(backend):
    for op in OPS:
        fn = getattr(logitkit, op)
        e = torch.randn(0, 5, requires_grad=True)
        y = fn(e, dim=1)
        assert y.shape == (0, 5)
        y.sum().backward()
        assert e.grad.shape == (0, 5)
        z = torch.tensor(1.5, requires_grad=True)
        y0 = fn(z, dim=0)
        assert y0.shape == () and y0.item() == (1.0 if op == "softmax" else 0.0)
        assert fn(z, dim=-1).item() == y0.item()
        (gz,) = torch.autograd.grad(y0, z)
        assert gz.item() == 0.0


finite_rows = st.lists(st.floats(-60, 60, width=32), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(finite_rows)
def test_property_rows_sum_to_one(row):
    x = torch.tensor(row, dtype=F32)
    y = logitkit.softmax(x, dim=0)
    assert (y >= 0).all() and (y <= 1).all()
    assert abs(y.double().sum().item() - 1.0) <= 4 * len(row) * 2**-24
    ls = logitkit.log_softmax(x, dim=0)
    assert (ls <= 0).all()


# Values on a 2**-10 grid within +-50: x + 100 is exact in float32, so every difference x_i - max is too.
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-50 * 1024, 50 * 1024), min_size=1, max_size=40))
def test_property_shift_invariance(ints):
    x = torch.tensor(ints, dtype=F32) / 1024
    for op in OPS:
        fn = getattr(logitkit, op)
        assert torch.equal(fn(x + 100, dim=0), fn(x, dim=0)), op


@settings(max_examples=40, deadline=None)
@given(finite_rows)
def test_property_log_softmax_is_log_of_softmax(row):
    x = torch.tensor(row, dtype=F32)
    truth = oracle.log_softmax(x, 0)
    ours = logitkit.log_softmax(x, dim=0)
    assert oracle.ulp_error(ours, truth, F32).max() <= ULPS["log_softmax"][F32]
    assert oracle.ulp_error(logitkit.softmax(x, dim=0), oracle.softmax(x, 0), F32).max() <= ULPS["softmax"][F32]


def test_bf16_quantisation_is_the_only_error(backend):
    # 1025 ties plus one dominant entry: fp32 accumulation keeps the tiny rest sum exact enough for bf16.
    x = torch.full((1, 1025), -30.0, dtype=BF16)
    x[0, 0] = 0.0
    for op in OPS:
        assert oracle.ulp_error(getattr(logitkit, op)(x, dim=1), getattr(oracle, op)(x, 1), BF16).max() <= 0.5 + 1e-3


def test_overflow_points_of_exp(backend):
    # Entries right at exp's overflow points: the max shift must keep everything finite.
    for dtype, big in [(F16, 11.09), (F32, 88.72), (BF16, 88.72), (F64, 709.78)]:
        x = torch.tensor([[big, big - 1.0, -big]], dtype=dtype)
        for op in OPS:
            y = getattr(logitkit, op)(x, dim=1)
            assert torch.isfinite(y).all() and not math.isnan(y.sum().item()), (dtype, op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_general_route_meets_the_targets(monkeypatch, dtype):
    """The reference path off the CPU fast path (accelerator tensors without Triton, mask-free), simulated on the
    CPU: the rest-sum algorithm in float32 meets NUMERICS.md's targets on every finite family, the underflow
    edge included (its terms are summed scaled by 2**64: unscaled they keep a few bits, 2608 ulps in log_softmax)."""
    from logitkit.reference import oracle, plain

    monkeypatch.setattr(plain, "fast_path", lambda x: False)
    with logitkit.use_backend("reference"):
        for V in (7, 1024, 32768):
            for name, x in oracle.input_families(dtype, V, 4, seed=V):
                for op, ours, truth in (("softmax", logitkit.softmax(x, -1), oracle.softmax(x, -1)),
                                        ("log_softmax", logitkit.log_softmax(x, -1), oracle.log_softmax(x, -1))):
                    err = oracle.ulp_error(ours, truth).max().item()
                    assert err <= ULPS[op][dtype], (op, name, V, err)
                lse = oracle.lse_error(logitkit.logsumexp(x, -1), oracle.logsumexp(x, -1), x, -1).max().item()
                assert lse <= ULPS["logsumexp"][dtype], ("logsumexp", name, V, lse)
