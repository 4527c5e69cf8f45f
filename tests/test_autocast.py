"""Under torch.autocast the ops give torch's dtypes: linear_cross_entropy runs its classifier as autocast runs
F.linear (float32 master weights with half hidden states work, as torch's unfused graph); on a GPU softmax and
log_softmax run with dtype=float32 and logsumexp on the float32 cast (torch's fp32 lists there); the CPU's
lists leave those three in the input dtype."""

import pytest
import torch
import torch.nn.functional as F

import logitkit
from logitkit import _config

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
CUDA = torch.cuda.is_available()


def _case(seed=0, M=6, D=8, V=11):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g).to(BF16)
    W = torch.randn(V, D, generator=g) / D**0.5  # float32 master weight
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (M,), generator=g)
    t[1] = -100
    return h, W, b, t


def _grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_() for t in ts]
    out = fn(*ts)
    return out.detach(), torch.autograd.grad(out, ts)


@pytest.mark.parametrize("strategy", ["token_chunks", "vocab_blocks"])
@pytest.mark.parametrize("hidden", [BF16, F32])  # half hidden states, or float32 ones (e.g. a float32 norm)
def test_linear_cross_entropy_casts_as_autocast_linear(strategy, hidden):
    h, W, b, t = _case()
    h = h.to(hidden)
    with torch.autocast("cpu", dtype=BF16):
        loss, (gh, gW, gb) = _grads(
            lambda h, W, b: logitkit.linear_cross_entropy(h, W, t, linear_bias=b, strategy=strategy), h, W, b)
    assert loss.dtype == F32 and gh.dtype == hidden and gW.dtype == F32 and gb.dtype == F32
    # the oracle: the bf16-rounded operands, everything after them in float64
    ref, (rh, rW, rb) = _grads(
        lambda h, W, b: F.cross_entropy(F.linear(h, W, b), t),
        h.to(BF16).double(), W.to(BF16).double(), b.to(BF16).double())
    # the logits are rounded to bf16 (as autocast's F.linear returns them): a bf16-sized error, no more
    assert abs(loss.item() - ref.item()) <= 2**-7 * abs(ref.item())
    for got, want in ((gh, rh), (gW, rW), (gb, rb)):
        assert (got.double() - want).abs().max() <= 2**-6 * want.abs().max()
    with torch.autocast("cpu", dtype=BF16):  # the same values as torch's own graph under autocast
        tl = F.linear_cross_entropy(h, W, t, linear_bias=b) if hasattr(F, "linear_cross_entropy") else None
    if tl is not None:
        assert abs(loss.item() - tl.item()) <= 2**-7 * abs(tl.item())


def test_linear_cross_entropy_mixed_dtypes_need_autocast():
    h, W, _, t = _case()
    with pytest.raises(TypeError, match="linear_weight dtype"):
        logitkit.linear_cross_entropy(h, W, t)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        with pytest.raises(TypeError, match="linear_weight dtype"):
            logitkit.linear_cross_entropy(h, W, t)
    with torch.autocast("cpu", dtype=BF16):  # float64 is never cast by autocast: still a mismatch
        with pytest.raises(TypeError, match="linear_weight dtype"):
            logitkit.linear_cross_entropy(h, W.double(), t)


def test_module_under_autocast():
    h, _, _, t = _case()
    m = logitkit.nn.LinearCrossEntropyLoss(8, 11)
    with torch.autocast("cpu", dtype=BF16):
        loss = m(h, t)
    loss.backward()
    assert loss.dtype == F32 and m.linear.weight.grad.dtype == F32
    assert torch.isfinite(m.linear.weight.grad).all()


def test_linear_cross_entropy_compiles_under_autocast():
    h, W, b, t = _case()

    def fn(h, W, b):
        with torch.autocast("cpu", dtype=BF16):
            return logitkit.linear_cross_entropy(h, W, t, linear_bias=b)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, gg = _grads(compiled, h, W, b)
    want, gw = _grads(fn, h, W, b)
    assert torch.equal(got, want)
    for a, r in zip(gg, gw, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_cpu_autocast_leaves_softmax_family_in_the_input_dtype():
    x = torch.randn(3, 7).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        for ours, theirs in ((logitkit.softmax(x, -1), F.softmax(x, -1)),
                             (logitkit.log_softmax(x, -1), F.log_softmax(x, -1)),
                             (logitkit.logsumexp(x, -1), torch.logsumexp(x, -1))):
            assert ours.dtype == theirs.dtype == BF16


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp"])
def test_gpu_autocast_rule_runs_in_float32(monkeypatch, op):
    # CPU stand-in for the GPU rule (autocast on the device, a half input): the result and its gradient are
    # those of the op on the float32 cast, as torch's fp32 lists give there; an explicit dtype= wins.
    monkeypatch.setattr(_config, "_AUTOCAST_FP32_DEVICES", ("cpu",))
    fn = {"softmax": lambda x, **k: logitkit.softmax(x, -1, **k),
          "log_softmax": lambda x, **k: logitkit.log_softmax(x, -1, **k),
          "logsumexp": lambda x, **k: logitkit.logsumexp(x, -1)}[op]
    x = torch.randn(4, 9).to(BF16)
    g = torch.randn(4, 9 if op != "logsumexp" else 1).squeeze(-1)
    with torch.autocast("cpu", dtype=BF16):
        y, (gx,) = _grads(lambda x: (fn(x) * g).sum(), x)
        out = fn(x)
        if op != "logsumexp":
            assert fn(x, dtype=BF16).dtype == BF16
    assert out.dtype == F32 and gx.dtype == BF16
    with torch.autocast("cpu", enabled=False):
        ref = fn(x.float())
        ry, (rgx,) = _grads(lambda x: (fn(x.float()) * g).sum(), x)
    assert torch.equal(out, ref) and torch.equal(y, ry) and torch.equal(gx, rgx)
    with torch.autocast("cpu", enabled=False):  # autocast off: the input dtype, as always
        assert fn(x).dtype == BF16


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "logsumexp", "cross_entropy"])
def test_cuda_autocast_dtypes_as_torch(op):
    x = torch.randn(5, 33, device="cuda").to(BF16)
    t = torch.randint(0, 33, (5,), device="cuda")
    ours = {"softmax": lambda: logitkit.softmax(x, -1), "log_softmax": lambda: logitkit.log_softmax(x, -1),
            "logsumexp": lambda: logitkit.logsumexp(x, -1), "cross_entropy": lambda: logitkit.cross_entropy(x, t)}
    theirs = {"softmax": lambda: F.softmax(x, -1), "log_softmax": lambda: F.log_softmax(x, -1),
              "logsumexp": lambda: torch.logsumexp(x, -1), "cross_entropy": lambda: F.cross_entropy(x, t)}
    with torch.autocast("cuda", dtype=BF16):
        a, b = ours[op](), theirs[op]()
    assert a.dtype == b.dtype == F32
    x = x.float()  # outside autocast: the same op on the float32 cast gives the same values
    if op == "cross_entropy":  # (not cast under autocast: its loss is float32 anyway, from another kernel)
        torch.testing.assert_close(a, ours[op](), rtol=4 * 2**-24, atol=0)
    else:
        assert torch.equal(a, ours[op]())
