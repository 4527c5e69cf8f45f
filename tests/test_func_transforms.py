"""torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) over every public op.

Under a transform the ops take the composite path (reference/composite.py); these tests hold it to the ordinary
autograd path, torch.nn.functional and Python loops, and check that the ordinary path does not take it.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import logitkit
from _util import BF16, F16, F32, F64
from logitkit import _config
from logitkit.reference import composite, oracle

# torch's forward-mode decompositions (loaded on the first jvp/jacfwd) call torch.jit.script, deprecated in 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

inf, nan = math.inf, math.nan

# Rows: random, a confident row (its log_softmax at the max is -2e-9), a row with a tie for the max.
X = torch.cat([torch.randn(2, 7, generator=torch.Generator().manual_seed(0), dtype=F64) * 3,
               torch.tensor([[0.0, -20, -30, -25, -22, -40, -21], [1.0, 2, 2, -1, 0, 0.5, -3]], dtype=F64)])
T = torch.tensor([0, 3, -100, 1])  # one ignored row; the confident row's target is not its max
MASK = torch.tensor([True, True, False, True, True, True, False]).expand(4, 7)
# The ordinary path is float64 inside for float32 inputs on the CPU; the composite float32 (TwoSum for x - a).
TOL = {F32: dict(rtol=2e-5, atol=1e-6), F64: dict(rtol=1e-11, atol=1e-13)}


def ops(dtype):
    """One closure per public op and option set with its own code path, x (4, 7) -> a tensor."""
    w = torch.linspace(0.5, 2.0, 7, dtype=dtype)  # class weights
    p = torch.softmax(torch.linspace(-1, 1, 28, dtype=dtype).reshape(4, 7), 1)
    idx = torch.tensor([[0, 5], [2, 2], [6, 1], [1, 0]])
    lw = torch.linspace(-1.0, 1.0, 9 * 7, dtype=dtype).reshape(9, 7)  # linear_weight (V=9, D=7)
    lb = torch.linspace(-0.5, 0.5, 9, dtype=dtype)
    return {
        "softmax": lambda x: logitkit.softmax(x, -1),
        "softmax_dim0_mask": lambda x: logitkit.softmax(x, 0, mask=MASK),
        "log_softmax": lambda x: logitkit.log_softmax(x, 1),
        "log_softmax_mask": lambda x: logitkit.log_softmax(x, 1, mask=MASK),
        "log_softmax_dtype": lambda x: logitkit.log_softmax(x, 1, dtype=F64),
        "logsumexp": lambda x: logitkit.logsumexp(x, 1),
        "logsumexp_dims_keepdim": lambda x: logitkit.logsumexp(x.reshape(2, 2, 7), (0, 2), keepdim=True),
        "logsumexp_mask": lambda x: logitkit.logsumexp(x, -1, mask=MASK),
        "cross_entropy": lambda x: logitkit.cross_entropy(x, T),
        "cross_entropy_weighted_mean_smoothing": lambda x: logitkit.cross_entropy(x, T, w, label_smoothing=0.1),
        "cross_entropy_sum_z_softcap": lambda x: logitkit.cross_entropy(x, T, reduction="sum", z_loss=1e-2,
                                                                        softcap=5.0),
        "cross_entropy_none_ignore": lambda x: logitkit.cross_entropy(x, T.clamp_min(0), ignore_index=3,
                                                                         reduction="none"),
        "cross_entropy_kdim": lambda x: logitkit.cross_entropy(x.reshape(2, 2, 7).transpose(1, 2),
                                                               T.clamp_min(0).reshape(2, 2)),
        "cross_entropy_prob": lambda x: logitkit.cross_entropy(x, p, w, label_smoothing=0.2, z_loss=1e-3),
        "cross_entropy_with_stats": lambda x: logitkit.cross_entropy_with_stats(x, T, softcap=3.0).loss,
        "nll_loss": lambda x: logitkit.nll_loss(logitkit.log_softmax(x, 1), T, w),
        "selective_log_softmax": lambda x: logitkit.selective_log_softmax(x, idx),
        "entropy": lambda x: logitkit.entropy(x),
        "linear_cross_entropy": lambda x: logitkit.linear_cross_entropy(x, lw, T, linear_bias=lb,
                                                                        label_smoothing=0.1),
        "linear_cross_entropy_prob_none": lambda x: logitkit.linear_cross_entropy(
            x, lw, torch.softmax(lw.T[:4] * 2, 1), reduction="none", z_loss=1e-2),
    }


@pytest.mark.parametrize("dtype", [F32, F64])  # the dtypes the ordinary path is compared in (halves: below)
@pytest.mark.parametrize("name", list(ops(F64)))
def test_vjp_and_grad_match_autograd(name, dtype):
    fn = ops(dtype)[name]
    x = X.to(dtype)
    xr = x.clone().requires_grad_()
    ref = fn(xr)
    g = torch.randn(ref.shape, dtype=ref.dtype)
    (gx_ref,) = torch.autograd.grad(ref, xr, g)
    out, vjp_fn = vjp(fn, x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    (gx,) = vjp_fn(g)
    assert gx.dtype == dtype
    torch.testing.assert_close(gx, gx_ref, **TOL[dtype])
    torch.testing.assert_close(grad(lambda t: (fn(t) * g).sum())(x), gx_ref, **TOL[dtype])


LW = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=F64)  # linear_weight (V=9, D=7)


def _w():
    return torch.linspace(0.5, 2.0, 7, dtype=F64)


# torch.nn.functional equivalents (float64): the Jacobians of both must agree.
TORCH_PAIRS = {
    "softmax": (lambda x: logitkit.softmax(x, 0), lambda x: F.softmax(x, 0)),
    "log_softmax": (lambda x: logitkit.log_softmax(x, -1), lambda x: F.log_softmax(x, -1)),
    "logsumexp": (lambda x: logitkit.logsumexp(x, (0, 1)), lambda x: torch.logsumexp(x, (0, 1))),
    "cross_entropy": (lambda x: logitkit.cross_entropy(x, T, _w(), label_smoothing=0.1),
                      lambda x: F.cross_entropy(x, T, _w(), label_smoothing=0.1)),
    "cross_entropy_none": (lambda x: logitkit.cross_entropy(x, T, reduction="none"),
                           lambda x: F.cross_entropy(x, T, reduction="none")),
    "cross_entropy_prob": (lambda x: logitkit.cross_entropy(x, torch.softmax(X, 1)),
                           lambda x: F.cross_entropy(x, torch.softmax(X, 1))),
    "nll_loss": (lambda x: logitkit.nll_loss(x, T, _w()), lambda x: F.nll_loss(x, T, _w())),
    "selective_log_softmax": (lambda x: logitkit.selective_log_softmax(x, T.clamp_min(0)[:, None]),
                              lambda x: F.log_softmax(x, -1).gather(-1, T.clamp_min(0)[:, None])),
    "entropy": (lambda x: logitkit.entropy(x), lambda x: -(F.softmax(x, -1) * F.log_softmax(x, -1)).sum(-1)),
    "linear_cross_entropy": (lambda x: logitkit.linear_cross_entropy(x, LW, T, linear_bias=LW[:, 0]),
                             lambda x: F.cross_entropy(F.linear(x, LW, LW[:, 0]), T)),
}


@pytest.mark.parametrize("name", list(TORCH_PAIRS))
def test_jacrev_jacfwd_jvp_match_torch(name):
    ours, theirs = TORCH_PAIRS[name]
    x = X.clone()
    J = jacrev(ours)(x)
    torch.testing.assert_close(J, jacrev(theirs)(x), **TOL[F64])
    torch.testing.assert_close(jacfwd(ours)(x), J, **TOL[F64])
    v = torch.randn_like(x)
    y1, t1 = jvp(ours, (x,), (v,))
    y2, t2 = jvp(theirs, (x,), (v,))
    torch.testing.assert_close(y1, y2, **TOL[F64])
    torch.testing.assert_close(t1, t2, **TOL[F64])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_hessian_of_logsumexp_is_diag_p_minus_ppT(dtype):
    x = torch.tensor([3.0, -1.0, 0.5, 3.0, -30.0, 2.0], dtype=dtype)  # a tie for the max, one tiny p
    p = torch.softmax(x.double(), 0)
    expected = (torch.diag(p) - torch.outer(p, p)).to(dtype)
    H = jacfwd(jacrev(lambda t: logitkit.logsumexp(t, 0)))(x)
    torch.testing.assert_close(H, expected, **TOL[dtype])
    torch.testing.assert_close(hessian(lambda t: logitkit.logsumexp(t, 0, mask=t > -100))(x), expected,
                               **TOL[dtype])


def test_hessian_and_third_derivative_of_losses_match_torch():
    """Second order with the extensions (z_loss, softcap, smoothing) and third order through logsumexp."""
    x, t = X[0], torch.tensor(2)

    def theirs(v):
        vc = torch.tanh(v / 4.0) * 4.0
        return F.cross_entropy(vc, t, label_smoothing=0.1) + 0.1 * torch.logsumexp(vc, -1) ** 2

    ours = lambda v: logitkit.cross_entropy(v, t, label_smoothing=0.1, z_loss=0.1, softcap=4.0)  # noqa: E731
    torch.testing.assert_close(hessian(ours)(x), hessian(theirs)(x), **TOL[F64])
    d3 = jacfwd(jacfwd(jacrev(lambda v: logitkit.logsumexp(v, -1))))(x)
    torch.testing.assert_close(d3, jacfwd(jacfwd(jacrev(lambda v: torch.logsumexp(v, -1))))(x), **TOL[F64])


B = 3  # vmapped batch
XB = torch.randn(B, 4, 7, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
TB = torch.tensor([[0, 6, -100, 2], [1, 1, 5, -100], [3, 0, 4, 6]])
MB = torch.rand(B, 4, 7, generator=torch.Generator().manual_seed(2)) > 0.3

# (function, batched arguments, in_dims): each argument, targets and masks included, carries the batch.
VMAP_CASES = {
    "log_softmax": (lambda x: logitkit.log_softmax(x, -1), (XB,), 0),
    "softmax_dim0": (lambda x: logitkit.softmax(x, 0), (XB,), 0),
    "softmax_in_dim1": (lambda x: logitkit.softmax(x, -1), (XB.transpose(0, 1),), 1),
    "log_softmax_mask": (lambda x, m: logitkit.log_softmax(x, -1, mask=m), (XB, MB), 0),
    "logsumexp_mask": (lambda x, m: logitkit.logsumexp(x, 1, mask=m), (XB, MB), 0),
    "logsumexp_dims": (lambda x: logitkit.logsumexp(x, (0, 1)), (XB,), 0),
    "cross_entropy": (lambda x, t: logitkit.cross_entropy(x, t, label_smoothing=0.1), (XB, TB), 0),
    "cross_entropy_none": (lambda x, t: logitkit.cross_entropy(x, t, reduction="none", z_loss=1e-2), (XB, TB), 0),
    "nll_loss": (lambda x, t: logitkit.nll_loss(x, t), (XB, TB), 0),
    "selective_log_softmax": (lambda x, t: logitkit.selective_log_softmax(x, t.clamp_min(0)[:, None]), (XB, TB), 0),
    "entropy": (lambda x: logitkit.entropy(x), (XB,), 0),
    "linear_cross_entropy": (lambda x, t: logitkit.linear_cross_entropy(x, LW, t), (XB, TB), 0),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_vmap_matches_python_loop(name):
    fn, args, in_dims = VMAP_CASES[name]
    out = vmap(fn, in_dims=in_dims)(*args)
    ref = torch.stack([fn(*[a.select(in_dims, i) for a in args]) for i in range(B)])  # the ordinary path
    torch.testing.assert_close(out, ref, **TOL[F64])


def test_per_sample_grads_and_functional_call():
    """vmap(grad(...)) over examples, and grad over a module's parameters through functional_call."""
    loss = lambda x, t: logitkit.cross_entropy(x, t, label_smoothing=0.1)  # noqa: E731
    per_sample = vmap(grad(loss))(XB, TB)
    for i in range(B):
        xi = XB[i].clone().requires_grad_()
        F.cross_entropy(xi, TB[i], label_smoothing=0.1).backward()
        torch.testing.assert_close(per_sample[i], xi.grad, **TOL[F64])
    model = torch.nn.Linear(7, 5, dtype=F64)
    crit = logitkit.nn.CrossEntropyLoss(label_smoothing=0.1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    t = TB[0].clamp(0, 4)
    g = grad(lambda p: crit(functional_call(model, p, (XB[0],)), t))(params)
    crit(model(XB[0]), t).backward()
    for k, v in model.named_parameters():
        torch.testing.assert_close(g[k], v.grad, **TOL[F64])


def test_stats_under_vmap_are_detached_and_match():
    out = vmap(lambda x, t: logitkit.cross_entropy_with_stats(x, t, z_loss=1e-2))(XB, TB)
    for i in range(B):
        ref = logitkit.cross_entropy_with_stats(XB[i], TB[i], z_loss=1e-2)
        for a, b in zip(out, ref, strict=True):
            torch.testing.assert_close(a[i], b, **TOL[F64])
    # lse and entropy carry no gradient: the loss' gradient is the same with or without them summed in
    g1 = grad(lambda x: sum(v.sum() for v in logitkit.cross_entropy_with_stats(x, T)))(X)
    torch.testing.assert_close(g1, grad(lambda x: logitkit.cross_entropy(x, T))(X), **TOL[F64])


# The NUMERICS.md special rows, and a confident and a tied row.
SPECIAL = torch.tensor([
    [0.0, 1.0, 2.0, 3.0],
    [-inf, 1.0, 2.0, -inf],
    [-inf, -inf, -inf, -inf],
    [inf, 1.0, 2.0, 3.0],
    [inf, 1.0, inf, 100.0],  # two +inf and a finite entry whose exp overflows float32
    [nan, 1.0, 2.0, 3.0],
    [0.0, -20.0, -30.0, -40.0],
    [5.0, 5.0, 1.0, 5.0],
], dtype=F64)
SPECIAL_T = torch.tensor([0, 1, 2, 3, 1, -100, 0, 1])
SPECIAL_OPS = {
    "softmax": lambda x: logitkit.softmax(x, -1),
    "log_softmax": lambda x: logitkit.log_softmax(x, -1),
    "logsumexp": lambda x: logitkit.logsumexp(x, -1),
    "cross_entropy_none": lambda x: logitkit.cross_entropy(x, SPECIAL_T, reduction="none", label_smoothing=0.1),
    "cross_entropy_prob": lambda x: logitkit.cross_entropy(x, torch.full_like(x, 0.25), reduction="none"),
    "selective_log_softmax": lambda x: logitkit.selective_log_softmax(x, SPECIAL_T.clamp_min(0)[:, None]),
    "entropy": lambda x: logitkit.entropy(x),
}


def _vjp_pair(fn, x):
    """(ordinary output, vjp output, ordinary gradient, vjp gradient) for one fixed cotangent."""
    xr = x.clone().requires_grad_()
    ref = fn(xr)
    g = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    (gx_ref,) = torch.autograd.grad(ref, xr, g)
    out, vjp_fn = vjp(fn, x)
    return ref.detach(), out, gx_ref, vjp_fn(g)[0]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", list(SPECIAL_OPS))
def test_special_rows_under_vjp_as_the_ordinary_path(name, dtype):
    """NaN / inf patterns of values and gradients equal (NaN rows give NaN gradients, -inf entries 0, lse's
    gradient torch's exp(x - lse)); finite entries close."""
    ref, out, gx_ref, gx = _vjp_pair(SPECIAL_OPS[name], SPECIAL.to(dtype))
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(gx, gx_ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_mask_rows_under_vjp(op):
    """mask=: an all-masked row gives 0 / -inf and gradient 0; masked-out entries get gradient 0 (also in a
    NaN row, where the ordinary softmax backward gives NaN there); elsewhere as the ordinary path."""
    m = torch.tensor([True, True, False, True]).expand(8, 4).clone()
    m[0] = False  # nothing left in row 0
    fn = {"softmax": lambda x: logitkit.softmax(x, -1, mask=m),
          "log_softmax": lambda x: logitkit.log_softmax(x, -1, mask=m),
          "logsumexp": lambda x: logitkit.logsumexp(x, -1, mask=m)}[op]
    ref, out, gx_ref, gx = _vjp_pair(fn, SPECIAL)
    torch.testing.assert_close(out, ref, equal_nan=True, **TOL[F64])
    assert torch.equal(gx[~m], torch.zeros_like(gx[~m]))
    torch.testing.assert_close(gx[m], gx_ref[m], equal_nan=True, **TOL[F64])
    assert torch.equal(out[0], torch.full_like(out[0], 0.0 if op == "softmax" else -inf))


def test_confident_rows_keep_their_digits_under_transforms():
    """The rest sum survives the transforms: log_softmax([0, -20])[0] = -2.06e-9 (torch: 0), and the
    cross-entropy gradient at a confident target is -2.06e-9 (autodiff of d - L would give 1 - p = 0)."""
    x = torch.tensor([[0.0, -20.0]])
    truth = oracle.log_softmax(x, 1)
    y = vmap(lambda r: logitkit.log_softmax(r, -1))(x)
    assert oracle.ulp_error(y, truth, F32).max() <= 2
    assert F.log_softmax(x, 1)[0, 0] == 0.0  # what the shifted formula gives
    g = grad(lambda r: logitkit.cross_entropy(r, torch.tensor([0])))(x)
    g_truth = torch.softmax(x.double(), 1) - torch.tensor([[1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(g.double(), g_truth, rtol=1e-6, atol=0)
    assert g.sum().abs() <= 1e-16


def test_ordinary_path_is_not_the_composite(monkeypatch):
    """Outside a transform the ops are the autograd.Functions (hot path unchanged); inside, the composite."""
    calls = []
    rows = composite.rows
    monkeypatch.setattr(composite, "rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    x = X.float().requires_grad_()
    assert not _config.transforms_active()
    assert type(logitkit.log_softmax(x, 1).grad_fn).__name__ == "SoftmaxFunctionBackward"
    lse_fn = logitkit.logsumexp(x, 1).grad_fn  # a squeeze of the Function's keepdim output
    assert type(lse_fn.next_functions[0][0]).__name__ == "LogsumexpFunctionBackward"
    assert type(logitkit.cross_entropy(x, T).grad_fn).__name__ == "CrossEntropyFunctionBackward"
    assert type(logitkit.entropy(x).grad_fn).__name__ == "EntropyFunctionBackward"
    lw = torch.randn(9, 7)
    assert "LinearCrossEntropy" in type(logitkit.linear_cross_entropy(x, lw, T).grad_fn).__name__
    assert calls == []
    seen = []
    grad(lambda t: seen.append(_config.transforms_active()) or logitkit.cross_entropy(t, T))(x.detach())
    assert seen == [True] and len(calls) == 1


def test_validation_errors_are_the_same_under_transforms():
    bad = T.clone()
    bad[1] = 7
    with pytest.raises(IndexError, match="target 7 is out of bounds"):
        logitkit.cross_entropy(X, bad)
    with pytest.raises(IndexError, match="target 7 is out of bounds"):
        grad(lambda x: logitkit.cross_entropy(x, bad))(X)
    tb = TB.clone()
    tb[2, 1] = 9  # batched targets: checked on the values under vmap's wrapper
    with pytest.raises(IndexError, match="target 9 is out of bounds"):
        vmap(lambda x, t: logitkit.cross_entropy(x, t))(XB, tb)
    with pytest.raises(IndexError, match="index 9 is out of bounds"):
        vmap(lambda x, t: logitkit.selective_log_softmax(x, t.clamp_min(0)[:, None]))(XB, tb)
    with pytest.raises(ValueError, match="batch_size"):
        grad(lambda x: logitkit.cross_entropy(x, T[:3]))(X)
    with pytest.raises(TypeError, match="floating-point"):
        vmap(lambda x: logitkit.log_softmax(x, -1))(TB)
    with pytest.raises(ValueError, match="not broadcastable"):
        grad(lambda x: logitkit.logsumexp(x, 1, mask=torch.ones(3, dtype=torch.bool)).sum())(X)


# Half inputs: float32 working precision; losses float32, gradients and softmax-family outputs in the input's dtype.
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_inputs_under_grad(dtype):
    x = (X * 2).to(dtype)
    y = vmap(lambda r: logitkit.log_softmax(r, -1))(x)
    assert y.dtype == dtype
    assert oracle.ulp_error(y, oracle.log_softmax(x, 1), dtype).max() <= 1
    lse = vmap(lambda r: logitkit.logsumexp(r, -1))(x)
    assert lse.dtype == dtype and oracle.ulp_error(lse, oracle.logsumexp(x, 1), dtype).max() <= 1
    loss, vjp_fn = vjp(lambda r: logitkit.cross_entropy(r, T, reduction="none"), x)
    assert loss.dtype == F32
    torch.testing.assert_close(loss, logitkit.cross_entropy(x, T, reduction="none"), rtol=1e-6, atol=1e-7)
    (gx,) = vjp_fn(torch.ones(4))
    assert gx.dtype == dtype
    xr = x.double().requires_grad_()
    (g_truth,) = torch.autograd.grad(F.cross_entropy(xr, T, reduction="sum"), xr)
    torch.testing.assert_close(gx.double(), g_truth, rtol=torch.finfo(dtype).eps, atol=1e-7)
    assert logitkit.entropy(x).dtype == F32 and grad(lambda r: logitkit.entropy(r).sum())(x).dtype == dtype


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "cross_entropy"])
def test_float32_accuracy_under_vmap(op):
    """NUMERICS.md's float32 targets hold on the composite path too (TwoSum x - a, rest sum, log1p)."""
    x = torch.cat([torch.randn(6, 33, generator=torch.Generator().manual_seed(4)) * s for s in (1, 10, 100)])
    x = torch.cat([x, 1e4 + torch.randn(6, 33, generator=torch.Generator().manual_seed(5))])
    if op == "cross_entropy":
        t = torch.randint(0, 33, (24,), generator=torch.Generator().manual_seed(6))
        out = vmap(lambda r, i: logitkit.cross_entropy(r, i))(x, t)
        assert oracle.ulp_error(out, oracle.cross_entropy(x, t, reduction="none"), F32).max() <= 2
        return
    out = vmap(lambda r: getattr(logitkit, op)(r, -1))(x)
    assert oracle.ulp_error(out, getattr(oracle, op)(x, 1), F32).max() <= {"softmax": 4, "log_softmax": 2}[op]


def test_empty_and_zero_dim_inputs():
    assert torch.equal(vmap(lambda r: logitkit.softmax(r, 0))(torch.randn(3)), torch.ones(3))
    assert torch.equal(vmap(lambda r: logitkit.logsumexp(r, 0))(X[0]), X[0])
    assert torch.equal(grad(lambda r: logitkit.logsumexp(r, -1).sum())(torch.randn(3, 0)), torch.zeros(3, 0))
    assert vmap(lambda r: logitkit.log_softmax(r, -1))(torch.randn(2, 3, 0)).shape == (2, 3, 0)
    assert torch.equal(vmap(lambda r: logitkit.entropy(r))(torch.randn(2, 3, 0)), torch.zeros(2, 3))
    assert torch.isneginf(vmap(lambda r: logitkit.logsumexp(r, -1))(torch.randn(2, 0))).all()


def test_compiled_transforms_fullgraph():
    """torch.compile(fullgraph=True) of a transformed op traces the composite without graph breaks."""
    torch._dynamo.reset()
    f = grad(lambda x: logitkit.cross_entropy(x, T, label_smoothing=0.1))
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(X), f(X), **TOL[F64])
    v = vmap(lambda x: logitkit.log_softmax(x, -1))
    torch.testing.assert_close(torch.compile(v, fullgraph=True, backend="aot_eager")(XB), v(XB), **TOL[F64])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", list(ops(F64)))
def test_forward_ad_outside_torch_func(name, dtype):
    """torch.autograd.forward_ad (make_dual in a dual_level, no torch.func): a dual input takes the composite
    path, whose tangent matches the ordinary path's Jacobian-vector product (built from autograd's vjps)."""
    import torch.autograd.forward_ad as fwAD

    fn = ops(dtype)[name]
    x = X.to(dtype)
    v = torch.linspace(-1.0, 1.0, x.numel(), dtype=dtype).reshape(x.shape)
    xr = x.clone().requires_grad_()
    y = fn(xr)
    rows = [torch.autograd.grad(y, xr, e.reshape(y.shape), retain_graph=True)[0].reshape(-1)
            for e in torch.eye(y.numel(), dtype=y.dtype)]  # the Jacobian, one vjp per output entry
    want = (torch.stack(rows).double() @ v.reshape(-1).double()).reshape(y.shape)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(fwAD.make_dual(x, v)))
    assert out.tangent is not None and out.tangent.dtype == y.dtype
    torch.testing.assert_close(out.primal, y.detach(), **TOL[dtype])
    finite = torch.isfinite(want)
    torch.testing.assert_close(out.tangent.double()[finite], want[finite], **TOL[dtype])


def test_forward_ad_level_alone_keeps_the_ordinary_path():
    """Inside a dual level, inputs without a tangent still take the autograd.Functions."""
    import torch.autograd.forward_ad as fwAD

    x = X.float().requires_grad_()
    with fwAD.dual_level():
        assert not _config.transforms_active(x, T)
        assert type(logitkit.cross_entropy(x, T).grad_fn).__name__ == "CrossEntropyFunctionBackward"
        assert _config.transforms_active(x, fwAD.make_dual(X, X))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_composite_meets_the_targets_on_every_family(dtype):
    """Under vmap (the composite) on all NUMERICS.md finite families, the underflow edge included (its terms are
    summed scaled by 2**64: unscaled they keep a few bits, 2550 ulps in log_softmax), V up to 32768."""
    ulps = {"softmax": {F32: 4, BF16: 1}, "log_softmax": {F32: 2, BF16: 1}, "logsumexp": {F32: 2, BF16: 1}}
    for V in (7, 1024, 32768):
        for name, x in oracle.input_families(dtype, V, 4, seed=V):
            for op in ("softmax", "log_softmax"):
                out = vmap(lambda r, op=op: getattr(logitkit, op)(r, -1))(x)
                err = oracle.ulp_error(out, getattr(oracle, op)(x, -1)).max().item()
                assert err <= ulps[op][dtype], (op, name, V, err)
            out = vmap(lambda r: logitkit.logsumexp(r, -1))(x)
            err = oracle.lse_error(out, oracle.logsumexp(x, -1), x, -1).max().item()
            assert err <= ulps["logsumexp"][dtype], ("logsumexp", name, V, err)
