"""cross_entropy: torch parity over every option, accuracy per row, dtypes, gradients, properties."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import logitkit
from _tolerances import F64_PARITY, REDUCED_REL_EPS, TORCH_SLACK, ULPS
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
    strict_specials,
    worst,
)
from logitkit.reference import oracle


def make_case(shape, prob, ignore, weighted, gen, dtype=F64):
    """(logits, target, weight) for a (N, C, ...) or (C,) shape."""
    x = torch.randn(shape, dtype=F64, generator=gen).mul(3).to(dtype)
    cd = 1 if len(shape) > 1 else 0
    C = shape[cd]
    tshape = shape[:cd] + shape[cd + 1 :]
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=F64, generator=gen), cd).to(dtype)
    else:
        t = torch.randint(0, C, tshape, generator=gen)
        if ignore and t.numel() > 1:
            t.view(-1)[::3] = -100
    w = (torch.rand(C, dtype=F64, generator=gen) + 0.5).to(dtype) if weighted else None
    return x, t, w


# Shapes: batched, K-dim (N, C, d1, d2), unbatched (C,), single class; options: every branch of torch's code.
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3, 2), (5,), (4, 1)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("prob", [False, True])
def test_torch_parity_float64(backend, shape, reduction, label_smoothing, weighted, prob):
    gen = torch.Generator().manual_seed(len(shape))
    x, t, w = make_case(shape, prob, ignore=True, weighted=weighted, gen=gen)
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    ref = F.cross_entropy(x, t, **kw)
    ours = logitkit.cross_entropy(x, t, **kw)
    assert ours.dtype == F64 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **F64_PARITY, equal_nan=True)
    go = torch.rand(ref.shape, dtype=F64, generator=gen)
    torch.testing.assert_close(
        grad(lambda z: logitkit.cross_entropy(z, t, **kw), x, go),
        grad(lambda z: F.cross_entropy(z, t, **kw), x, go),
        rtol=1e-10,
        atol=1e-14,
    )


# ignore_index values: torch's default, a real class index, and a positive sentinel beyond C.
@pytest.mark.parametrize("ignore_index", [-100, 2, 7])
def test_ignore_index_values(backend, ignore_index):
    x = torch.randn(6, 5, dtype=F64)
    t = torch.tensor([0, 2, 4, 2, 1, 3])
    if ignore_index == 7:
        t[1] = 7
    for reduction in ("none", "mean", "sum"):
        kw = dict(ignore_index=ignore_index, reduction=reduction)
        torch.testing.assert_close(logitkit.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw), **F64_PARITY)


def test_headline(backend):
    x = torch.tensor([[0.0, -20.0]], requires_grad=True)
    loss = logitkit.cross_entropy(x, torch.tensor([0]))
    assert oracle.ulp_error(loss, torch.tensor(2.0611537e-09, dtype=F64), F32) <= 2
    (gx,) = torch.autograd.grad(loss, x)
    truth = oracle.cross_entropy_bwd(x, torch.tensor([0]))
    assert oracle.ulp_error(gx, truth, F32).max() <= 2
    assert abs(gx.double().sum().item()) <= 2 * oracle.ulp(truth[0, 0], F32).item()


def family_targets(x, gen):
    """Class targets for the rows of ``x``: uniform, the first row at its max (the confident row: the loss is L
    alone).  Rows with special values: on finite entries, and one deliberate -inf target (loss +inf, as torch)."""
    if not torch.isfinite(x).all():
        return oracle.cross_entropy_targets(x, gen)
    t = torch.randint(0, x.shape[1], (x.shape[0],), generator=gen)
    t[0] = x[0].double().argmax()
    return t


def families_with_targets(dtype, V, M, seed, gen):
    """(name, logits, targets) over every family, the special-value ones included."""
    for name, x in all_families(dtype, V, M, seed):
        yield name, x, family_targets(x, gen)


# Per-row losses (reduction='none') on every family and row length; half inputs give float32 losses.  Special
# values exactly: NaN for rows with NaN, +inf or only -inf; +inf for a -inf logit at the target.
@pytest.mark.parametrize("V", LENGTHS)
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_accuracy_on_families(backend, dtype, V):
    gen = torch.Generator().manual_seed(V)
    ours_err, torch_err = {}, {}
    for name, x, t in families_with_targets(dtype, V, rows_for(V), V, gen):
        truth = oracle.cross_entropy(x, t, reduction="none")
        ours = logitkit.cross_entropy(x, t, reduction="none")
        theirs = F.cross_entropy(x.float(), t, reduction="none")
        assert ours.dtype == F32
        ours_err[name] = strict_specials(oracle.ulp_error(ours, truth, F32), ours, truth).max().item()
        torch_err[name] = strict_specials(oracle.ulp_error(theirs, truth, F32), theirs, truth).max().item()
    assert not worst(ours_err, ULPS["cross_entropy"][F32]), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[F32] for k, v in torch_err.items()}), (ours_err, torch_err)


def gradient_targets(x, gen):
    """Targets for the gradient tests: the max of odd rows (the cancelling case), uniform on even rows; rows with
    special values as family_targets (a -inf target: gradient -1 there, softmax elsewhere, as torch)."""
    if not torch.isfinite(x).all():
        return oracle.cross_entropy_targets(x, gen)
    t = x.double().argmax(1)
    t[::2] = torch.randint(0, x.shape[1], t[::2].shape, generator=gen)
    return t


# Gradients per row on every family: softmax off target, -r / (1 + r) at it, in ulps of the input dtype;
# NaN rows exactly (NaN, +inf or only -inf logits), 0 at -inf logits off the target.
@pytest.mark.parametrize("V", [2, 33, 1025])  # the headline length, a short odd row, one past a power of two
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_backward_random_upstream(backend, dtype, V):
    gen = torch.Generator().manual_seed(V)
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        t = gradient_targets(x, gen)
        go = torch.rand(x.shape[0], generator=gen, dtype=F64).float()
        truth = oracle.cross_entropy_bwd(x, t, go, reduction="none")
        ours = grad(lambda z, t=t: logitkit.cross_entropy(z, t, reduction="none"), x, go)
        assert ours.dtype == dtype
        ours_err[name] = strict_specials(oracle.ulp_error(ours, truth, dtype), ours, truth, x).max().item()
        ref = grad(lambda z, t=t: F.cross_entropy(z.float(), t, reduction="none"), x, go)
        torch_err[name] = strict_specials(oracle.ulp_error(ref, truth, dtype), ref, truth, x).max().item()
    bound = ULPS["cross_entropy"].get(dtype, 1.0) * 2  # two roundings: the fp32 gradient, then the dtype
    assert not worst(ours_err, bound), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


# reduction='sum' with requires_grad: the CPU path (and the kernels) form the gradient in the forward pass.
@pytest.mark.parametrize("V", [2, 1025])
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
def test_forward_formed_gradient_on_families(backend, dtype, V):
    gen = torch.Generator().manual_seed(V + 1)
    ours_err, torch_err = {}, {}
    for name, x in all_families(dtype, V, M=rows_for(V), seed=V):
        t = gradient_targets(x, gen)
        ones = torch.ones(x.shape[0], dtype=F32)
        truth = oracle.cross_entropy_bwd(x, t, ones, reduction="none")
        # A NaN (or +inf) loss in the sum must not leak into the other rows' gradients.
        ours = grad(lambda z, t=t: logitkit.cross_entropy(z, t, reduction="sum"), x, None)
        ours_err[name] = strict_specials(oracle.ulp_error(ours, truth, dtype), ours, truth, x).max().item()
        ref = grad(lambda z, t=t: F.cross_entropy(z.float(), t, reduction="sum"), x, None)
        torch_err[name] = strict_specials(oracle.ulp_error(ref, truth, dtype), ref, truth, x).max().item()
    bound = ULPS["cross_entropy"].get(dtype, 1.0) * 2
    assert not worst(ours_err, bound), (ours_err, torch_err)
    assert not worst(ours_err, {k: v + TORCH_SLACK[dtype] for k, v in torch_err.items()}), (ours_err, torch_err)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retain_graph_scaled_upstream_and_accumulation(backend, reduction):
    """A gradient formed in forward is handed over once: a second backward recomputes it, never stale or 0."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 40, generator=gen).mul(3)
    t = torch.randint(0, 40, (64,), generator=gen)
    t[::5] = -100
    w = torch.rand(40, generator=gen).add(0.5)
    xd = x.double().requires_grad_()
    want = F.cross_entropy(xd, t, w.double(), reduction=reduction, label_smoothing=0.1)
    (gw,) = torch.autograd.grad(want, xd)
    xr = x.clone().requires_grad_()
    loss = logitkit.cross_entropy(xr, t, w, reduction=reduction, label_smoothing=0.1) * 2.5
    loss.backward(retain_graph=True)
    first = xr.grad.clone()
    loss.backward()  # accumulates a recomputed gradient into .grad
    tol = 8 * 2**-24 * gw.abs().max().item() * 2.5
    assert (first.double() - 2.5 * gw).abs().max().item() <= tol
    assert (xr.grad.double() - 5.0 * gw).abs().max().item() <= 2 * tol


# The batch reductions against the oracle: a sum over rows adds its own rounding, bounded relative.
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_reduced_losses_accuracy(backend, reduction, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 33, generator=gen).mul(4).to(dtype)
    t = torch.randint(0, 33, (512,), generator=gen)
    t[::7] = -100
    w = torch.rand(33, generator=gen).add(0.5).to(dtype)
    for kw in (dict(), dict(weight=w), dict(label_smoothing=0.1)):
        ours = logitkit.cross_entropy(x, t, reduction=reduction, **kw)
        assert ours.dtype == F32
        truth = oracle.cross_entropy(x, t, reduction=reduction, **kw)
        assert abs(ours.double() - truth) <= REDUCED_REL_EPS[F32] * 2**-23 * truth.abs(), kw


# Half inputs: float32 loss for every reduction and target kind; the gradient keeps the input dtype.
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("prob", [False, True])
def test_half_inputs_return_float32(backend, dtype, reduction, prob):
    gen = torch.Generator().manual_seed(0)
    x, t, _ = make_case((4, 5), prob, ignore=False, weighted=False, gen=gen, dtype=dtype)
    x.requires_grad_()
    loss = logitkit.cross_entropy(x, t, reduction=reduction)
    assert loss.dtype == F32
    loss.sum().backward()
    assert x.grad.dtype == dtype
    truth = oracle.cross_entropy(x, t, reduction=reduction)
    torch.testing.assert_close(loss.double(), truth, rtol=8 * 2**-23, atol=0)


def test_all_ignored(backend):
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    mean = logitkit.cross_entropy(x, t)
    assert math.isnan(mean.item())
    (g,) = torch.autograd.grad(mean, x)
    assert torch.equal(g, torch.zeros_like(g))
    s = logitkit.cross_entropy(x, t, reduction="sum")
    assert s.item() == 0.0
    (g,) = torch.autograd.grad(s, x)
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(logitkit.cross_entropy(x, t, reduction="none"), torch.zeros(3))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.5])
@pytest.mark.parametrize("targets", ["weight-zero", "ignored", "mixed"])
def test_mean_over_zero_total_weight_as_torch(backend, label_smoothing, targets):
    # torch's mean reduces the target and smoothing terms apart: with a zero total weight its target term is
    # 0 / 0, so the loss is NaN (and the counted rows' gradients NaN), never the smoothing term's B / 0 = inf
    x0 = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3], [1.0, 0.0, -3.0]])
    w = torch.tensor([0.0, 1.0, 2.0])
    t = {"weight-zero": [0, 0, 0], "ignored": [1, 1, 1], "mixed": [0, 1, 0]}[targets]
    t = torch.tensor(t)
    got, want = [], []
    for fn, acc in ((logitkit.cross_entropy, got), (F.cross_entropy, want)):
        x = x0.clone().requires_grad_()
        loss = fn(x, t, w, ignore_index=1, label_smoothing=label_smoothing)
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, x)  # the second backward recomputes
        acc.append((loss.detach(), g1, g2))
    (loss, g1, g2), (tloss, tg, _) = got[0], want[0]
    assert math.isnan(loss.item()) and math.isnan(tloss.item())
    for g in (g1, g2):
        assert torch.equal(g.isnan(), tg.isnan())
        torch.testing.assert_close(g.nan_to_num(), tg.nan_to_num(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "none"}, {"reduction": "sum", "label_smoothing": 0.2},
                                    {"weight": torch.tensor([0.5, 2.0, 1.0, 3.0])}])
def test_unbatched_input_takes_a_one_element_target(backend, kwargs):
    # torch accepts a (1,) target for a (C,) input (its forward; its backward then fails on the shapes): the
    # same 0-d loss as the 0-d target, with the gradient of that one row
    x0 = torch.tensor([0.3, -1.2, 2.5, 0.0])
    losses, grads = [], []
    for t in (torch.tensor([2]), torch.tensor(2)):
        x = x0.clone().requires_grad_()
        loss = logitkit.cross_entropy(x, t, **kwargs)
        (g,) = torch.autograd.grad(loss, x)
        losses.append(loss.detach())
        grads.append(g)
    assert losses[0].shape == () and torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    if "label_smoothing" not in kwargs:  # torch's forward fails to broadcast its smoothing term there
        want = F.cross_entropy(x0, torch.tensor([2]), **kwargs)
        torch.testing.assert_close(losses[0], want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="target of shape"):
        logitkit.cross_entropy(x0, torch.tensor([2, 1]), **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # gradient formed in forward; recomputed
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_nan_weight_of_an_untargeted_class_stays_out_without_smoothing(backend, reduction, z_loss):
    # without smoothing only the targets' weights enter the loss (torch: finite loss and gradients); with it,
    # every class weight does, and the loss is NaN as torch's
    x0 = torch.randn(4, 5, dtype=F64)
    t = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 2.0, 0.5, math.nan, 1.0], dtype=F64)
    x = x0.clone().requires_grad_()
    loss = logitkit.cross_entropy(x, t, w, reduction=reduction, z_loss=z_loss)
    (g,) = torch.autograd.grad(loss.sum(), x)
    xr = x0.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, w, reduction="none") + z_loss * torch.logsumexp(xr, 1) ** 2
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / w[t].sum()}[reduction]
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-15)
    assert torch.isnan(logitkit.cross_entropy(x0, t, w, reduction="sum", label_smoothing=0.1))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])  # gradient formed in forward; recomputed
def test_ignored_rows_with_special_logits_and_strided_arguments(backend, reduction):
    """Ignored rows get loss 0 and gradient 0, but NaN where their softmax is NaN (a NaN, a +inf, all -inf),
    as torch's 0 * softmax; a strided weight / target view is read as the values it shows."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 5, dtype=F64, generator=gen).float()
    x[1, 2], x[2, 0], x[3] = math.inf, math.nan, -math.inf
    x[4, 1] = -math.inf  # a -inf entry in an otherwise finite ignored row: its gradient stays 0
    t = torch.tensor([0, -100, -100, -100, -100, 3])  # rows 1 to 4 (the special ones) ignored
    t_view = torch.stack([t, torch.zeros_like(t)], 1)[:, 0]  # the same targets, stride 2
    w_view = (torch.rand(10, generator=gen) + 0.5)[::2]
    got, want = [], []
    for fn, out in ((logitkit.cross_entropy, got), (F.cross_entropy, want)):
        xr = x.clone().requires_grad_()
        loss = fn(xr, t_view, weight=w_view, reduction=reduction, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, xr, torch.ones_like(loss))
        out.extend([loss.detach(), g])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin)
        assert (a[fin].double() - b[fin].double()).abs().max() <= 1e-6 * b[fin].abs().max().double().clamp_min(1)
    assert torch.equal(got[1][4], torch.zeros(5))


def test_empty_batch(backend):
    x = torch.randn(0, 4, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert math.isnan(logitkit.cross_entropy(x, t).item())
    assert logitkit.cross_entropy(x, t, reduction="sum").item() == 0.0
    none = logitkit.cross_entropy(x, t, reduction="none")
    assert none.shape == (0,)
    none.sum().backward()
    assert x.grad.shape == (0, 4)


def test_minus_inf_logit_at_target(backend):
    x = torch.tensor([[0.0, -math.inf, 1.0]])
    assert logitkit.cross_entropy(x, torch.tensor([1])).item() == math.inf
    assert logitkit.cross_entropy(x, torch.tensor([2])).item() == pytest.approx(
        F.cross_entropy(x, torch.tensor([2])).item(), rel=1e-6
    )


# torch's legacy pairs: each maps to one reduction and warns.
@pytest.mark.parametrize(
    "size_average,reduce,expected",
    [(True, None, "mean"), (False, None, "sum"), (None, False, "none"), (False, True, "sum")],
)
def test_legacy_size_average_reduce(backend, size_average, reduce, expected):
    x = torch.randn(4, 5, dtype=F64)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.warns((UserWarning, DeprecationWarning), match="size_average|reduce"):
        ours = logitkit.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(ours, ref, **F64_PARITY)
    torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction=expected), **F64_PARITY)


# The class dim of a K-dim input (N, C, d1, d2) is a strided reduction; a transposed (C, N).t() and an
# every-other-column view are others.  Each gives the bits of the contiguous (rows, C) case, losses and
# gradients, on rows with special values too (layout_rows; targets as family_targets).
@pytest.mark.parametrize("dtype", [F16, F32])
def test_kdim_and_layouts_bit_for_bit(backend, dtype):
    C = 7
    rows = layout_rows(dtype, C, seed=4)  # (24, C)
    t = oracle.cross_entropy_targets(rows, torch.Generator().manual_seed(4))
    t[1] = -100  # an ignored row
    g = torch.rand(24, generator=torch.Generator().manual_seed(5))

    def loss_and_grad(z, tz, gz):
        zr = z.detach().requires_grad_()
        loss = logitkit.cross_entropy(zr, tz, reduction="none")
        (gx,) = torch.autograd.grad(loss, zr, gz)
        return loss.detach(), gx

    ref, ref_g = loss_and_grad(rows, t, g)
    kdim = rows.view(2, 3, 4, C).movedim(-1, 1)  # (N, C, d1, d2), non-contiguous
    for xk in (kdim, kdim.contiguous()):
        loss, gk = loss_and_grad(xk, t.view(2, 3, 4), g.view(2, 3, 4))
        assert same_bits(loss, ref.view(2, 3, 4)) and same_bits(gk, ref_g.view(2, 3, 4, C).movedim(-1, 1))
    tr = rows.t().contiguous().t()  # (24, C) with the class dim at stride 24
    loss, gt = loss_and_grad(tr, t, g)
    assert same_bits(loss, ref) and same_bits(gt, ref_g)
    wide = torch.full((24, 2 * C), math.nan, dtype=dtype)  # NaN between the entries: a stride bug shows
    strided = wide[:, ::2]
    strided.copy_(rows)
    loss, gs = loss_and_grad(strided, t, g)
    assert same_bits(loss, ref) and same_bits(gs, ref_g)
    for red in ("mean", "sum"):
        assert same_bits(
            logitkit.cross_entropy(kdim, t.view(2, 3, 4), reduction=red), logitkit.cross_entropy(rows, t, reduction=red)
        ), red


# gradcheck over the target kinds and the options that change the gradient formula.
@pytest.mark.parametrize(
    "prob,weighted,label_smoothing,reduction",
    [
        (False, False, 0.0, "mean"),
        (False, True, 0.2, "mean"),
        (False, True, 0.0, "none"),
        (True, True, 0.1, "sum"),
    ],
)
def test_gradcheck(backend, prob, weighted, label_smoothing, reduction):
    gen = torch.Generator().manual_seed(3)
    x, t, w = make_case((4, 5), prob, ignore=not prob, weighted=weighted, gen=gen)
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: logitkit.cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=label_smoothing), (x,)
    )


def test_extensions_keyword_only_and_defaults(backend):
    x = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    base = logitkit.cross_entropy(x, t)
    assert torch.equal(logitkit.cross_entropy(x, t, z_loss=0.0, softcap=None), base)
    assert torch.equal(logitkit.cross_entropy(x, t, None, None, -100, None, "mean", 0.0), base)
    with pytest.raises(TypeError):
        logitkit.cross_entropy(x, t, None, None, -100, None, "mean", 0.0, 0.1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-40, 40, width=32), min_size=2, max_size=30), st.data())
def test_property_gradient_sums_to_zero(row, data):
    x = torch.tensor([row], dtype=F32)
    t = torch.tensor([data.draw(st.integers(0, len(row) - 1))])
    g = grad(lambda z: logitkit.cross_entropy(z, t), x, torch.tensor(1.0))
    # exact-sum test in float64 of the float32 gradient: within a few ulps of its largest entry
    assert abs(g.double().sum().item()) <= 4 * len(row) * 2**-24 * g.abs().max().item()
    assert oracle.ulp_error(g, oracle.cross_entropy_bwd(x, t), F32).max() <= 2 * ULPS["cross_entropy"][F32]


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_logits_changed_in_place_after_a_reduced_loss(backend, kind):
    """As torch (its log_softmax saves its output): with reduction 'mean'/'sum' the gradient is formed in the
    forward pass, so changing the logits in place before backward neither fails nor changes the gradient.
    reduction='none' recomputes from the saved logits: there autograd's version check raises instead."""
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 6, 2]) if kind == "index" else torch.softmax(torch.randn(4, 7, dtype=torch.float64), 1)
    want = torch.autograd.grad(F.cross_entropy(x * 2.0, t, reduction="sum"), x)[0]
    for dtype in ((torch.float32,) if backend == "triton" else (torch.float32, torch.float64)):  # fp64: reference
        xd = x.detach().to(dtype).requires_grad_()
        y = xd * 2.0
        loss = logitkit.cross_entropy(y, t.to(dtype) if kind == "prob" else t, reduction="sum")
        y.add_(100.0)
        (g,) = torch.autograd.grad(loss, xd)
        assert torch.allclose(g.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
    y = x * 2.0
    loss = logitkit.cross_entropy(y, t, reduction="none").sum()
    y.add_(100.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
