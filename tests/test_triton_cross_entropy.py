"""Triton kernels of cross-entropy, selective log-softmax and entropy, in the interpreter (TRITON_INTERPRET=1).

Every path of triton/cross_entropy.py against a float64 torch oracle: class-index and probability targets,
weight, ignore_index, reductions, label smoothing, z_loss, softcap, K-dim inputs, rows in one block and rows
looped over several blocks (forced small with ``_tuning.force_cross_entropy``), fused gradient in forward,
recompute backward ('none', retain_graph), double backward, inplace_backward, the launcher API.
Shapes are small: the interpreter runs every program in NumPy on a shared CPU.
"""

from __future__ import annotations

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
from logitkit.triton import cross_entropy as kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# The three kernel dtypes (float64 stays on the reference path).
DTYPES = [F16, BF16, F32]
# "single": V = 37 fits one block; "looped": BLOCK_V forced to 8, so 37 = 4 full blocks + a ragged one.
PATHS = ["single", "looped"]
V = 37
M = 6


def _path(path):
    return _tuning.force_cross_entropy(8) if path == "looped" else _tuning.force_cross_entropy(1 << 16)


def _grad_tol(dtype):
    # one rounding of the gradient to the output dtype, plus fp32 working-precision noise
    return {F16: 2.0**-10, BF16: 2.0**-7, F32: 2.0**-21}[dtype]


def _check_grad(got, want, dtype):
    assert got.dtype == dtype
    scale = want.abs().max().item() + 1e-30
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * _grad_tol(dtype) * scale, (err, scale)


def _check_loss(got, want):
    assert got.dtype == torch.float32
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= 1e-5 * max(scale, 1e-3), (err, scale)


def _oracle_ce(x, t, w, ii, red, eps, z, cap):
    """float64 torch composite: F.cross_entropy on capped logits + z * lse**2 on counted rows."""
    xd = x.double()
    if cap is not None:
        xd = cap * torch.tanh(xd / cap)
    wd = None if w is None else w.double()
    rows = F.cross_entropy(xd, t, weight=wd, ignore_index=ii, reduction="none", label_smoothing=eps)
    valid = t != ii
    if z:
        lse = torch.logsumexp(xd, -1)
        rows = rows + torch.where(valid, z * lse * lse, torch.zeros_like(lse))
    if red == "none":
        return rows
    if red == "sum":
        return rows.sum()
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    wt = (wd[t_safe] if wd is not None else torch.ones_like(rows)) * valid
    return rows.sum() / wt.sum()


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, V, generator=g) * 4).to(dtype)
    x[2, 5] = x[2].max() + 8  # a confident row
    t = torch.randint(0, V, (M,), generator=g)
    t[2] = 5
    t[3] = -100
    w = torch.rand(V, generator=g) + 0.5
    return x.to(DEV), t.to(DEV), w.to(DEV)


# Option sets: plain; weight with an ignored row; smoothing with weight; z_loss with softcap; everything.
OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "smooth_weight": dict(weight=True, label_smoothing=0.1),
    "z_cap": dict(z_loss=1e-3, softcap=5.0),
    "all": dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=3.0),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_targets(dtype, opt, path):
    o = OPTIONS[opt]
    x, t, w = _inputs(dtype)
    w = w if o.get("weight") else None
    kw = dict(label_smoothing=o.get("label_smoothing", 0.0))
    ext = dict(z_loss=o.get("z_loss", 0.0), softcap=o.get("softcap"))
    for red in ("mean", "sum", "none"):
        xr = x.detach().clone().requires_grad_()
        with lk.use_backend("triton"), _path(path):
            loss = lk.cross_entropy(xr, t, w, reduction=red, **kw, **ext)
        xd = x.double().requires_grad_()
        want = _oracle_ce(xd, t, w, -100, red, kw["label_smoothing"], ext["z_loss"], ext["softcap"])
        _check_loss(loss, want.detach())
        g = torch.rand(loss.shape, dtype=torch.float32, device=DEV) + 0.5
        with _path(path):
            (gx,) = torch.autograd.grad(loss, xr, g)
        (gw,) = torch.autograd.grad(want, xd, g.double())
        _check_grad(gx, gw, dtype)
        assert gx[3].abs().max() == 0  # ignored row


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prob_targets(dtype, path):
    x, _, w = _inputs(dtype, seed=1)
    y = torch.softmax(torch.randn(M, V, device=DEV), -1)
    for red, kw in (("mean", dict()), ("sum", dict(weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)),
                    ("none", dict(label_smoothing=0.05))):
        xr = x.detach().clone().requires_grad_()
        with lk.use_backend("triton"), _path(path):
            loss = lk.cross_entropy(xr, y, reduction=red, **kw)
        xd = x.double().requires_grad_()
        xc = xd if kw.get("softcap") is None else kw["softcap"] * torch.tanh(xd / kw["softcap"])
        wd = kw.get("weight")
        rows = F.cross_entropy(xc, y.double(), weight=None if wd is None else wd.double(), reduction="none",
                               label_smoothing=kw.get("label_smoothing", 0.0))
        if kw.get("z_loss"):
            rows = rows + kw["z_loss"] * torch.logsumexp(xc, -1) ** 2
        want = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[red]
        _check_loss(loss, want.detach())
        g = torch.rand(loss.shape, device=DEV) + 0.5
        with _path(path):
            (gx,) = torch.autograd.grad(loss, xr, g)
        (gw,) = torch.autograd.grad(want, xd, g.double())
        _check_grad(gx, gw, dtype)


def test_prob_target_requiring_grad_uses_reference_gradients():
    x, _, _ = _inputs(F32, seed=2)
    y = torch.softmax(torch.randn(M, V, device=DEV), -1).requires_grad_()
    xr = x.clone().requires_grad_()
    with lk.use_backend("triton"):
        loss = lk.cross_entropy(xr, y, label_smoothing=0.1)
    gx, gy = torch.autograd.grad(loss, (xr, y))
    xd, yd = x.double().requires_grad_(), y.detach().double().requires_grad_()
    want = F.cross_entropy(xd, yd, label_smoothing=0.1)
    gxw, gyw = torch.autograd.grad(want, (xd, yd))
    _check_grad(gx, gxw, F32)
    assert torch.allclose(gy.double(), gyw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax(dtype, path):
    x, _, _ = _inputs(dtype, seed=3)
    idx = torch.randint(0, V, (M, 3), device=DEV)
    idx[0, 1] = idx[0, 0]  # a repeated index sums its gradients, as scatter_add
    idx[2, 0] = 5  # the confident row's argmax: 1 - p formed as r / (1 + r)
    xr = x.clone().requires_grad_()
    with lk.use_backend("triton"), _path(path):
        out = lk.selective_log_softmax(xr, idx)
    xd = x.double().requires_grad_()
    want = torch.log_softmax(xd, -1).gather(-1, idx)
    assert out.dtype == dtype
    assert torch.allclose(out.double(), want, rtol=_grad_tol(dtype) * 2, atol=1e-12)
    g = torch.randn(out.shape, device=DEV).to(dtype)
    with _path(path):
        (gx,) = torch.autograd.grad(out, xr, g)
    (gw,) = torch.autograd.grad(want, xd, g.double())
    _check_grad(gx, gw, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy(dtype, path):
    x, _, _ = _inputs(dtype, seed=4)
    x[1, :3] = float("-inf")  # -inf logits contribute 0 (not 0 * -inf = NaN)
    xr = x.clone().requires_grad_()
    with lk.use_backend("triton"), _path(path):
        h = lk.entropy(xr)
    xd = x.double()
    p, logp = torch.softmax(xd, -1), torch.log_softmax(xd, -1)
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    want = -plogp.sum(-1)
    _check_loss(h, want)
    g = torch.randn(M, device=DEV)
    with _path(path):
        (gx,) = torch.autograd.grad(h, xr, g)
    # dH/dx = -p (log p + H), analytic in float64 (autograd of the where() composite is NaN at -inf logits)
    gw = -(plogp + p * want[:, None]) * g.double()[:, None]
    _check_grad(gx, gw, dtype)


@pytest.mark.parametrize("path", PATHS)
def test_with_stats(path):
    x, t, w = _inputs(BF16, seed=5)
    with lk.use_backend("triton"), _path(path):
        s = lk.cross_entropy_with_stats(x, t, w, softcap=6.0)
    with lk.use_backend("reference"):
        r = lk.cross_entropy_with_stats(x, t, w, softcap=6.0)
    xc = 6.0 * torch.tanh(x.double() / 6.0)
    assert s.lse.dtype == s.entropy.dtype == torch.float32 and s.lse.shape == s.entropy.shape == (M,)
    _check_loss(s.lse, torch.logsumexp(xc, -1))
    p = torch.softmax(xc, -1)
    _check_loss(s.entropy, -(p * torch.log_softmax(xc, -1)).sum(-1))
    _check_loss(s.loss, r.loss.double())
    _check_loss(s.entropy, r.entropy.double())


def test_kdim_and_noncontiguous():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, V, 3, generator=g).to(DEV)  # (N, C, d1): the class dim is not the last one
    t = torch.randint(0, V, (2, 3), generator=g).to(DEV)
    for xin in (x, x.transpose(0, 2).contiguous().transpose(0, 2)):
        xr = xin.clone().requires_grad_()
        with lk.use_backend("triton"):
            loss = lk.cross_entropy(xr, t, label_smoothing=0.1)
        loss.backward()
        xd = xin.double().requires_grad_()
        want = F.cross_entropy(xd, t, label_smoothing=0.1)
        want.backward()
        _check_loss(loss, want.detach())
        _check_grad(xr.grad, xd.grad, F32)


@pytest.mark.parametrize("path", PATHS)
def test_retain_graph_twice_and_scaled_grad_output(path):
    """The fused buffer is handed over once; the second backward recomputes (never zero or stale)."""
    x, t, w = _inputs(F32, seed=7)
    xr = x.clone().requires_grad_()
    with lk.use_backend("triton"), _path(path):
        loss = lk.cross_entropy(xr, t, w, z_loss=1e-3) * 3.0  # grad_output 3: the in-place scale runs
        loss.backward(retain_graph=True)
        first = xr.grad.clone()
        loss.backward()
    xd = x.double().requires_grad_()
    want = _oracle_ce(xd, t, w, -100, "mean", 0.0, 1e-3, None) * 3.0
    (gw,) = torch.autograd.grad(want, xd)
    _check_grad(first, gw, F32)
    _check_grad(xr.grad - first, gw, F32)


@pytest.mark.parametrize("red", ["mean", "none"])
def test_double_backward(red):
    x, t, w = _inputs(F32, seed=8)
    xr = x.clone().requires_grad_()
    with lk.use_backend("triton"):
        loss = lk.cross_entropy(xr, t, w, reduction=red, label_smoothing=0.1, softcap=5.0)
        (gx,) = torch.autograd.grad(loss.sum(), xr, create_graph=True)
        (hv,) = torch.autograd.grad((gx * gx).sum(), xr)
    xd = x.double().requires_grad_()
    want = _oracle_ce(xd, t, w, -100, red, 0.1, 0.0, 5.0)
    (gxd,) = torch.autograd.grad(want.sum(), xd, create_graph=True)
    (hvd,) = torch.autograd.grad((gxd * gxd).sum(), xd)
    _check_grad(gx.detach(), gxd.detach(), F32)
    assert torch.allclose(hv.double(), hvd, rtol=1e-4, atol=1e-6 * hvd.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_inplace_backward(dtype, path):
    x, t, _ = _inputs(dtype, seed=9)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as a matmul output would be
    with lk.use_backend("triton"), _path(path):
        loss = lk.cross_entropy(logits, t, inplace_backward=True, label_smoothing=0.1)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="inplace_backward"):
            loss.backward()
    xd = x.double().requires_grad_()
    (gw,) = torch.autograd.grad(F.cross_entropy(xd, t, label_smoothing=0.1), xd)
    _check_grad(leaf.grad, gw, dtype)
    _check_loss(loss, F.cross_entropy(x.double(), t, label_smoothing=0.1))
    assert torch.equal(logits.detach(), leaf.grad)  # the logits' storage now holds the gradient


def test_all_ignored_and_empty():
    x, t, _ = _inputs(BF16, seed=10)
    t = torch.full_like(t, -100)
    with lk.use_backend("triton"):
        xr = x.clone().requires_grad_()
        loss = lk.cross_entropy(xr, t)
        loss.backward()
        assert math.isnan(loss.item()) and torch.all(xr.grad == 0)
        xr.grad = None
        loss = lk.cross_entropy(xr, t, reduction="sum")
        loss.backward()
        assert loss.item() == 0 and torch.all(xr.grad == 0)
        e = torch.empty(0, V, device=DEV, requires_grad=True)
        le = lk.cross_entropy(e, torch.empty(0, dtype=torch.long, device=DEV), reduction="sum")
        le.backward()
        assert le.item() == 0 and e.grad.shape == (0, V)


def test_no_host_sync_in_mean(monkeypatch):
    """The mean's denominator stays on the device: no .item() / nonzero() between launch and loss."""
    x, t, w = _inputs(F32, seed=11)
    xr = x.clone().requires_grad_()
    monkeypatch.setattr(lk.functional.check, "target_range", lambda *a: None)  # the CPU-only range check

    def boom(*a, **k):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "nonzero", boom)
    with lk.use_backend("triton"):
        loss = lk.cross_entropy(xr, t, w, label_smoothing=0.1)
        loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and torch.isfinite(xr.grad).all()


def test_special_values():
    """NUMERICS.md cases: confident row exact, -inf at target, NaN / +inf rows, -inf among finite values."""
    x = torch.tensor([[0.0, -20.0, -30.0], [1.0, float("-inf"), 0.0], [float("-inf"), 1.0, 0.0],
                      [float("nan"), 1.0, 0.0], [float("inf"), 1.0, 0.0]], device=DEV)
    t = torch.tensor([0, 0, 0, 1, 1], device=DEV)
    for path in PATHS:
        xr = x.clone().requires_grad_()
        with lk.use_backend("triton"), _path(path):
            s = lk.cross_entropy_with_stats(xr, t, reduction="none")
            s.loss.sum().backward()
        truth = math.log1p(math.exp(-20.0) + math.exp(-30.0))
        assert abs(s.loss[0].item() - truth) <= 2 * 2.0**-24 * truth
        assert s.loss[2].item() == math.inf
        assert math.isnan(s.loss[3].item()) and math.isnan(s.loss[4].item())
        assert s.lse[4].item() == math.inf and math.isnan(s.lse[3].item())
        assert torch.isfinite(s.loss[1]) and xr.grad[1, 1] == 0
        # the confident row's gradient: -rest/(1+rest) at the target, sums to zero
        g0 = xr.grad[0].double()
        assert abs(g0.sum().item()) <= 1e-15 and g0[0].item() < 0


def test_out_of_range_target_and_float64():
    x, t, _ = _inputs(F32, seed=12)
    bad = t.clone()
    bad[0] = V
    with lk.use_backend("triton"):
        with pytest.raises(IndexError):
            lk.cross_entropy(x, bad)
        xd = x.double().requires_grad_()  # float64 keeps the reference path (float64 working precision)
        loss = lk.cross_entropy(xd, t)
        loss.backward()
    want = F.cross_entropy(x.double(), t)
    assert torch.allclose(loss, want, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_launcher_api(path):
    """ce_fwd_out into caller buffers: per-row grad_scale and a device denominator, gradient over the logits."""
    x, t, w = _inputs(BF16, seed=13)
    gs = torch.rand(M, device=DEV) + 0.5
    denom = torch.tensor([2.5], device=DEV)
    f32 = dict(dtype=torch.float32, device=DEV)
    loss, lse, ent = torch.empty(M, **f32), torch.empty(M, **f32), torch.empty(M, **f32)
    buf = x.clone()
    with _path(path):
        kernels.ce_fwd_out(buf, t, loss=loss, lse=lse, entropy=ent, dx=buf, weight=w, label_smoothing=0.1,
                           grad_scale=gs, denom=denom)
        st = kernels.ce_fwd(x, t, weight=w, label_smoothing=0.1)
        dx = kernels.ce_bwd(x, t, gs, weight=w, label_smoothing=0.1, denom=denom)
    xd = x.double().requires_grad_()
    want = _oracle_ce(xd, t, w, -100, "none", 0.1, 0.0, None)
    (gw,) = torch.autograd.grad(want, xd, gs.double() / 2.5)
    _check_loss(loss, want.detach())
    _check_loss(st.loss, want.detach())
    _check_loss(lse, torch.logsumexp(x.double(), -1))
    _check_grad(buf, gw, BF16)
    _check_grad(dx, gw, BF16)
    assert st.dx is None and st.entropy is None


def test_force_hook_reaches_the_looped_path():
    with _tuning.force_cross_entropy(8):
        assert kernels._block_config(V, "cpu")[0] == 8
    assert kernels._block_config(V, "cpu")[0] == 64
    with pytest.raises(ValueError):
        with _tuning.force_cross_entropy(6):
            pass


def test_every_launch_asks_for_unfused_non_ftz_math(monkeypatch):
    """No fma contraction and no FTZ libdevice on the GPU, where the interpreter cannot show them (see the test of
    the same name in test_triton_softmax.py): a loss equal to a subnormal rest sum needs log1p(r) = r."""
    from triton.backends.nvidia.compiler import CUDAOptions

    strict = {"enable_fp_fusion": False, "enable_reflect_ftz": False}
    assert set(strict) <= set(CUDAOptions.__dataclass_fields__)
    seen = []
    cls = type(kernels._selective_bwd_kernel)  # a plain jit kernel (others are wrapped by triton.heuristics)
    run = cls.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording_run)
    x, t, w = _inputs(F32, seed=5)
    idx = torch.randint(0, V, (M, 2), device=DEV)
    for path in PATHS:
        with _path(path):
            st = kernels.ce_fwd(x, t, weight=w, label_smoothing=0.1, with_grad=True)
            kernels.grad_scale_(st.dx, torch.full((1,), 2.0, device=DEV))
            kernels.ce_prob_fwd(x, torch.softmax(x.float(), 1), with_grad=True)
            out, a, r = kernels.selective_fwd(x, idx)
            kernels.selective_bwd(x, idx, torch.ones_like(out), a, r)
            h, a, r = kernels.entropy_fwd(x)
            kernels.entropy_bwd(x, torch.ones_like(h), h, a, r)
    assert {name for name, _ in seen} == {"_ce_fwd_kernel", "_ce_prob_fwd_kernel", "_grad_scale_kernel",
                                          "_selective_fwd_kernel", "_selective_bwd_kernel", "_entropy_fwd_kernel",
                                          "_entropy_bwd_kernel"}
    for name, kwargs in seen:
        assert {k: kwargs.get(k) for k in strict} == strict, name


# torch.library: every registered cross-entropy op passes opcheck (schema incl. declared mutations, fake impl,
# autograd registration, AOT dispatch), and a fullgraph compile of the public ops on the triton path captures
# the kernels as opaque nodes, forward and backward, with the same values and gradients as eager.
def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_library_opcheck_cross_entropy():
    x, t, w = _inputs(F32, seed=21)
    denom = torch.tensor([3.0], device=DEV)
    gs = torch.rand(M, device=DEV) + 0.5
    f32 = dict(dtype=torch.float32, device=DEV)
    ops = torch.ops.logitkit
    _opcheck(ops.ce_fwd.default, (x, t, w, denom, -100, 0.1, 1e-3, 5.0, True, True))
    _opcheck(ops.ce_fwd.default, (x, t, None, None, -100, 0.0, 0.0, None, False, False))
    _opcheck(ops.ce_fwd_inplace.default, (x.clone(), t, w, denom, -100, 0.1, 0.0, None, True))
    bufs = [torch.empty(M, **f32), torch.empty(M, **f32), torch.empty(M, **f32), torch.empty_like(x)]
    _opcheck(ops.ce_fwd_out.default, (x, t, *bufs, w, None, -100, 0.1, 0.0, None, gs, denom))
    _opcheck(ops.ce_fwd_out.default, (x, t, bufs[0], bufs[1], None, None, None, None, -100, 0.0, 0.0, None, None,
                                      None))
    _opcheck(ops.ce_bwd.default, (x, t, gs, w, denom, -100, 0.1, 1e-3, 5.0))
    y = torch.softmax(torch.randn(M, V, device=DEV), -1)
    _opcheck(ops.ce_prob_fwd.default, (x, y, w, denom, 0.1, 1e-3, None, True, True))
    _opcheck(ops.ce_prob_fwd_inplace.default, (x.clone(), y, None, None, 0.0, 0.0, 5.0, False))
    _opcheck(ops.ce_prob_bwd.default, (x, y, gs, w, denom, 0.1, 0.0, None))
    _opcheck(ops.grad_scale_.default, (x.clone(), torch.tensor([0.5], device=DEV)))
    idx = torch.randint(0, V, (M, 3), device=DEV)
    out, a, r = ops.selective_fwd(x, idx)
    assert out.shape == idx.shape and out.dtype == torch.float32 and a.shape == r.shape == (M,)
    _opcheck(ops.selective_fwd.default, (x, idx))
    _opcheck(ops.selective_bwd.default, (x, idx, torch.randn(M, 3, device=DEV), a, r))
    h, a, r = ops.entropy_fwd(x)
    _opcheck(ops.entropy_fwd.default, (x,))
    _opcheck(ops.entropy_bwd.default, (x, torch.randn(M, device=DEV), h, a, r))


def test_library_ops_declare_their_writes():
    """The in-place forms write what their schema says (and the functional forms leave inputs alone)."""
    x, t, _ = _inputs(F32, seed=22)
    x0 = x.clone()
    loss, lse, ent, dx = torch.ops.logitkit.ce_fwd(x, t, None, None, -100, 0.0, 0.0, None, True, False)
    assert torch.equal(x, x0) and ent.numel() == 0 and dx.shape == x.shape
    buf = x.clone()
    loss2, lse2, _ = torch.ops.logitkit.ce_fwd_inplace(buf, t, None, None, -100, 0.0, 0.0, None, False)
    assert torch.equal(buf, dx) and torch.equal(loss2, loss) and torch.equal(lse2, lse)
    torch.ops.logitkit.grad_scale_(buf, torch.tensor([2.0]))
    assert torch.equal(buf, 2 * dx)
    for name in ("ce_fwd_inplace", "ce_prob_fwd_inplace", "grad_scale_", "ce_fwd_out"):
        schema = getattr(torch.ops.logitkit, name).default._schema
        assert any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name
    for name in ("ce_fwd", "ce_bwd", "ce_prob_fwd", "ce_prob_bwd", "selective_fwd", "selective_bwd",
                 "entropy_fwd", "entropy_bwd"):
        schema = getattr(torch.ops.logitkit, name).default._schema
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name


_T_COMPILE = torch.tensor([0, 3, -100, 36, 5, 1])
# One case per kernel family, with the options that select distinct kernels (class index with an ignored row,
# mean reduction, fused gradient; probability targets; selective; entropy).
COMPILE_CASES = {
    "cross_entropy_mean": lambda x: lk.cross_entropy(x, _T_COMPILE.to(x.device)),
    "cross_entropy_prob": lambda x: lk.cross_entropy(x, torch.softmax(x.detach() * 0.5, -1)),
    "selective_log_softmax": lambda x: lk.selective_log_softmax(x, _T_COMPILE.to(x.device).clamp_min(0)[:, None]),
    "entropy": lambda x: lk.entropy(x),
}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
@pytest.mark.parametrize("path", PATHS)
def test_compile_fullgraph_triton_path(name, path):
    fn = COMPILE_CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x0 = torch.randn(M, V, device=DEV) * 3
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    with lk.use_backend("triton"), _path(path):
        out, ref = compiled(x1), fn(x2)
        assert torch.equal(out, ref)
        g = torch.rand(ref.shape, device=DEV) + 0.5
        (out * g).sum().backward()
        (ref * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


# Many blocks per row (V = 520, BLOCK_V forced to 8: 65 blocks), fp32 logits, in ulps of fp32 against the oracle.
# The rest sum is merged with compensation and the block sums (sum p d, sum w d, sum wy) are compensated, so a
# long row rounds about once: before 2026-12-07 a "dominant" row's lse was 0.8 ulp off here (7.5 at 513 blocks)
# and its entropy 2.8; sum p d is formed scaled by 2**64 (p subnormal keeps its bits), where an "underflow_edge"
# row's entropy (about 1e-36) was 4000 ulps off. Bounds: the single-block path's own errors on these rows
# (<= 0.9 ulp) plus a quarter ulp for the block merges.
@pytest.mark.parametrize("family", ["dominant", "underflow_edge", "normal_s10"])
def test_many_blocks_round_about_once(family):
    from logitkit.reference import oracle

    x = dict(oracle.input_families(F32, 520, M=2, seed=1))[family].to(DEV)
    t = oracle.cross_entropy_targets(x.cpu(), torch.Generator().manual_seed(0), neginf_row=False).to(DEV)
    probs = torch.softmax(torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                          -1).to(F32).to(DEV)
    x64 = x.cpu().double()
    truth_lse, truth_h = oracle.logsumexp(x64, -1), oracle.entropy(x64)
    with lk.use_backend("triton"), _tuning.force_cross_entropy(8):
        st = lk.cross_entropy_with_stats(x, t, reduction="none", label_smoothing=0.1)
        stp = lk.cross_entropy_with_stats(x, probs, reduction="none")
        h = lk.entropy(x)
    errs = {
        "loss": oracle.ulp_error(st.loss.cpu(), oracle.cross_entropy(x64, t.cpu(), reduction="none",
                                                                   label_smoothing=0.1), F32),
        "lse": oracle.lse_error(st.lse.cpu(), truth_lse, x64, dtype=F32),
        "entropy": oracle.ulp_error(st.entropy.cpu(), truth_h, F32),
        "prob_loss": oracle.ulp_error(stp.loss.cpu(), oracle.cross_entropy(x64, probs.cpu().double(),
                                                                         reduction="none"), F32),
        "prob_entropy": oracle.ulp_error(stp.entropy.cpu(), truth_h, F32),
        "entropy_kernel": oracle.ulp_error(h.cpu(), truth_h, F32),
    }
    errs = {k: v.max().item() for k, v in errs.items()}
    bound = {"loss": 1.5}  # label smoothing's L W - sum w d: 1.05 ulp on the single-block path too
    assert all(v <= bound.get(k, 1.15) for k, v in errs.items()), errs


# Infinities through the compensated block sums (a TwoSum of inf gives a NaN error term): a looped row with a
# whole block of -inf logits under label smoothing has loss +inf (sum w d = -inf), as the reference path.
@pytest.mark.parametrize("block_v", [4, 1 << 16])
def test_looped_sums_keep_infinities(block_v):
    x = torch.randn(4, 29, generator=torch.Generator().manual_seed(5))
    x[0, 20] = math.inf
    x[1, 3], x[1, 20] = -math.inf, math.inf
    x[1:3, 8:16] = -math.inf
    x, t = x.to(DEV), torch.tensor([0, 1, 2, 3], device=DEV)
    probs = torch.softmax(torch.randn(4, 29, generator=torch.Generator().manual_seed(6)), -1).to(DEV)
    got, want = [], []
    for tgt in (t, probs):
        with lk.use_backend("triton"), _tuning.force_cross_entropy(block_v):
            got.append(lk.cross_entropy_with_stats(x, tgt, reduction="none", label_smoothing=0.05))
        with lk.use_backend("reference"):
            want.append(lk.cross_entropy_with_stats(x.cpu(), tgt.cpu(), reduction="none", label_smoothing=0.05))
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            a = a.cpu()
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)), (a, b)
            fin = torch.isfinite(b)
            assert torch.allclose(a[fin], b[fin], rtol=1e-5), (a, b)
    assert torch.isposinf(got[0].loss[2]) and torch.isposinf(got[0].lse[0])
