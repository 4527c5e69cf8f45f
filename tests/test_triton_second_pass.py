"""Order of the second pass of the looped / split kernels (_tuning.py "second-pass order"), in the interpreter.

The reverse order must walk the chunks (and, for the split regime's output launch, the programs) last first,
must change no value of the elementwise output passes (bit for bit against the forward order, which the
regime tests check against the float64 oracle), and the model must pick it only where the rows in flight
outgrow the L2.
"""

import pytest
import torch

import logitkit as lk
from _util import BF16, F32, KERNEL_MARKS

pytestmark = KERNEL_MARKS
pytest.importorskip("triton")

from logitkit.triton import _tuning  # noqa: E402
from logitkit.triton import cross_entropy as ce_kernels  # noqa: E402
from logitkit.triton import softmax as sm_kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
N = 37  # chunks of 8: four full ones and a ragged one
SOFTMAX_REGIMES = {"loop": dict(block_n=8), "split": dict(block_n=8, split=3)}  # split: segments of 16


def _grad(fn, x, g):
    xr = x.detach().clone().requires_grad_()
    y = fn(xr)
    (gx,) = torch.autograd.grad(y, xr, g(y))
    return y.detach(), gx


def _softmax_ops(mask):
    return {
        "softmax": lambda t, d: lk.softmax(t, dim=d, mask=mask),
        "log_softmax": lambda t, d: lk.log_softmax(t, dim=d, mask=mask),
        "logsumexp": lambda t, d: lk.logsumexp(t, d, mask=mask),
    }


def _same(a, b):
    """Bit for bit, NaN where NaN (NaN payloads aside)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0))


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("regime", list(SOFTMAX_REGIMES))
def test_softmax_reverse_is_bit_for_bit(regime, dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, N, 3, generator=gen) * 3).to(dtype)
    x[1, 5, 0] = float("inf")
    x[2, :, 1] = float("-inf")
    keep = torch.rand(4, N, 3, generator=gen) > 0.25
    # the middle dim (strided, with and without mask=) and the leading dim of an (N, 4, 3) copy
    cases = [(x, 1, None), (x, 1, keep), (x.movedim(1, 0).contiguous(), 0, None)]
    for xd, dim, mask in cases:
        for name, op in _softmax_ops(mask).items():
            outs = []
            for reverse in (False, True):
                gg = torch.Generator().manual_seed(5)
                with lk.use_backend("triton"), _tuning.force_softmax(regime, reverse=reverse,
                                                                     **SOFTMAX_REGIMES[regime]):
                    outs.append(_grad(lambda t, op=op, dim=dim: op(t, dim), xd.to(DEV),
                                      lambda y, gg=gg: torch.randn(y.shape, generator=gg).to(y.dtype).to(DEV)))
            (y0, g0), (y1, g1) = outs
            what = (name, dim, mask is not None)
            assert _same(y0, y1), what
            assert _same(g0, g1), what


def _record(monkeypatch, module):
    """Record the chunk starts the kernels of ``module`` compute, in the order the interpreter runs them."""
    original = module.chunk_start
    starts = []

    def recording(start, end, n0, BLOCK, REVERSE):
        out = original.fn(start, end, n0, BLOCK, REVERSE)
        handle = getattr(out, "handle", None)
        starts.append(int(handle.data.reshape(-1)[0]) if handle is not None else int(out))
        return out

    monkeypatch.setattr(module, "chunk_start", recording)
    return starts


@pytest.mark.skipif(DEV != "cpu", reason="records the interpreter's program order")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("regime", list(SOFTMAX_REGIMES))
def test_softmax_reverse_walks_the_row_backwards(monkeypatch, regime, direction):
    starts = _record(monkeypatch, sm_kernels)
    x = torch.randn(1, N)
    y = torch.softmax(x, 1)
    order = {}
    for reverse in (False, True):
        starts.clear()
        with _tuning.force_softmax(regime, reverse=reverse, **SOFTMAX_REGIMES[regime]):
            if direction == "fwd":
                sm_kernels.softmax_fwd(x, 1)
            else:
                sm_kernels.softmax_bwd(y, torch.randn(1, N), 1)
        order[reverse] = list(starts)
    # one row: the output pass visits chunks 0, 8, ..., 32; split: the programs (segments) last first as well
    assert order[False] == [0, 8, 16, 24, 32], order
    assert order[True] == [32, 24, 16, 8, 0], order


@pytest.mark.skipif(DEV != "cpu", reason="records the interpreter's program order")
def test_cross_entropy_reverse_walks_the_row_backwards(monkeypatch):
    starts = _record(monkeypatch, ce_kernels)
    x = torch.randn(2, N)
    t = torch.tensor([3, 36])
    for reverse, want in ((False, [0, 8, 16, 24, 32] * 2), (True, [32, 24, 16, 8, 0] * 2)):
        starts.clear()
        with _tuning.force_cross_entropy(8, reverse=reverse):
            ce_kernels.ce_fwd(x, t, with_grad=True)
        assert starts == want, (reverse, starts)
    starts.clear()
    with _tuning.force_cross_entropy(64, reverse=True):  # one block: no second pass to order
        ce_kernels.ce_fwd(x, t, with_grad=True)
    assert starts == []


def _close(a, b, rel):
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.masked_fill(a.isnan(), 0).double(), b.masked_fill(b.isnan(), 0).double()
    assert (a - b).abs().max() <= rel * (b.abs().max() + 1e-30), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_cross_entropy_reverse_matches_forward(dtype):
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(5, N, generator=gen) * 4).to(dtype).to(DEV)
    x[1, 7] = x[1].max() + 12  # a confident row
    x[4, 3] = float("nan")
    t = torch.tensor([0, 7, 36, -100, 20]).to(DEV)
    w = (torch.rand(N, generator=gen) + 0.5).to(DEV)
    y = torch.softmax(torch.randn(5, N, generator=gen), -1).to(DEV)
    ones = torch.ones_like
    ops = {  # name: (loss of the logits, upstream gradient, whether a second-pass sum enters the loss)
        "plain": (lambda v: lk.cross_entropy(v, t, reduction="none"), lambda v: v.new_tensor([.5, 1, 2, 1, 3]),
                  False),
        "smooth_w": (lambda v: lk.cross_entropy(v, t, w, reduction="sum", label_smoothing=0.1), ones, True),
        "z_cap": (lambda v: lk.cross_entropy(v, t, z_loss=1e-2, softcap=4.0), ones, False),
        "fused_mean": (lambda v: lk.cross_entropy(v, t), ones, False),
        "prob": (lambda v: lk.cross_entropy(v, y, reduction="none", label_smoothing=0.05), ones, True),
        "entropy": (lambda v: lk.entropy(v), ones, True),
    }
    results = {}
    for reverse in (False, True):
        with lk.use_backend("triton"), _tuning.force_cross_entropy(8, reverse=reverse):
            results[reverse] = {name: _grad(f, x, g) for name, (f, g, _) in ops.items()}
            results[reverse]["stats"] = torch.stack(lk.cross_entropy_with_stats(x, t, reduction="none",
                                                                                label_smoothing=0.1))
    for name, (_, _, summed) in ops.items():
        (l0, g0), (l1, g1) = results[False][name], results[True][name]
        # the gradient is elementwise in the second pass: bit for bit; losses from second-pass sums (label
        # smoothing, entropy) are summed in the other order: fp32 noise only
        assert _same(g0, g1), name
        if summed:
            _close(l1, l0, 2.0**-20)
        else:
            assert _same(l0, l1), name
    _close(results[True]["stats"], results[False]["stats"], 2.0**-20)


def test_model_reverses_only_past_the_l2(monkeypatch):
    """The default order on a (modelled) H100: 132 multiprocessors, 50 MiB of L2."""
    monkeypatch.setattr(_tuning, "_sm_count", lambda idx: 132)
    monkeypatch.setattr(_tuning, "_l2_bytes", lambda idx: 50 << 20)
    cuda = torch.device("cuda", 0)
    # resident programs: thread and register limits (64 registers below 16 warps for softmax, 128 for CE)
    assert _tuning.programs_per_sm(16, "cross_entropy") == 1
    assert _tuning.programs_per_sm(8, "cross_entropy") == 2
    assert _tuning.programs_per_sm(8, "softmax") == 4
    assert _tuning.programs_per_sm(4, "softmax") == 8
    assert _tuning.programs_per_sm(1, "softmax") == 32
    # cross-entropy at the table's 16384 x 16 warps: one row per multiprocessor, 132 rows in flight
    ce = _tuning.cross_entropy_reverse
    assert not ce(8192, 128256, 16384, 16, 2, cuda)  # 132 x 256 KB = 34 MB
    assert ce(4096, 262144, 16384, 16, 2, cuda)  # 132 x 512 KB = 69 MB
    assert ce(8192, 128256, 16384, 16, 4, cuda)  # fp32: 69 MB
    assert ce(8192, 128256, 8192, 8, 2, cuda)  # 8 warps: two rows per multiprocessor, 69 MB
    assert not ce(8192, 32768, 16384, 16, 4, cuda)  # 17 MB
    assert not ce(8192, 200000, 1 << 18, 16, 2, cuda)  # one block: no second pass
    assert not ce(8, 262144, 16384, 16, 4, cuda)  # 8 rows in flight: 8 MB
    with _tuning.force_cross_entropy(reverse=True):
        assert ce(8, 300, 16384, 16, 2, cuda)
    with _tuning.force_cross_entropy(reverse=False):
        assert not ce(4096, 262144, 16384, 16, 2, cuda)

    def softmax(R, n, elem, read):
        cfg = _tuning.softmax_config(R, n, elem, False, cuda)
        return cfg.regime, _tuning.softmax_reverse(cfg, R, n, read, cuda)

    # issue 3's shapes (M * N = 2**28 bf16, 2**27 fp32): loop while the rows fill the device, then split
    assert softmax(1 << 15, 1 << 13, 2, 2) == ("row", False)
    assert softmax(1 << 13, 1 << 15, 2, 2) == ("loop", False)  # 8 warps: 528 rows x 64 KB = 35 MB
    assert softmax(1 << 13, 1 << 15, 2, 4) == ("loop", True)  # backward reads y and g: 69 MB
    assert softmax(1 << 12, 1 << 15, 4, 4) == ("loop", True)  # fp32, 4 warps: 1056 rows x 128 KB
    assert softmax(1 << 11, 1 << 17, 2, 2) == ("loop", True)  # 528 rows x 256 KB = 138 MB
    assert softmax(1 << 8, 1 << 20, 2, 2) == ("split", True)  # two launches over 512 MB
    assert softmax(4, 1 << 20, 2, 2) == ("split", False)  # 8 MB: all of it stays in the L2
    with _tuning.force_softmax(reverse=True):
        assert softmax(1 << 15, 1 << 13, 2, 2) == ("row", False)  # no second pass
        assert softmax(4, 1 << 20, 2, 2) == ("split", True)
    with pytest.raises(TypeError):
        with _tuning.force_softmax(reverse=1):
            pass
    with pytest.raises(TypeError):
        with _tuning.force_cross_entropy(reverse="yes"):
            pass


def test_interpreter_keeps_the_forward_order():
    cpu = torch.device("cpu")
    assert not _tuning.second_pass_reverse(1 << 40, cpu)
    cfg = _tuning.softmax_config(2, 1 << 20, 4, False, cpu)
    assert cfg.regime == "split" and not _tuning.softmax_reverse(cfg, 2, 1 << 20, 4, cpu)
