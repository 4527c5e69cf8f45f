"""The NUMERICS.md edge-case table, row by row, default (as torch) and with mask=."""

import math

import pytest
import torch
import torch.nn.functional as F

import logitkit
from _util import F16, F32, F64, grad
from logitkit.reference import oracle

inf, nan = math.inf, math.nan
OPS = ["softmax", "log_softmax"]


def same_specials(a, b, grads=False, dtype=F32):
    """Identical NaN/inf pattern; finite entries within 2 ulps of ``dtype`` (values) or, for gradients, within
    max(1e-5, eps of ``dtype``) of the largest entry (a half gradient is rounded to half)."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.isinf(a) & (a > 0), torch.isinf(b) & (b > 0)), (a, b)
    assert torch.equal(torch.isinf(a) & (a < 0), torch.isinf(b) & (b < 0)), (a, b)
    fin = torch.isfinite(a)
    if fin.any() and grads:
        tol = max(1e-5, torch.finfo(dtype).eps)
        assert (a[fin] - b[fin]).abs().max() <= tol * b[fin].abs().max(), (a, b)
    elif fin.any():
        assert oracle.ulp_error(a[fin], b[fin], dtype).max() <= 2, (a, b)


# Rows for the table: -inf among finite, all -inf, +inf present, NaN present (short and a long row each).
ROWS = {
    "neg_inf_among_finite": [0.5, -inf, 2.0, -1.0],
    "all_neg_inf": [-inf, -inf, -inf, -inf],
    "pos_inf": [0.5, inf, 2.0, -inf],
    "nan": [0.5, nan, 2.0, -1.0],
}


# Each table row, in a short row and embedded in a 1025-long row.
@pytest.mark.parametrize("case", list(ROWS))
@pytest.mark.parametrize("V", [4, 1025])
def test_default_semantics_as_torch(backend, case, V):
    row = torch.full((V,), -3.0)
    row[:4] = torch.tensor(ROWS[case])
    if case == "all_neg_inf":
        row[:] = -inf
    x = torch.stack([row, torch.linspace(-2, 2, V)])
    for op in OPS:
        same_specials(getattr(logitkit, op)(x, dim=1), getattr(F, op)(x, 1))
        same_specials(getattr(logitkit, op)(x, dim=1), getattr(oracle, op)(x, 1))
    same_specials(logitkit.logsumexp(x, 1), torch.logsumexp(x, 1))
    g = torch.linspace(-1, 1, V).expand(2, V).contiguous()
    same_specials(grad(lambda t: logitkit.softmax(t, dim=1), x, g), grad(lambda t: F.softmax(t, 1), x, g), grads=True)
    same_specials(
        grad(lambda t: logitkit.log_softmax(t, dim=1), x, g), grad(lambda t: F.log_softmax(t, 1), x, g), grads=True
    )
    same_specials(
        grad(lambda t: logitkit.logsumexp(t, 1), x, g[:, 0]),
        grad(lambda t: torch.logsumexp(t, 1), x, g[:, 0]),
        grads=True,
    )


def test_neg_inf_gets_zero_softmax_gradient(backend):
    x = torch.tensor([[0.5, -inf, 2.0]])
    g = grad(lambda t: logitkit.softmax(t, dim=1), x, torch.tensor([[1.0, 5.0, -1.0]]))
    assert g[0, 1].item() == 0.0 and torch.isfinite(g).all()
    gl = grad(lambda t: logitkit.logsumexp(t, 1), x, torch.tensor([1.0]))
    assert gl[0, 1].item() == 0.0


# Masks: a fully masked row, a row masking out its NaN and +inf, a row masking nothing; float32 and half.
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_mask_semantics(backend, dtype):
    x = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [nan, 1.0, inf, 0.0], [0.0, 1.0, -inf, 2.0], [-inf, -inf, -inf, -inf]], dtype=dtype
    )
    m = torch.tensor([[False] * 4, [False, True, False, True], [True] * 4, [True] * 4])
    sm, ls = logitkit.softmax(x, dim=1, mask=m), logitkit.log_softmax(x, dim=1, mask=m)
    lse = logitkit.logsumexp(x, 1, mask=m)
    assert torch.equal(sm[0], torch.zeros(4, dtype=dtype)) and (ls[0] == -inf).all() and lse[0] == -inf
    assert torch.equal(sm[3], torch.zeros(4, dtype=dtype)) and (ls[3] == -inf).all() and lse[3] == -inf
    for ours, ref in [
        (sm, oracle.softmax(x, 1, mask=m)),
        (ls, oracle.log_softmax(x, 1, mask=m)),
        (lse, oracle.logsumexp(x, 1, mask=m)),
    ]:
        same_specials(ours, ref, dtype=dtype)
    assert sm[1, 0] == 0 and sm[1, 2] == 0 and ls[1, 0] == -inf and ls[1, 2] == -inf
    # gradients: 0 at masked entries and on rows without mass; finite everywhere
    g = torch.randn(4, 4, dtype=F64).to(dtype)
    for op in OPS:
        gx = grad(lambda t, op=op: getattr(logitkit, op)(t, dim=1, mask=m), x, g)
        assert torch.isfinite(gx).all(), (op, gx)
        assert (gx[~m] == 0).all() and (gx[0] == 0).all(), (op, gx)
        assert (gx[3] == 0).all(), (op, "all -inf row under mask=: gradient must be 0", gx[3])
    gx = grad(lambda t: logitkit.logsumexp(t, 1, mask=m), x, g[:, 0])
    assert torch.isfinite(gx).all() and (gx[~m] == 0).all() and (gx[3] == 0).all()
    same_specials(gx, oracle.logsumexp_bwd(x, g[:, 0], 1, mask=m), grads=True, dtype=dtype)


def test_mask_broadcasts_and_matches_subset(backend):
    x = torch.randn(5, 7)
    m = torch.tensor([True, False, True, True, False, True, True])  # (V,) broadcast to (M, V)
    sm = logitkit.softmax(x, dim=1, mask=m)
    truth = oracle.softmax(x[:, m], 1)  # float64 oracle on the kept columns (torch's fp32 result is no truth)
    err = oracle.ulp_error(sm[:, m], truth, F32).max()
    assert err <= 4 and err <= oracle.ulp_error(torch.softmax(x[:, m], 1), truth, F32).max() + 1
    assert (sm[:, ~m] == 0).all()
    assert oracle.ulp_error(logitkit.logsumexp(x, 1, mask=m), oracle.logsumexp(x[:, m], 1), F32).max() <= 2
    mc = m[:, None].expand(7, 5).t()  # a non-contiguous mask
    assert torch.equal(logitkit.softmax(x, dim=1, mask=mc), sm)
    assert torch.equal(logitkit.softmax(x, dim=1, mask=torch.ones(5, 7, dtype=torch.bool)), logitkit.softmax(x, dim=1))


def test_reduced_dim_of_size_zero(backend):
    x = torch.zeros(3, 0)
    for op in OPS:
        assert getattr(logitkit, op)(x, dim=1).shape == (3, 0)
        assert getattr(logitkit, op)(x, dim=1, mask=torch.zeros(3, 0, dtype=torch.bool)).shape == (3, 0)
    assert torch.equal(logitkit.logsumexp(x, 1), torch.full((3,), -inf))
    assert torch.equal(logitkit.logsumexp(x, 1, mask=torch.zeros(3, 0, dtype=torch.bool)), torch.full((3,), -inf))


def test_zero_dim_input(backend):
    for v in (2.0, -inf):
        x = torch.tensor(v)
        for dim in (0, -1):
            same_specials(logitkit.softmax(x, dim=dim), F.softmax(x, dim))
            same_specials(logitkit.log_softmax(x, dim=dim), F.log_softmax(x, dim))
            same_specials(logitkit.logsumexp(x, dim), torch.logsumexp(x, dim))
    assert logitkit.softmax(torch.tensor(2.0), dim=0, mask=torch.tensor(False)).item() == 0.0
    with pytest.raises(IndexError):
        logitkit.softmax(torch.tensor(2.0), dim=1)


def test_cross_entropy_edge_rows(backend):
    x = torch.tensor([[0.0, -inf, 1.0], [-inf, 0.0, 2.0]])
    assert torch.equal(logitkit.cross_entropy(x, torch.tensor([1, 0]), reduction="none"), torch.tensor([inf, inf]))
    same_specials(
        logitkit.cross_entropy(x, torch.tensor([0, 1]), reduction="none"),
        F.cross_entropy(x, torch.tensor([0, 1]), reduction="none"),
    )
    p = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    same_specials(logitkit.cross_entropy(x, p, reduction="none"), F.cross_entropy(x, p, reduction="none"))


# create_graph=True (the differentiable backward) must give the first backward's values on the special rows:
# before 2026-12-07 logsumexp gave a NaN row for a +inf entry (torch: 0 off the infinities) and 0 for an all -inf
# row (torch: NaN), and entropy gave NaN on a row with a -inf logit (0 * -inf through its 0 log 0 = 0 rule).
# Rows: all -inf, -inf among finite, +inf, NaN, finite; the masks leave out an entry, a NaN, and a whole row.
@pytest.mark.parametrize("dtype", [F32, F64])
def test_create_graph_keeps_first_derivative_on_special_rows(backend, dtype):
    x0 = torch.tensor([[-inf] * 4, [0.0, 1.0, -inf, 2.0], [0.0, inf, 1.0, 2.0], [0.0, nan, 1.0, 2.0],
                       [3.0, 1.0, 2.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    tgt = torch.tensor([0, 1, 2, 0, 3])
    probs = torch.softmax(torch.arange(20.0, dtype=F64).view(5, 4).flip(0), -1).to(dtype)
    ops = {
        "softmax": lambda t: logitkit.softmax(t, -1), "log_softmax": lambda t: logitkit.log_softmax(t, -1),
        "logsumexp": lambda t: logitkit.logsumexp(t, -1),
        "softmax_mask": lambda t: logitkit.softmax(t, -1, mask=mask),
        "log_softmax_mask": lambda t: logitkit.log_softmax(t, -1, mask=mask),
        "logsumexp_mask": lambda t: logitkit.logsumexp(t, -1, mask=mask),
        "cross_entropy": lambda t: logitkit.cross_entropy(t, tgt, reduction="none", label_smoothing=0.1),
        "cross_entropy_probs": lambda t: logitkit.cross_entropy(t, probs, reduction="none"),
        "entropy": lambda t: logitkit.entropy(t),
        "selective_log_softmax": lambda t: logitkit.selective_log_softmax(t, tgt[:, None]),
    }
    torch_ops = {"softmax": lambda t: F.softmax(t, -1), "log_softmax": lambda t: F.log_softmax(t, -1),
                 "logsumexp": lambda t: torch.logsumexp(t, -1)}
    for name, fn in ops.items():
        firsts = []
        for f, create_graph in [(fn, False), (fn, True)] + ([(torch_ops[name], False)] if name in torch_ops else []):
            x = x0.clone().requires_grad_()
            y = f(x)
            g = torch.linspace(0.5, 1.5, y.numel(), dtype=y.dtype).view(y.shape)
            (gx,) = torch.autograd.grad(y, x, g, create_graph=create_graph)
            firsts.append(gx.detach())
        for other in firsts[1:]:  # the create_graph gradient, then torch's (same special-value pattern)
            same_specials(other, firsts[0], grads=True, dtype=dtype)
