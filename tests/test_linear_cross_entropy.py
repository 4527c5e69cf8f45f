"""linear_cross_entropy against the unfused float64 graph: values, all gradients, every option, edge cases,
for both strategies (token chunks; vocab blocks), their automatic choice and their memory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import logitkit as lk

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# Every test that runs the op takes both strategies: they share the API and must give the same results.
STRATEGIES = ["token_chunks", "vocab_blocks"]


def _triton_runs() -> bool:
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "default")
# one chunk / vocab block; many chunks with a ragged last one (vocab blocks of 5 * 37 // 23 = 8 classes, 37 = 4 * 8 + 5)
@pytest.mark.parametrize("chunk", [None, 5])
def test_float64_values_and_gradients(opts, chunk, strategy):
    M, D, V = 23, 13, 37  # D not a multiple of 16, V not a multiple of the chunk or the vocab block
    x, W, b, t = _make(M, D, V, F64, bias=opts.get("bias", False))
    if opts.get("ignore"):
        t[::3] = -100
    kw = {k: v for k, v in opts.items() if k not in ("ignore", "bias", "weight")}
    weight = torch.rand(V, dtype=F64) + 0.1 if opts.get("weight") else None
    options = _Options(chunk) if chunk else None
    tensors = [x, W] + ([b] if b is not None else [])

    def ours(x, W, b=None):
        return lk.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, options=options, strategy=strategy,
                                       **kw)

    def ref(x, W, b=None):
        return _reference(x, W, t, b, weight=weight, **kw)

    def up(out):
        return torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)

    lo, go = _grads(ours, tensors, up)
    lr, gr = _grads(ref, tensors, up)
    assert lo.shape == lr.shape
    assert _rel(lo, lr) < 1e-13
    for a, r in zip(go, gr, strict=True):
        assert _rel(a, r) < 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [F32, BF16])  # the training dtypes; fp16 behaves like bf16 here
def test_low_precision_not_worse_than_torch(dtype, strategy):
    M, D, V = 64, 32, 257
    x, W, _, t = _make(M, D, V, dtype, seed=1)
    truth = _reference(x, W, t)
    options = _Options(7)  # many chunks / vocab blocks (7 * 257 // 64 = 28 classes, ragged last block)
    ours = lk.linear_cross_entropy(x, W, t, options=options, strategy=strategy)
    theirs = F.cross_entropy(F.linear(x, W), t)
    assert ours.dtype == F32  # fp32 losses for half inputs (NUMERICS.md deviation)
    err_ours = abs(ours.double() - truth).item()
    err_torch = abs(theirs.double() - truth).item()
    assert err_ours <= err_torch + 4 * torch.finfo(F32).eps * abs(truth.item())
    # gradients: compare with the float64 graph, relative to the largest entry, within the dtype's rounding
    gx, gW = torch.autograd.grad(
        lk.linear_cross_entropy(x.requires_grad_(), W.requires_grad_(), t, options=options, strategy=strategy), (x, W)
    )
    rx, rW = torch.autograd.grad(_reference(x, W, t), (x, W))
    tx, tW = torch.autograd.grad(F.cross_entropy(F.linear(x, W), t), (x, W))
    assert gx.dtype == dtype and gW.dtype == dtype
    for a, r, b in ((gx, rx, tx), (gW, rW, tW)):
        assert _rel(a, r) <= _rel(b, r) + 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_probability_targets(strategy):
    M, D, V = 11, 9, 17
    x, W, b, _ = _make(M, D, V, F64, bias=True)
    p = torch.softmax(torch.randn(M, V, dtype=F64), -1)
    weight = torch.rand(V, dtype=F64) + 0.1
    for red, eps, w, z, cap, chunk in (("mean", 0.0, None, 0.0, None, None), ("sum", 0.3, None, 0.0, None, 3),
                                       ("none", 0.0, None, 0.0, None, 3), ("mean", 0.3, weight, 1e-2, 4.0, 3)):
        kw = dict(reduction=red, label_smoothing=eps, weight=w, z_loss=z, softcap=cap)
        options = _Options(chunk) if chunk else None

        def ours(x, W, b, kw=kw, options=options):
            return lk.linear_cross_entropy(x, W, p, linear_bias=b, strategy=strategy, options=options, **kw)

        def ref(x, W, b, kw=kw):
            return _reference(x, W, p, b, **kw)

        lo, go = _grads(ours, [x, W, b], torch.ones_like)
        lr, gr = _grads(ref, [x, W, b], torch.ones_like)
        assert _rel(lo, lr) < 1e-13
        for a, r in zip(go, gr, strict=True):
            assert _rel(a, r) < 1e-12


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_ignored_is_nan_mean_zero_sum_and_zero_gradients(strategy):
    x, W, b, t = _make(6, 5, 7, F64, bias=True)
    t[:] = -100
    xr, Wr, br = x.requires_grad_(), W.requires_grad_(), b.requires_grad_()
    loss = lk.linear_cross_entropy(xr, Wr, t, linear_bias=br, strategy=strategy, options=_Options(2))
    assert torch.isnan(loss)  # torch: 0/0 for an all-ignored mean
    grads = torch.autograd.grad(loss, (xr, Wr, br))
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    s = lk.linear_cross_entropy(xr, Wr, t, linear_bias=br, reduction="sum", strategy=strategy)
    assert s.item() == 0.0
    grads = torch.autograd.grad(s, (xr, Wr, br))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_token_three_d_input_and_empty_batch(strategy):
    x, W, _, t = _make(1, 8, 5, F64)
    lo, go = _grads(lambda x, W: lk.linear_cross_entropy(x, W, t, strategy=strategy), [x, W], torch.ones_like)
    lr, gr = _grads(lambda x, W: _reference(x, W, t), [x, W], torch.ones_like)
    assert _rel(lo, lr) < 1e-14
    for a, r in zip(go, gr, strict=True):
        assert _rel(a, r) < 1e-13
    x3, W3, _, t3 = _make(0, 8, 5, F64, lead=(2, 3))
    out = lk.linear_cross_entropy(x3, W3, t3, reduction="none", strategy=strategy, options=_Options(2))
    assert out.shape == (2, 3)
    ref = _reference(x3.reshape(6, 8), W3, t3.reshape(6), reduction="none").reshape(2, 3)
    assert _rel(out, ref) < 1e-14
    (gx,) = torch.autograd.grad(
        lk.linear_cross_entropy(x3.requires_grad_(), W3, t3, strategy=strategy, options=_Options(2)), (x3,)
    )
    (rx,) = torch.autograd.grad(_reference(x3, W3, t3), (x3,))
    assert gx.shape == (2, 3, 8) and _rel(gx, rx) < 1e-13
    # empty batch: sum 0 with zero gradients, mean NaN (as torch)
    x0, W0 = torch.zeros(0, 8, dtype=F64, requires_grad=True), W.clone().requires_grad_()
    s = lk.linear_cross_entropy(x0, W0, t[:0], reduction="sum", strategy=strategy)
    gx0, gW0 = torch.autograd.grad(s, (x0, W0))
    assert s.item() == 0.0 and gx0.shape == (0, 8) and torch.count_nonzero(gW0) == 0
    assert torch.isnan(lk.linear_cross_entropy(x0, W0, t[:0], strategy=strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unbatched_input_takes_a_zero_d_or_one_element_target(strategy):
    # an unbatched (D,) input: torch takes a 0-d or a (1,) target and gives a 0-d loss for both
    x, W, _, t = _make(1, 8, 5, F64)
    h = x[0]
    want = _reference(x, W, t, reduction="sum")
    for tt in (t[0], t[:1]):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss = lk.linear_cross_entropy(hh, WW, tt, reduction="none", strategy=strategy)
        gh, gW = torch.autograd.grad(loss, (hh, WW))
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        rh, rW = torch.autograd.grad(_reference(xr, Wr, t, reduction="sum"), (xr, Wr))
        assert loss.shape == () and _rel(loss, want) < 1e-14
        assert _rel(gh, rh[0]) < 1e-13 and _rel(gW, rW) < 1e-13
    if hasattr(F, "linear_cross_entropy"):
        torch.testing.assert_close(lk.linear_cross_entropy(h, W, t[:1]), F.linear_cross_entropy(h, W, t[:1]))
    with pytest.raises(ValueError, match="target of shape"):
        lk.linear_cross_entropy(h, W, t.repeat(2), strategy=strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nan_weight_of_an_untargeted_class_stays_out_without_smoothing(strategy, reduction):
    x, W, _, _ = _make(4, 8, 5, F64)
    t = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 2.0, 0.5, math.nan, 1.0], dtype=F64)
    lo, go = _grads(lambda x, W: lk.linear_cross_entropy(x, W, t, weight=w, reduction=reduction, strategy=strategy),
                    [x, W], torch.ones_like)
    lr, gr = _grads(lambda x, W: _reference(x, W, t, weight=w, reduction=reduction), [x, W], torch.ones_like)
    assert torch.isfinite(lo).all() and _rel(lo, lr) < 1e-14
    for a, r in zip(go, gr, strict=True):
        assert torch.isfinite(a).all() and _rel(a, r) < 1e-13


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sum_with_external_divisor_accumulates_like_one_batch(strategy):
    """Gradient accumulation: two micro-batches with reduction='sum' / N equal one mean over the batch."""
    x, W, _, t = _make(20, 6, 9, F64)
    Wr = W.clone().requires_grad_()
    for half in (slice(0, 10), slice(10, 20)):
        (lk.linear_cross_entropy(x[half], Wr, t[half], reduction="sum", strategy=strategy) / 20).backward()
    (ref,) = torch.autograd.grad(_reference(x, W.requires_grad_(), t), (W,))
    assert _rel(Wr.grad, ref) < 1e-13


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_retain_graph_backward_twice_gives_the_same_gradient(strategy):
    x, W, _, t = _make(9, 4, 6, F64)
    xr, Wr = x.requires_grad_(), W.requires_grad_()
    loss = lk.linear_cross_entropy(xr, Wr, t, strategy=strategy)
    g1 = torch.autograd.grad(loss, (xr, Wr), retain_graph=True)
    g2 = torch.autograd.grad(loss, (xr, Wr))
    # token chunks: the second backward recomputes (the first consumed the gradient formed in forward), same to
    # rounding; vocab blocks recompute in every backward
    for a, b in zip(g1, g2, strict=True):
        assert _rel(b, a) < 1e-14


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_double_backward_is_refused_not_silently_wrong(strategy):
    x, W, _, t = _make(4, 3, 5, F64)
    xr = x.requires_grad_()
    loss = lk.linear_cross_entropy(xr, W, t, strategy=strategy)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, xr, create_graph=True)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [None, 2])  # one block; several vocab blocks (the online entropy merge)
def test_stats_sibling_returns_lse_and_entropy(strategy, chunk):
    x, W, b, t = _make(7, 5, 11, F64, bias=True)
    options = _Options(chunk) if chunk else None
    for cap in (None, 2.0):
        s = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=b, reduction="none", softcap=cap,
                                               options=options, strategy=strategy)
        logits = F.linear(x, W, b)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        assert _rel(s.lse, torch.logsumexp(logits, -1)) < 1e-14
        p = torch.softmax(logits, -1)
        assert _rel(s.entropy, -(p * torch.log_softmax(logits, -1)).sum(-1)) < 1e-13
        assert _rel(s.loss, _reference(x, W, t, b, reduction="none", softcap=cap)) < 1e-14


def _backends() -> list[str]:
    """'reference'; 'triton' too under the interpreter (or on a GPU machine), where vocab blocks take the
    block kernels and token chunks the fused cross-entropy kernel."""
    return ["reference"] + (["triton"] if _triton_runs() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [F32, BF16])  # fp32 logits and half logits (rounded coarsely at the offset)
def test_confident_rows_keep_loss_and_target_gradient(dtype, strategy, backend):
    """Rows whose target wins by 20 to 45: loss and target gradient are about r = sum of the other p_j
    (1e-6 .. 1e-20), far below |lse| * 2**-24 at the common offset 1000. Each row's loss and logit gradient
    (read off as the bias gradient under a one-hot upstream gradient) must hold to the output's rounding
    against float64 on the same rounded logits; an fp32 lse, or second-pass logits differing from the
    first pass's, would not."""
    M, V = 12, 301
    g = torch.Generator().manual_seed(7)
    x = torch.eye(M, dtype=dtype)  # logits_i = column i of W (+ b): the margins are set exactly
    W = torch.randn(V, M, generator=g, dtype=F64)
    t = torch.randperm(V, generator=g)[:M]
    W[t, torch.arange(M)] += torch.linspace(20.0, 45.0, M, dtype=F64)
    W = W.to(dtype)
    b = torch.full((V,), 1000.0, dtype=dtype)
    logits = F.linear(x, W, b).double()  # the rounded logits both passes see
    # Oracle with the target as the strict max: r = sum_{j != t} exp(x_j - x_t) (exact differences, float64),
    # loss = log1p(r), gradient exp(x_j - x_t) / (1 + r) off target and -r / (1 + r) at it. (torch's float64
    # cross_entropy is off by |lse| 2**-53 ~ 1e-13 here, more than the smallest losses.)
    x_t = logits.gather(1, t[:, None])
    assert (logits < x_t).sum(1).eq(V - 1).all()
    e = torch.exp(logits - x_t).scatter(1, t[:, None], 0.0)
    r = e.sum(1, keepdim=True)
    ref_rows = torch.log1p(r).view(M)
    ref_grad = (e / (1.0 + r)).scatter(1, t[:, None], -r / (1.0 + r))
    tol = torch.finfo(F32).eps if dtype == F32 else torch.finfo(BF16).eps
    br = b.clone().requires_grad_()
    with lk.use_backend(backend):
        rows = lk.linear_cross_entropy(x, W, t, linear_bias=br, reduction="none", options=_Options(5),
                                       strategy=strategy)
    assert (rows.double() - ref_rows).abs().le(4 * torch.finfo(F32).eps * ref_rows).all(), (rows, ref_rows)
    for i in (0, M // 2, M - 1):
        up = torch.zeros(M, dtype=rows.dtype)
        up[i] = 1.0
        (db,) = torch.autograd.grad(rows, br, up, retain_graph=True)
        ref = ref_grad[i]
        assert -ref[t[i]] < 2e-6  # the target gradient -r / (1 + r) is tiny
        assert (db.double() - ref).abs().le(tol * ref.abs()).all(), (i, db[t[i]], ref[t[i]])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_special_values_match_the_unfused_graph(strategy):
    """-inf logits (bias -inf) drop out; a +inf logit makes its row NaN; other rows are unaffected."""
    M, D, V = 6, 4, 9
    x, W, b, t = _make(M, D, V, F64, bias=True)
    b[2] = -math.inf
    t = torch.where(t == 2, 0, t)
    out = lk.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=_Options(2), strategy=strategy)
    ref = _reference(x, W, t, b, reduction="none")
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-14
    xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
    (gW,) = torch.autograd.grad(
        lk.linear_cross_entropy(xr, Wr, t, linear_bias=b, options=_Options(2), strategy=strategy), (Wr,)
    )
    assert torch.count_nonzero(gW[2]) == 0 and torch.isfinite(gW).all()
    x2 = x.clone()
    x2[1] = math.nan
    out = lk.linear_cross_entropy(x2, W, t, linear_bias=b, reduction="none", options=_Options(2), strategy=strategy)
    assert torch.isnan(out[1]) and torch.isfinite(out[torch.arange(M) != 1]).all()
    b2 = b.clone()
    b2[5] = math.inf
    s = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=b2, reduction="none", options=_Options(2),
                                           strategy=strategy)
    assert torch.isnan(s.loss).all() and torch.isposinf(s.lse).all()


def test_vocab_blocks_row_sub_blocks_change_nothing(monkeypatch):
    """The elementwise work inside a vocab block goes in row sub-blocks on the CPU (whole blocks elsewhere):
    results must not depend on that split (a few rows per sub-block against one sub-block)."""
    from logitkit.autograd import linear_cross_entropy as lce

    M, D, V = 23, 13, 37
    x, W, b, t = _make(M, D, V, F64, bias=True, seed=4)
    t[::4] = -100
    p = torch.softmax(torch.randn(M, V, dtype=F64), -1)
    kw = dict(weight=torch.rand(V, dtype=F64) + 0.1, label_smoothing=0.2, z_loss=1e-2, softcap=3.0,
              options=_Options(5), strategy="vocab_blocks")

    def ours(x, W, b, target, reduction):
        return lk.linear_cross_entropy(x, W, target, linear_bias=b, reduction=reduction, **kw)

    runs = []
    for elems in (1 << 18, 20):  # whole blocks; 2 or 3 rows per sub-block
        monkeypatch.setattr(lce, "ROW_BLOCK_ELEMS", elems)
        out = [_grads(lambda x, W, b: ours(x, W, b, t, "none"), [x, W, b], torch.ones_like),
               _grads(lambda x, W, b: ours(x, W, b, p, "mean"), [x, W, b], torch.ones_like)]
        s = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=b, reduction="none", **kw)
        out.append((s.entropy, (s.lse,)))
        runs.append(out)
    for (la, ga), (lb, gb) in zip(runs[0], runs[1], strict=True):
        assert _rel(lb, la) < 1e-15
        for a, c in zip(ga, gb, strict=True):
            assert _rel(c, a) < 1e-14


@pytest.mark.parametrize("order", [1.0, -1.0])  # the max moves up in every vocab block; the max comes first
def test_vocab_blocks_online_merge_as_the_max_moves(order):
    """Logits sorted along the classes stress the online (max, rest) merge and the rescaled sums."""
    M, V = 9, 40  # D = 2: logits = order * 0.7 * class + a small random term
    g = torch.Generator().manual_seed(5)
    x = torch.stack([torch.ones(M, dtype=F64), torch.randn(M, generator=g, dtype=F64)], 1)
    W = torch.stack([order * 0.7 * torch.arange(V, dtype=F64), 0.1 * torch.randn(V, generator=g, dtype=F64)], 1)
    t = torch.randint(0, V, (M,), generator=g)
    weight = torch.rand(V, generator=g, dtype=F64) + 0.1
    kw = dict(weight=weight, label_smoothing=0.1, reduction="none")
    options = _Options(2)  # vocab blocks of 2 * 40 // 9 = 8 classes
    lo, go = _grads(lambda x, W: lk.linear_cross_entropy(x, W, t, options=options, strategy="vocab_blocks", **kw),
                    [x, W], torch.ones_like)
    lr, gr = _grads(lambda x, W: _reference(x, W, t, **kw), [x, W], torch.ones_like)
    assert _rel(lo, lr) < 1e-13
    for a, r in zip(go, gr, strict=True):
        assert _rel(a, r) < 1e-12
    s = lk.linear_cross_entropy_with_stats(x, W, t, options=options, strategy="vocab_blocks")
    logits = F.linear(x, W)
    assert _rel(s.lse, torch.logsumexp(logits, -1)) < 1e-14
    pr = torch.softmax(logits, -1)
    assert _rel(s.entropy, -(pr * torch.log_softmax(logits, -1)).sum(-1)) < 1e-13


def test_strategies_agree_in_half_precision():
    """Same loss to fp32 rounding and gradients within the weight dtype's rounding, many vocab blocks."""
    M, D, V = 40, 24, 301
    x, W, b, t = _make(M, D, V, BF16, seed=3, bias=True)
    t[::5] = -100
    kw = dict(linear_bias=b, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, options=_Options(4))
    res = {}
    for strategy in STRATEGIES:

        def ours(x, W, b, strategy=strategy):
            return lk.linear_cross_entropy(x, W, t, strategy=strategy, **{**kw, "linear_bias": b})

        res[strategy] = _grads(ours, [x, W, b], torch.ones_like)
    (la, ga), (lb, gb) = res["token_chunks"], res["vocab_blocks"]
    assert _rel(lb, la) < 4 * torch.finfo(F32).eps
    for a, c in zip(ga, gb, strict=True):
        assert c.dtype == BF16 and _rel(c, a) < 2 * torch.finfo(BF16).eps


def test_auto_picks_vocab_blocks_for_half_weights_that_need_a_gradient(monkeypatch):
    from logitkit.autograd import linear_cross_entropy as lce

    seen = []
    stats = lce._vocab_stats
    monkeypatch.setattr(lce, "_vocab_stats", lambda *a: seen.append(1) or stats(*a))

    def used_vocab_blocks(dtype, w_grad, grad_mode=True):
        seen.clear()
        x, W, _, t = _make(5, 4, 7, dtype)
        with torch.set_grad_enabled(grad_mode):
            lk.linear_cross_entropy(x.requires_grad_(), W.requires_grad_(w_grad), t)
        return bool(seen)

    assert used_vocab_blocks(BF16, True) and used_vocab_blocks(F16, True)
    assert not used_vocab_blocks(F32, True) and not used_vocab_blocks(F64, True)  # dW accumulates in place
    assert not used_vocab_blocks(BF16, False)  # no dW: no accumulator, the 3-GEMM path
    assert not used_vocab_blocks(BF16, True, grad_mode=False)  # inference
    assert lce.pick_strategy("token_chunks", torch.ones(2, 2, dtype=BF16, requires_grad=True)) == "token_chunks"
    m = lk.nn.LinearCrossEntropyLoss(4, 7, dtype=BF16)
    seen.clear()
    m(torch.randn(3, 4, dtype=BF16), torch.tensor([0, 1, 2])).backward()
    assert seen and m.linear.weight.grad.dtype == BF16
    seen.clear()
    lk.nn.LinearCrossEntropyLoss(4, 7, dtype=BF16, strategy="token_chunks")(
        torch.randn(3, 4, dtype=BF16), torch.tensor([0, 1, 2])
    ).backward()
    assert not seen


_MEMORY_SCRIPT = """
import gc, json, sys
import torch
from benchmarks import harness
import logitkit as lk

torch.set_num_threads(1)
harness._pin_malloc()
M, D, V = 512, 256, 4096
g = torch.Generator().manual_seed(0)
x = (torch.randn(M, D, generator=g) / 16).bfloat16().requires_grad_()
W = (torch.randn(V, D, generator=g) / 16).bfloat16().requires_grad_()
t = torch.randint(0, V, (M,), generator=g)


class Options:
    batch_chunk_size, acc_policy, acc_dtype = 8, "auto", None


out = {}
for strategy in sys.argv[1:]:
    def step():
        x.grad = W.grad = None
        lk.linear_cross_entropy(x, W, t, options=Options, strategy=strategy).backward()

    step()  # warm-up: the gradients now exist and count as "inputs and their gradients"
    gc.collect()
    before = harness._reset_peak_rss()
    step()
    out[strategy] = harness._status_bytes("VmHWM") - before
print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_vocab_blocks_need_no_fp32_weight_gradient_buffer():
    """bf16 W (V=4096, D=256, M=512): peak extra memory of forward+backward beyond the inputs and their
    gradients, measured as the benchmarks do on the CPU (peak-RSS rise in a fresh process, malloc pinned so RSS
    follows live bytes). An fp32 (V, D) accumulator alone is 4 MiB: token chunks pay it, vocab blocks do not."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "src")] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "vocab_blocks", "token_chunks"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = 4096 * 256 * 4
    # token chunks: the accumulator plus the new bf16 dW while it is rounded, less the old gradients freed
    # at the start of the step (2.25 MiB): about 0.97 acc measured; the measure sees the accumulator
    assert peak["token_chunks"] > 0.75 * acc, peak
    assert peak["vocab_blocks"] < 0.5 * acc, peak  # measured ~0.2 acc: dx's fp32 buffer and one (512, 64) block


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
        ({"strategy": "vocab"}, ValueError, r"strategy must be one of \('auto', 'token_chunks', 'vocab_blocks'\)"),
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
    if "strategy" in bad:
        kw["strategy"] = bad["strategy"]
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
    # the same base class and the same repr fields first; torch's constructor checks (as ValueError)
    assert isinstance(ours, torch.nn.modules.loss._WeightedLoss)
    assert ours.extra_repr().startswith(theirs.extra_repr() + ", z_loss=0.0"), (ours.extra_repr(), theirs.extra_repr())
    with pytest.raises(ValueError, match="weight must have shape"):
        lk.nn.LinearCrossEntropyLoss(12, 40, weight=torch.ones(39))
    with pytest.raises(ValueError, match="label_smoothing"):
        lk.nn.LinearCrossEntropyLoss(12, 40, label_smoothing=1.5)
    k = lk.nn.LinearCrossEntropyLoss(12, 5, out_features=(3,))
    assert k.linear.weight.shape == (15, 12)


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


@pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("dtype", [F32, BF16])  # the kernel's two precision regimes (TwoSum fp32, widened half)
@pytest.mark.parametrize("red", ["mean", "sum", "none"])  # fused-in-forward (mean/sum) and recompute (none)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_kernel_path_against_float64(dtype, red, strategy):
    """use_backend('triton'): token chunks take the chunk's loss and gradient from the fused cross-entropy
    kernel; vocab blocks run their torch elementwise on that backend too (no kernel of theirs yet)."""
    M, D, V = 13, 9, 37  # V not a multiple of any block; several chunks below
    x, W, b, t = _make(M, D, V, dtype, seed=5, bias=True)
    t[::4] = -100
    weight = torch.rand(V, dtype=F64).to(F32) + 0.1
    kw = dict(reduction=red, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    tensors = [x, W, b]

    def ours(x, W, b):
        with lk.use_backend("triton"):
            return lk.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, options=_Options(5),
                                           strategy=strategy, **kw)

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
    for a, r in zip(go, gr, strict=True):
        assert a.dtype == dtype
        # gradients are rounded once to the input dtype (and the logits themselves were rounded to it)
        assert _rel(a, r) < 8 * torch.finfo(dtype).eps


@pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_kernel_path_all_ignored_and_stats(strategy):
    x, W, _, t = _make(6, 5, 11, F32)
    with lk.use_backend("triton"):
        s = lk.linear_cross_entropy_with_stats(x, W, t, reduction="none", strategy=strategy)
        logits = F.linear(x.double(), W.double())
        assert _rel(s.lse, torch.logsumexp(logits, -1)) < 8 * torch.finfo(F32).eps
        p = torch.softmax(logits, -1)
        assert _rel(s.entropy, -(p * torch.log_softmax(logits, -1)).sum(-1)) < 16 * torch.finfo(F32).eps
        t2 = torch.full_like(t, -100)
        xr = x.clone().requires_grad_()
        loss = lk.linear_cross_entropy(xr, W, t2, strategy=strategy)
        assert torch.isnan(loss)
        (g,) = torch.autograd.grad(loss, xr)
        assert torch.count_nonzero(g) == 0


# --- The vocab-block kernels (triton/linear_cross_entropy.py) against the torch vocab-block path ----------------

_KERNEL = pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")


def _both_backends(fn):
    """fn() under the reference backend and under the triton backend (the block kernels)."""
    out = []
    for backend in ("reference", "triton"):
        with lk.use_backend(backend):
            out.append(fn())
    return out


@_KERNEL
@pytest.mark.parametrize("dtype", [F32, BF16])  # TwoSum-carried fp32 shifts; exact half shifts
@pytest.mark.parametrize("opts", OPTIONS[1:], ids=lambda o: "-".join(o))  # every option, then all at once
@pytest.mark.parametrize("block_v", [None, 4])  # a block in one tile; blocks of 3 to 4 tiles (looped, re-read)
def test_block_kernels_match_the_torch_vocab_blocks(dtype, opts, block_v):
    """Loss and lse come from the same float64 merged state on both paths (the kernel's block sums are fp32,
    rounded once per block); gradients are the fused CE kernel's fp32 formula, rounded once to the input dtype
    (the torch path forms them in float64 / fp32)."""
    from logitkit.triton import _tuning

    M, D, V = 11, 7, 41  # vocab blocks of 5 * 41 // 11 = 18 classes: 18, 18, 5 (ragged)
    x, W, b, t = _make(M, D, V, dtype, seed=9, bias=opts.get("bias", False))
    if opts.get("ignore"):
        t[::3] = -100
    kw = {k: v for k, v in opts.items() if k not in ("ignore", "bias", "weight")}
    weight = torch.rand(2 * V, dtype=F32)[::2] + 0.1 if opts.get("weight") else None  # strided on purpose
    tensors = [x, W] + ([b] if b is not None else [])

    def run():
        def f(x, W, b=None):
            return lk.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, options=_Options(5),
                                           strategy="vocab_blocks", **kw)

        lo, go = _grads(f, tensors, lambda out: torch.full_like(out, 0.75))
        st = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=b, weight=weight, options=_Options(5),
                                                strategy="vocab_blocks", **{**kw, "reduction": "none"})
        return lo, go, st

    with _tuning.force_cross_entropy(block_v) if block_v else contextlib.nullcontext():
        (lr, gr, sr), (lo, go, so) = _both_backends(run)
    assert _rel(lo, lr) < 2 * torch.finfo(F32).eps
    assert _rel(so.loss, sr.loss) < 4 * torch.finfo(F32).eps
    assert _rel(so.lse, sr.lse) < 2 * torch.finfo(F32).eps
    assert _rel(so.entropy, sr.entropy) < 8 * torch.finfo(F32).eps
    for a, c in zip(go, gr, strict=True):
        assert a.dtype == dtype and _rel(a, c) < 4 * torch.finfo(dtype).eps


@_KERNEL
@pytest.mark.parametrize("order", [1.0, -1.0])  # the max moves up in every vocab block; the max comes first
def test_block_kernels_online_merge_as_the_max_moves(order):
    """Sorted logits (fp32): every block moves the row max (or none does), the float64 merge rescales r, the
    smoothing sum S and the entropy sum E; against the float64 unfused graph."""
    M, V = 9, 40
    g = torch.Generator().manual_seed(5)
    x = torch.stack([torch.ones(M, dtype=F64), torch.randn(M, generator=g, dtype=F64)], 1).to(F32)
    W = torch.stack([order * 0.7 * torch.arange(V, dtype=F64), 0.1 * torch.randn(V, generator=g, dtype=F64)],
                    1).to(F32)
    t = torch.randint(0, V, (M,), generator=g)
    weight = torch.rand(V, generator=g, dtype=F64).to(F32) + 0.1
    kw = dict(weight=weight, label_smoothing=0.1, reduction="none")
    with lk.use_backend("triton"):
        lo, go = _grads(lambda x, W: lk.linear_cross_entropy(x, W, t, options=_Options(2), strategy="vocab_blocks",
                                                             **kw), [x, W], torch.ones_like)
        s = lk.linear_cross_entropy_with_stats(x, W, t, options=_Options(2), strategy="vocab_blocks")
    lr, gr = _grads(lambda x, W: _reference(x.double(), W.double(), t, **kw), [x, W], torch.ones_like)
    assert _rel(lo, lr) < 4 * torch.finfo(F32).eps
    for a, r in zip(go, gr, strict=True):
        assert _rel(a, r) < 8 * torch.finfo(F32).eps
    logits = F.linear(x.double(), W.double())
    assert _rel(s.lse, torch.logsumexp(logits, -1)) < 2 * torch.finfo(F32).eps
    pr = torch.softmax(logits, -1)
    assert _rel(s.entropy, -(pr * torch.log_softmax(logits, -1)).sum(-1)) < 8 * torch.finfo(F32).eps


@_KERNEL
@pytest.mark.parametrize("block_v", [None, 4])
def test_block_kernels_special_values_as_the_torch_vocab_blocks(block_v):
    """-inf classes (a whole vocab block of them, and single ones), a NaN token, a +inf class: the kernel path
    gives the torch vocab-block path's values and NaN pattern (ignored rows: zero gradient on both)."""
    from logitkit.triton import _tuning

    M, D, V = 7, 4, 29  # vocab blocks of 2 * 29 // 7 = 8 classes
    x, W, b, t = _make(M, D, V, F32, bias=True, seed=2)
    b[8:16] = -math.inf  # the second vocab block is all -inf
    b[3] = -math.inf
    t = torch.where((t >= 8) & (t < 16) | (t == 3), 0, t)
    x[4] = math.nan
    t[5] = -100
    kw = dict(label_smoothing=0.05, options=_Options(2), strategy="vocab_blocks")

    def run(bias):
        def f(x, W):
            return lk.linear_cross_entropy(x, W, t, linear_bias=bias, reduction="sum", **kw)

        rows = lk.linear_cross_entropy_with_stats(x, W, t, linear_bias=bias, reduction="none", **kw)
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(lk.linear_cross_entropy(xr, W, t, linear_bias=bias, reduction="none", **kw),
                                    xr, torch.linspace(0.5, 1.5, M))
        return rows, gx

    for bias in (b, torch.where(torch.arange(V) == 20, math.inf, b)):
        with _tuning.force_cross_entropy(block_v) if block_v else contextlib.nullcontext():
            (sr, gr), (so, go) = _both_backends(lambda bias=bias: run(bias))
        for a, c in ((so.loss, sr.loss), (so.lse, sr.lse), (so.entropy, sr.entropy), (go, gr)):
            assert torch.equal(torch.isnan(a), torch.isnan(c)) and torch.equal(torch.isinf(a), torch.isinf(c))
            fin = torch.isfinite(c)
            assert not fin.any() or _rel(a[fin], c[fin]) < 8 * torch.finfo(F32).eps
        assert torch.isnan(so.loss[4]) and so.loss[5] == 0.0 and sr.loss[5] == 0.0


@_KERNEL
def test_block_kernels_take_strided_targets():
    """A target that is a strided view (every other element) is read as the values it shows."""
    M, D, V = 6, 5, 13
    x, W, _, _ = _make(M, D, V, F32, seed=3)
    t = torch.randint(0, V, (2 * M,))[::2]
    ref = _reference(x.double(), W.double(), t.clone())
    for strategy in STRATEGIES:
        with lk.use_backend("triton"):
            out = lk.linear_cross_entropy(x, W, t, options=_Options(2), strategy=strategy)
        assert _rel(out, ref) < 4 * torch.finfo(F32).eps, strategy


# Review findings (2026-12-07): a non-finite upstream gradient propagates (the fused path used to zero it), D = 0
# works as in torch, a class weight that requires grad is refused as torch does.
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_upstream_gradient_propagates(strategy, reduction, bad):
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 23, (5,))
    loss = lk.linear_cross_entropy(x, W, t, reduction=reduction, strategy=strategy)
    gx, gW = torch.autograd.grad(loss, (x, W), torch.tensor(bad, dtype=torch.float64))
    ref = F.cross_entropy(F.linear(x, W), t, reduction=reduction)
    rx, rW = torch.autograd.grad(ref, (x, W), torch.tensor(bad, dtype=torch.float64))
    for ours, theirs in ((gx, rx), (gW, rW)):
        # non-finite wherever torch's is (an inf g: torch's sums of +-inf give NaN, the scaled fused gradient +-inf)
        assert not torch.isfinite(theirs).any() and not torch.isfinite(ours).any()
        if math.isnan(bad):
            assert ours.isnan().all()
    # the all-ignored mean keeps its zero gradients (denominator 0), as torch
    tt = torch.full((5,), -100)
    (g0,) = torch.autograd.grad(lk.linear_cross_entropy(x, W, tt, reduction=reduction, strategy=strategy), x)
    assert torch.equal(g0, torch.zeros_like(x))


def test_zero_in_features():
    x = torch.randn(5, 0, requires_grad=True)
    W = torch.randn(23, 0, requires_grad=True)
    loss = lk.linear_cross_entropy(x, W, torch.arange(5))
    assert abs(loss.item() - math.log(23)) < 1e-6
    loss.backward()
    assert x.grad.shape == (5, 0) and W.grad.shape == (23, 0)


def test_class_weight_requiring_grad_is_refused():
    w = torch.rand(23, requires_grad=True)
    with pytest.raises(ValueError, match="weight"):
        lk.linear_cross_entropy(torch.randn(5, 8), torch.randn(23, 8), torch.arange(5), weight=w)


def test_options_batch_chunk_size_checked_as_torch():
    # torch raises ValueError("batch_chunk_size must be positive int or None") on 0 / negatives; logitkit clamped
    # them to 1 before 2026-12-07. torch's own options object is accepted without a warning at its defaults.
    x, W, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_chunk_size"):
            lk.linear_cross_entropy(x, W, t, options=_Options(bad))
    want = F.cross_entropy(x.double() @ W.double().T, t)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = lk.linear_cross_entropy(x, W, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4))
        assert abs(got.item() - want.item()) <= 1e-5 * want.item()
        with pytest.warns(UserWarning, match="chunking_method"):
            lk.linear_cross_entropy(x, W, t, options=torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio"))


@pytest.mark.parametrize("strategy", ["token_chunks", "vocab_blocks"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.5])
def test_mean_over_zero_total_weight_is_nan(strategy, label_smoothing):
    # as torch's mean: a zero total target weight gives NaN, with label smoothing too (not B / 0 = inf);
    # all-ignored rows keep zero gradients
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(3, 4, generator=gen, requires_grad=True)
    W = torch.randn(3, 4, generator=gen, requires_grad=True)
    w = torch.tensor([0.0, 1.0, 2.0])
    t = torch.tensor([0, 0, 0])
    loss = lk.linear_cross_entropy(h, W, t, weight=w, label_smoothing=label_smoothing, strategy=strategy)
    ref = F.cross_entropy(h @ W.T, t, w, label_smoothing=label_smoothing)
    assert math.isnan(loss.item()) and math.isnan(ref.item())
    t = torch.tensor([1, 1, 1])
    loss = lk.linear_cross_entropy(h, W, t, weight=w, ignore_index=1, label_smoothing=label_smoothing,
                                   strategy=strategy)
    assert math.isnan(loss.item())
    gh, gW = torch.autograd.grad(loss, (h, W))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gW, torch.zeros_like(gW))


@pytest.mark.parametrize("strategy", ["token_chunks", "vocab_blocks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dynamic_shapes_compile_once_across_token_counts(monkeypatch, strategy, reduction):
    """torch.compile(dynamic=True): one graph for every token count M (as torch's F.linear_cross_entropy), with
    several token chunks / vocab blocks / row slices per call (budgets shrunk), values and gradients as the
    unfused float64 graph. The loops guard on their chunk counts only; they used to guard on M itself (a recompile
    per M)."""
    import logitkit.autograd.linear_cross_entropy as lce_mod

    monkeypatch.setattr(lce_mod, "CHUNK_ELEMS", 40)  # 5 tokens of V = 8 per chunk; vocab blocks of 40 // M classes
    monkeypatch.setattr(lce_mod, "ROW_BLOCK_ELEMS", 24)  # row slices of a few rows
    # M = 7, 8: two token chunks (the last of 2 or 3 tokens; a size-1 chunk would be specialised, as torch does
    # for every size 0 or 1), two vocab blocks (5 + 3 classes), two and one row slices: the sizes differ, the
    # counts do not (a different count is one more graph)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(h, W, t, b):
        return lk.linear_cross_entropy(h, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.05,
                                       strategy=strategy)

    torch._dynamo.reset()
    f = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for M in (7, 8):
        h = torch.randn(M, 5, dtype=torch.float64, generator=gen, requires_grad=True)
        W = torch.randn(8, 5, dtype=torch.float64, generator=gen, requires_grad=True)
        b = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
        t = torch.randint(0, 8, (M,), generator=gen)
        t[1] = -100
        y = f(h, W, t, b)
        (y.sum() if reduction == "none" else y).backward()
        h2, W2, b2 = (z.detach().requires_grad_() for z in (h, W, b))
        ref = F.cross_entropy(h2 @ W2.t() + b2, t, reduction=reduction, label_smoothing=0.05)
        (ref.sum() if reduction == "none" else ref).backward()
        assert float((y - ref).abs().max()) <= 1e-12
        for ours, theirs in ((h, h2), (W, W2), (b, b2)):
            assert float((ours.grad - theirs.grad).abs().max()) <= 1e-12
    assert len(graphs) == 1, f"{len(graphs)} graphs for 2 token counts (expected 1)"
