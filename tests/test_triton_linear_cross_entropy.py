"""Triton kernels of linear cross-entropy (triton/linear_cross_entropy.py and the token-chunk op), in the
interpreter (TRITON_INTERPRET=1) or on CUDA tensors on a GPU machine.

linear_cross_entropy on the kernel path (``use_backend('triton')``, tensors on DEV) against the float64 unfused
graph for both strategies, blocks in one tile and looped (forced small with ``_tuning.force_cross_entropy``),
every option; the registered ops pass ``torch.library.opcheck``; every launch asks for the strict fp options.
test_linear_cross_entropy.py holds the CPU-tensor tests (both backends side by side).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import logitkit as lk
from _util import KERNEL_MARKS

pytestmark = KERNEL_MARKS

triton = pytest.importorskip("triton")
import logitkit._library  # noqa: E402,F401  (registers the logitkit:: ops)
from logitkit.triton import _tuning  # noqa: E402
from logitkit.triton import linear_cross_entropy as kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
M, D, V = 10, 12, 45  # D not a multiple of 16; V not a multiple of the vocab block (3 * 45 // 10 = 13 classes)


class _Options:
    def __init__(self, n):
        self.batch_chunk_size, self.acc_policy, self.acc_dtype = n, "auto", None


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=g, dtype=F64) / math.sqrt(D)).to(dtype)
    W = torch.randn(V, D, generator=g, dtype=F64).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype)
    t = torch.randint(0, V, (M,), generator=g)
    t[::4] = -100
    return x, W, b, t


def _unfused(x, W, b, t, weight, reduction, eps, z, cap):
    """float64 graph on the logits as the GEMM rounds them to the input dtype (the kernel sees those)."""
    logits = F.linear(x, W, b).double()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(logits, t, w, reduction="none", label_smoothing=eps)
    valid = t != -100
    if z:
        rows = rows + torch.where(valid, z * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    wt = (w[torch.where(valid, t, 0)] if w is not None else torch.ones_like(rows)) * valid
    return rows.sum() / wt.sum()


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", z_loss=1e-3, softcap=4.0),
    dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
]


@pytest.mark.parametrize("strategy", ["token_chunks", "vocab_blocks"])
@pytest.mark.parametrize("dtype", [BF16, F32])  # widened-half and TwoSum-fp32 regimes
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "default")
@pytest.mark.parametrize("looped", [False, True])  # blocks / chunk rows in one tile, or BLOCK_V = 4 (looped)
def test_kernel_path_against_float64(strategy, dtype, opts, looped):
    x, W, b, t = _inputs(dtype, seed=3)
    kw = {k: v for k, v in opts.items() if k != "weight"}
    weight = (torch.rand(V, dtype=F64) + 0.1).to(F32) if opts.get("weight") else None
    red = kw.get("reduction", "mean")
    want = _unfused(x, W, b, t, weight, red, kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0),
                    kw.get("softcap"))
    xd, Wd, bd = (v.to(DEV).requires_grad_() for v in (x, W, b))
    with lk.use_backend("triton"), (_tuning.force_cross_entropy(4) if looped else contextlib.nullcontext()):
        got = lk.linear_cross_entropy(xd, Wd, t.to(DEV), linear_bias=bd, strategy=strategy, options=_Options(3),
                                      weight=None if weight is None else weight.to(DEV), **kw)
        up = torch.linspace(0.5, 1.5, got.numel(), device=DEV).reshape(got.shape)
        grads = torch.autograd.grad(got, (xd, Wd, bd), up)
    assert got.dtype == F32 and _rel(got, want) < 8 * torch.finfo(F32).eps
    ref = [v.double().requires_grad_() for v in (x, W, b)]
    want2 = _unfused(*ref, t, weight, red, kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"))
    ref_grads = torch.autograd.grad(want2, ref, up.double().cpu().reshape(want2.shape))
    for g, r in zip(grads, ref_grads, strict=True):
        # rounded once to the input dtype, from logits that were rounded to it too
        assert g.dtype == dtype and _rel(g, r) < 8 * torch.finfo(dtype).eps


def test_every_launch_asks_for_unfused_non_ftz_math(monkeypatch):
    """As in test_triton_cross_entropy.py: no fma contraction, no FTZ libdevice on the GPU."""
    strict = {"enable_fp_fusion": False, "enable_reflect_ftz": False}
    seen = []
    cls = type(kernels._lce_stats_kernel.fn)  # the JITFunction under triton.heuristics
    run = cls.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording_run)
    x, W, b, t = _inputs(F32, seed=4)
    with lk.use_backend("triton"):
        xd = x.to(DEV).requires_grad_()
        loss = lk.linear_cross_entropy_with_stats(xd, W.to(DEV), t.to(DEV), label_smoothing=0.1,
                                                  strategy="vocab_blocks").loss
        loss.backward()
    assert {name for name, _ in seen} == {"_lce_stats_kernel", "_lce_grad_kernel"}
    for name, kwargs in seen:
        assert {k: kwargs.get(k) for k in strict} == strict, name


def test_library_opcheck_linear_cross_entropy():
    """The registered ops: schema (declared writes), fake implementation, dispatch."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(M, V, generator=g).to(DEV)
    t = torch.randint(0, V, (M,), generator=g).to(DEV)
    w = (torch.rand(V, generator=g) + 0.1).to(DEV)
    f64 = dict(dtype=F64, device=DEV)
    f32 = dict(dtype=F32, device=DEV)
    state = [torch.full((M,), -math.inf, **f64)] + [torch.zeros(M, **f64) for _ in range(5)]
    ops = torch.ops.logitkit
    torch.library.opcheck(ops.lce_stats_fwd_.default, (logits[:, :20].contiguous(), 0, t, *state, w, -100, 3.0))
    torch.library.opcheck(ops.lce_stats_fwd_.default, (logits[:, 20:].contiguous(), 20, t, state[0], state[1], None,
                                                       None, None, state[5], None, -100, None))
    row = [torch.zeros(M, **f32), torch.full((M,), 2.0**64, **f32), torch.full((M,), math.log(2.0), **f32),
           torch.full((M,), math.log(2.0), **f32), torch.rand(M, generator=g).to(DEV)]
    torch.library.opcheck(ops.lce_grad_bwd_.default, (logits.clone(), 0, V, t, *row, w, w.sum().reshape(1), -100,
                                                      0.1, 1e-3, 3.0))
    bufs = [torch.empty(M, **f32), torch.empty(M, **f32), torch.empty(M, **f32)]
    torch.library.opcheck(ops.ce_fwd_out_inplace.default, (logits.clone(), t, *bufs, w, -100, 0.1, 0.0, None,
                                                           torch.ones(M, **f32)))
    for name in ("lce_stats_fwd_", "lce_grad_bwd_", "ce_fwd_out_inplace"):
        schema = getattr(ops, name).default._schema
        assert any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name
