"""linear_cross_entropy against the unfused float64 graph: values, all gradients, every option, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import logitkit as lk

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


class _Options:
    """Stands in for torch.nn.LinearCrossEntropyOptions (absent before torch 2.13)."""

    def __init__(self, batch_chunk_size):
        self.batch_chunk_size = batch_chunk_size
        self.acc_policy = "auto"
        self.acc_dtype = None


def _reference(x, W, t, b=None, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None):
    """The unfused graph in float64: logits, optional softcap, torch's cross_entropy, plus z_loss."""
    logits = F.linear(x.double(), W.double(), None if b is None else b.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    w = None if weight is None else weight.double()
    if t.dtype.is_floating_point:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.double().reshape(-1, logits.shape[-1]),
                               w, reduction="none", label_smoothing=label_smoothing)
        valid = torch.ones_like(loss, dtype=torch.bool)
        wt = torch.ones_like(loss)
    else:
        tf = t.reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tf, w, ignore_index=ignore_index,
                               reduction="none", label_smoothing=label_smoothing)
        valid = tf != ignore_index
        ts = torch.where(valid, tf, 0)
        wt = (w[ts] if w is not None else torch.ones_like(loss)) * valid
    if z_loss:
        lse = torch.logsumexp(logits.reshape(-1, logits.shape[-1]), -1)
        loss = loss + torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss.reshape(t.shape if not t.dtype.is_floating_point else t.shape[:-1])
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / wt.sum()


def _grads(fn, tensors, g):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts)
    gs = torch.autograd.grad(out, ts, g(out))
    return out.detach(), gs


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def _make(M, D, V, dtype, seed=0, lead=None, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*(lead or (M,)), D, generator=g, dtype=F64) / math.sqrt(D)).to(dtype)
    W = torch.randn(V, D, generator=g, dtype=F64).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    t = torch.randint(0, V, tuple(lead or (M,)), generator=g)
    return x, W, b, t


# Options one at a time and together: each changes the loss or the gradient formula.
OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weight": "rand"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"ignore": True},
    {"weight": "rand", "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0, "ignore": True, "bias": True},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("chunk", [None, 5])  # one chunk, and many chunks with a ragged last one
def test_float64_values_and_gradients(opts, chunk):
    M, D, V = 23, 13, 37  # D not a multiple of 16, V not a multiple of the chunk
    x, W, b, t = _make(M, D, V, F64, bias=opts.get("bias", False))
    if opts.get("ignore"):
        t[::3] = -100
    kw = {k: v for k, v in opts.items() if k not in ("ignore", "bias", "weight")}
    weight = torch.rand(V, dtype=F64) + 0.1 if opts.get("weight") else None
    options = _Options(chunk) if chunk else None
    tensors = [x, W] + ([b] if b is not None else [])

    def ours(x, W, b=None):
        return lk.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, options=options, **kw)

    def ref(x, W, b=None):
        return _reference(x, W, t, b, weight=weight, **kw)

    def up(out):
        return torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)

    lo, go = _grads(ours, tensors, up)
    lr, gr = _grads(ref, tensors, up)
    assert lo.shape == lr.shape
    assert _rel(lo, lr) < 1e-13
    for a, r in zip(go, gr):
        assert _rel(a, r) < 1e-12


@pytest.mark.parametrize("dtype", [F32, BF16])  # the training dtypes; fp16 behaves like bf16 here
def test_low_precision_not_worse_than_torch(dtype):
    M, D, V = 64, 32, 257
    x, W, _, t = _make(M, D, V, dtype, seed=1)
    truth = _reference(x, W, t)
    ours = lk.linear_cross_entropy(x, W, t)
    theirs = F.cross_entropy(F.linear(x, W), t)
    assert ours.dtype == F32  # fp32 losses for half inputs (NUMERICS.md deviation)
    err_ours = abs(ours.double() - truth).item()
    err_torch = abs(theirs.double() - truth).item()
    assert err_ours <= err_torch + 4 * torch.finfo(F32).eps * abs(truth.item())
    # gradients: compare with the float64 graph, relative to the largest entry, within the dtype's rounding
    gx, gW = torch.autograd.grad(lk.linear_cross_entropy(x.requires_grad_(), W.requires_grad_(), t), (x, W))
    rx, rW = torch.autograd.grad(_reference(x, W, t), (x, W))
    tx, tW = torch.autograd.grad(F.cross_entropy(F.linear(x, W), t), (x, W))
    assert gx.dtype == dtype and gW.dtype == dtype
    for a, r, b in ((gx, rx, tx), (gW, rW, tW)):
        assert _rel(a, r) <= _rel(b, r) + 2 * torch.finfo(dtype).eps


def test_probability_targets():
    M, D, V = 11, 9, 17
    x, W, b, _ = _make(M, D, V, F64, bias=True)
    p = torch.softmax(torch.randn(M, V, dtype=F64), -1)
    for red in ("mean", "sum", "none"):
        for eps in (0.0, 0.3):
            lo, go = _grads(lambda x, W, b: lk.linear_cross_entropy(x, W, p, linear_bias=b, reduction=red,
                                                                    label_smoothing=eps), [x, W, b], torch.ones_like)
            lr, gr = _grads(lambda x, W, b: _reference(x, W, p, b, reduction=red, label_smoothing=eps), [x, W, b],
                            torch.ones_like)
            assert _rel(lo, lr) < 1e-13
            for a, r in zip(go, gr):
                assert _rel(a, r) < 1e-12


def test_all_ignored_is_nan_mean_zero_sum_and_zero_gradients():
    x, W, _, t = _make(6, 5, 7, F64)
    t[:] = -100
    xr, Wr = x.requires_grad_(), W.requires_grad_()
    loss = lk.linear_cross_entropy(xr, Wr, t)
    assert torch.isnan(loss)  # torch: 0/0 for an all-ignored mean
    gx, gW = torch.autograd.grad(loss, (xr, Wr))
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gW) == 0
    s = lk.linear_cross_entropy(xr, Wr, t, reduction="sum")
    assert s.item() == 0.0


def test_single_token_and_three_d_input():
    x, W, _, t = _make(1, 8, 5, F64)
    assert _rel(lk.linear_cross_entropy(x, W, t), _reference(x, W, t)) < 1e-14
    x3, W3, _, t3 = _make(0, 8, 5, F64, lead=(2, 3))
    out = lk.linear_cross_entropy(x3, W3, t3, reduction="none")
    assert out.shape == (2, 3)
    ref = _reference(x3.reshape(6, 8), W3, t3.reshape(6), reduction="none").reshape(2, 3)
    assert _rel(out, ref) < 1e-14


def test_sum_with_external_divisor_accumulates_like_one_batch():
    """Gradient accumulation: two micro-batches with reduction='sum' / N equal one mean over the batch."""
    x, W, _, t = _make(20, 6, 9, F64)
    Wr = W.clone().requires_grad_()
    for half in (slice(0, 10), slice(10, 20)):
        (lk.linear_cross_entropy(x[half], Wr, t[half], reduction="sum") / 20).backward()
    (ref,) = torch.autograd.grad(_reference(x, W.requires_grad_(), t), (W,))
    assert _rel(Wr.grad, ref) < 1e-13


def test_retain_graph_backward_twice_gives_the_same_gradient():
    x, W, _, t = _make(9, 4, 6, F64)
    xr = x.requires_grad_()
    loss = lk.linear_cross_entropy(xr, W, t)
    (g1,) = torch.autograd.grad(loss, xr, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, xr)
    # the second backward recomputes (the first consumed the gradient formed in forward): same to rounding
    assert _rel(g2, g1) < 1e-14


def test_double_backward_is_refused_not_silently_wrong():
    x, W, _, t = _make(4, 3, 5, F64)
    xr = x.requires_grad_()
    loss = lk.linear_cross_entropy(xr, W, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xr, create_graph=True)


def test_stats_sibling_returns_lse_and_entropy():
    x, W, b, t = _make(7, 5, 11, F64, bias=True)
    s = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=b, reduction="none")
    logits = F.linear(x, W, b)
    assert _rel(s.lse, torch.logsumexp(logits, -1)) < 1e-14
    p = torch.softmax(logits, -1)
    assert _rel(s.entropy, -(p * torch.log_softmax(logits, -1)).sum(-1)) < 1e-13
    assert _rel(s.loss, _reference(x, W, t, b, reduction="none")) < 1e-14


@pytest.mark.parametrize(
    "bad, exc, match",
    [  # each argument that can be wrong, once
        ({"target": "oob"}, IndexError, "target"),
        ({"target": "shape"}, ValueError, "target"),
        ({"W": "D"}, ValueError, "linear_weight"),
        ({"weight": "len"}, ValueError, "weight"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"bias": "shape"}, ValueError, "linear_bias"),
        ({"prob_ignore": True}, ValueError, "ignore_index"),
    ],
)
def test_bad_input(bad, exc, match):
    x, W, _, t = _make(4, 3, 5, F64)
    kw = {}
    if bad.get("target") == "oob":
        t = t.clone()
        t[0] = 5
    if bad.get("target") == "shape":
        t = t[:3]
    if bad.get("W") == "D":
        W = torch.randn(5, 4, dtype=F64)
    if bad.get("weight"):
        kw["weight"] = torch.ones(4, dtype=F64)
    if "reduction" in bad:
        kw["reduction"] = bad["reduction"]
    if "label_smoothing" in bad:
        kw["label_smoothing"] = bad["label_smoothing"]
    if bad.get("bias"):
        kw["linear_bias"] = torch.ones(4, dtype=F64)
    if bad.get("prob_ignore"):
        t = torch.softmax(torch.randn(4, 5, dtype=F64), -1)
        kw["ignore_index"] = 0
    with pytest.raises(exc, match=match):
        lk.linear_cross_entropy(x, W, t, **kw)


@pytest.mark.skipif(not hasattr(torch.nn, "LinearCrossEntropyLoss"), reason="torch < 2.13 has no reference module")
def test_module_matches_torch_module():
    torch.manual_seed(3)
    ours = lk.nn.LinearCrossEntropyLoss(12, 40, bias=True, label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(12, 40, bias=True, label_smoothing=0.1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(9, 12)
    t = torch.randint(0, 40, (9,))
    a, b = ours(x, t), theirs(x, t)
    assert abs(a.item() - b.item()) <= 8 * torch.finfo(F32).eps * abs(b.item())


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no F.linear_cross_entropy")
def test_signature_matches_torch():
    import inspect

    ours = inspect.signature(lk.linear_cross_entropy).parameters
    theirs = inspect.signature(F.linear_cross_entropy).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        assert ours[name].default == p.default, name
    assert list(ours)[: len(theirs)] == list(theirs)


def _triton_runs() -> bool:
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("dtype", [F32, BF16])  # the kernel's two precision regimes (TwoSum fp32, widened half)
@pytest.mark.parametrize("red", ["mean", "sum", "none"])  # fused-in-forward (mean/sum) and recompute (none)
def test_fused_kernel_path_against_float64(dtype, red):
    """use_backend('triton'): the chunk's loss and gradient come from the fused cross-entropy kernel."""
    M, D, V = 13, 9, 37  # V not a multiple of any block; several chunks below
    x, W, b, t = _make(M, D, V, dtype, seed=5, bias=True)
    t[::4] = -100
    weight = torch.rand(V, dtype=F64).to(F32) + 0.1
    kw = dict(reduction=red, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    tensors = [x, W, b]

    def ours(x, W, b):
        with lk.use_backend("triton"):
            return lk.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, options=_Options(5), **kw)

    def ref(x, W, b):
        return _reference(x, W, t, b, weight=weight, **kw)

    def up(out):
        return torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)

    lo, go = _grads(ours, tensors, up)
    lr, gr = _grads(ref, tensors, up)
    assert lo.dtype == F32
    # the loss of the logits as the GEMM rounds them to the input dtype (the unfused graph's logits too)
    logits = F.linear(x, W, b).double()
    capped = kw["softcap"] * torch.tanh(logits / kw["softcap"])
    ce = F.cross_entropy(capped, t, weight.double(), reduction="none", label_smoothing=kw["label_smoothing"])
    valid = t != -100
    ce = ce + torch.where(valid, kw["z_loss"] * torch.logsumexp(capped, -1) ** 2, 0.0)
    wt = (weight.double()[torch.where(valid, t, 0)] * valid).sum()
    expect = {"none": ce, "sum": ce.sum(), "mean": ce.sum() / wt}[red]
    assert _rel(lo, expect) < 8 * torch.finfo(F32).eps
    for a, r in zip(go, gr):
        assert a.dtype == dtype
        # gradients are rounded once to the input dtype (and the logits themselves were rounded to it)
        assert _rel(a, r) < 8 * torch.finfo(dtype).eps


@pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
def test_fused_kernel_path_all_ignored_and_stats():
    x, W, _, t = _make(6, 5, 11, F32)
    with lk.use_backend("triton"):
        s = lk.linear_cross_entropy_with_stats(x, W, t, reduction="none")
        logits = F.linear(x.double(), W.double())
        assert _rel(s.lse, torch.logsumexp(logits, -1)) < 8 * torch.finfo(F32).eps
        p = torch.softmax(logits, -1)
        assert _rel(s.entropy, -(p * torch.log_softmax(logits, -1)).sum(-1)) < 16 * torch.finfo(F32).eps
        t2 = torch.full_like(t, -100)
        xr = x.clone().requires_grad_()
        loss = lk.linear_cross_entropy(xr, W, t2)
        assert torch.isnan(loss)
        (g,) = torch.autograd.grad(loss, xr)
        assert torch.count_nonzero(g) == 0
