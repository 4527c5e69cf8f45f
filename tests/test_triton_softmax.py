"""Triton softmax / log_softmax / logsumexp kernels in the interpreter: every regime, dtype, layout and mask=.

Runs where the kernels can run (CUDA, or TRITON_INTERPRET=1 on the CPU); shapes are small because the
interpreter executes every program in NumPy.  Regimes are forced with ``_tuning.force_softmax`` and a small
chunk, so a 37-long row already takes the looped and split paths.
"""

import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F

import logitkit
from _tolerances import GRAD_SCALED, TORCH_SLACK, ULPS
from _util import BF16, F16, F32, F64, TARGET_DTYPES
from logitkit.reference import oracle

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")
import triton  # noqa: E402

from logitkit.autograd.softmax import LogsumexpFunction, SoftmaxFunction  # noqa: E402
from logitkit.triton import _tuning  # noqa: E402
from logitkit.triton import softmax as kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Each regime with the blocks that make a 37-long row take it: one tile; 5 chunks of 8; 3 segments of 2 chunks;
# a group of 5 programs holding 8 columns each.
REGIMES = {
    "row": dict(),
    "loop": dict(block_n=8),
    "split": dict(block_n=8, split=3),
    "resident": dict(block_n=8),
}
# (shape, dim): the last dim, and a middle dim (strided reduction: stride 3, rows interleaved).
LAYOUTS = [((1, 37), 1), ((1, 37, 3), 1)]
OPS = ["softmax", "log_softmax", "logsumexp"]


def _inputs(dtype, shape, dim, seed):
    """All NUMERICS.md families of rows of length N on the reduced dim, stacked along dim 0 (one launch per op),
    with the (name, slice of dim 0) of each family."""
    N = shape[dim]
    M = math.prod(shape) // N
    lead = [s for i, s in enumerate(shape) if i != dim]
    xs, names = [], []
    for name, x in oracle.input_families(dtype, N, M=M, seed=seed):
        xs.append(x.reshape(*lead, N).movedim(-1, dim))
        names.append((name, slice(shape[0] * len(names), shape[0] * (len(names) + 1))))
    return torch.cat(xs, 0).contiguous().to(DEVICE), names


def _grad(fn, x, g):
    xr = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(xr), xr, g)
    return gx


def _fn(op, dim, mask=None):
    if op == "logsumexp":
        return lambda t: logitkit.logsumexp(t, dim, mask=mask)
    return lambda t: getattr(logitkit, op)(t, dim=dim, mask=mask)


def _torch_fn(op, dim):
    if op == "logsumexp":
        return lambda t: torch.logsumexp(t, dim)
    return lambda t: getattr(F, op)(t, dim)


def _value_error(op, ours, x, dim, dtype):
    if op == "logsumexp":
        return oracle.lse_error(ours, oracle.logsumexp(x, dim), x, dim, dtype=dtype).max().item()
    return oracle.ulp_error(ours, getattr(oracle, op)(x, dim), dtype).max().item()


def _grad_truth(op, x, g, dim):
    """(truth, condition scale) of the gradient, NUMERICS.md's metric."""
    if op == "softmax":
        return oracle.softmax_bwd(x, g, dim), oracle.softmax_bwd_scale(x, g, dim)
    ga = g.double().abs()
    p = oracle.softmax(x, dim)
    if op == "log_softmax":
        return oracle.log_softmax_bwd(x, g, dim), ga + p * ga.sum(dim, keepdim=True)
    return oracle.logsumexp_bwd(x, g, dim), p * ga.unsqueeze(dim)


def test_forced_configs_take_their_regime():
    for regime, kw in REGIMES.items():
        with _tuning.force_softmax(regime, **kw):
            for strided in (False, True):
                cfg = _tuning.softmax_config(6, 37, 4, strided, torch.device(DEVICE))
                assert cfg.regime == regime, (regime, cfg)
                if regime == "split":
                    assert cfg.split == 3 and cfg.segment == 16
                if regime == "resident":
                    assert cfg.split == 5 and cfg.segment == cfg.BLOCK_N == 8
    with pytest.raises(ValueError):
        with _tuning.force_softmax("nope"):
            pass


def test_overrides_reach_autograd_threads():
    # On CUDA, autograd runs backward on a device thread: a forced regime must reach it (a ContextVar would not).
    seen = []

    def probe():
        seen.append(_tuning.softmax_config(6, 37, 4, False, torch.device(DEVICE)).regime)
        seen.append(_tuning.cross_entropy_config(300, "cpu"))

    with _tuning.force_softmax("split", block_n=8, split=3), _tuning.force_cross_entropy(64, num_warps=2):
        worker = threading.Thread(target=probe)
        worker.start()
        worker.join()
    assert seen == ["split", (64, 2)], seen
    with _tuning.force_softmax("loop", block_n=8):
        with _tuning.force_softmax("row"):
            pass
        assert _tuning.softmax_config(6, 37, 4, False, torch.device(DEVICE)).regime == "loop"  # inner one undone
    assert _tuning.softmax_config(6, 37, 4, False, torch.device(DEVICE)).regime == "row"


# The automatic choice, without overrides (the CPU assumes 8 programs fill the device).
@pytest.mark.parametrize(
    "R, N, strided, regime",
    [
        (64, 1024, False, "row"),  # short rows: whole row in registers
        (64, 1024, True, "loop"),  # the same rows along a strided dim: 16 rows per program, chunks of 512
        (64, 40000, False, "loop"),  # long rows, enough of them
        (2, 40000, False, "split"),  # long rows, too few of them
        (1, 1, False, "row"),  # trivial row
    ],
)
def test_automatic_regime(R, N, strided, regime):
    cfg = _tuning.softmax_config(R, N, 4, strided, torch.device("cpu"))
    assert cfg.regime == regime, cfg
    assert cfg.BLOCK_N & (cfg.BLOCK_N - 1) == 0 and cfg.segment % cfg.BLOCK_N == 0 or cfg.split == 1
    if strided:
        assert (cfg.BLOCK_M, cfg.BLOCK_N) == (16, 512), cfg


# A strided row's contiguous axis is the rows: every regime takes SOFTMAX_STRIDED_MIN_ROWS neighbouring rows per
# program (full 32-byte sectors for bf16), the chunked ones by shortening the chunk, never the register tile
# (the default used to keep the 4096-long bf16 chunk and 4 rows: 8 of every 32 bytes per program and load).
@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_strided_rows_per_program(elem, device, monkeypatch):
    monkeypatch.setattr(_tuning, "target_programs", lambda dev: 132 * _tuning.SOFTMAX_PROGRAMS_PER_SM)
    tile = _tuning.SOFTMAX_ROW_TILE[elem]
    for R in (1, 16, 4096, 1 << 16):
        for N in (2, 300, 1024, 4096, 32768, 1 << 20):
            cfg = _tuning.softmax_config(R, N, elem, True, torch.device(device))
            assert cfg.BLOCK_M >= _tuning.SOFTMAX_STRIDED_MIN_ROWS, (R, N, cfg)
            assert cfg.BLOCK_M * cfg.BLOCK_N <= tile, (R, N, cfg)
            if cfg.regime != "row" and N >= tile // _tuning.SOFTMAX_STRIDED_MIN_ROWS:
                assert cfg.BLOCK_M * cfg.BLOCK_N == tile, (R, N, cfg)  # the whole register tile, 16 rows wide
            # rows Triton cannot prove contiguous and aligned: the smaller scalar tile in the chunked regimes
            scalar = _tuning.softmax_config(R, N, elem, True, torch.device(device), vector_rows=False)
            assert scalar.BLOCK_M >= _tuning.SOFTMAX_STRIDED_MIN_ROWS, (R, N, scalar)
            if scalar.regime == "row":
                assert scalar == cfg, (R, N, scalar)
            else:
                small = _tuning.SOFTMAX_STRIDED_SCALAR_TILE[elem]
                assert scalar.BLOCK_M * scalar.BLOCK_N <= small, (R, N, scalar)
                if N >= small // _tuning.SOFTMAX_STRIDED_MIN_ROWS:
                    assert scalar.BLOCK_M * scalar.BLOCK_N == small, (R, N, scalar)


# The resident regime (_tuning.py): a row group of SPLIT programs, one tile each, meets at a counter per row
# block.  In the interpreter the grid first runs arriving only, then waiting: every counter ends at 2 * SPLIT
# (SPLIT on a GPU, one launch); a row group larger than the device can hold is refused or, by default, not taken.
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_resident_barrier_counts_every_program(op, layout, monkeypatch):
    shape, dim = layout
    made = []
    real = kernels._resident_workspace
    monkeypatch.setattr(kernels, "_resident_workspace", lambda *a: made.append(real(*a)) or made[-1])
    x = (torch.randn((5,) + shape[1:], dtype=F64) * 4).to(F32).to(DEVICE)
    with logitkit.use_backend("triton"), _tuning.force_softmax("resident", block_n=8):
        cfg = _tuning.softmax_config(x.numel() // 37, 37, 4, dim != x.dim() - 1, x.device)
        xr = x.clone().requires_grad_()
        y = _fn(op, dim)(xr)
        (gx,) = torch.autograd.grad(y, xr, torch.randn_like(y))
    assert _value_error(op, y.detach(), x, dim, F32) <= ULPS[op][F32]
    launches = 1 if DEVICE == "cuda" else 2
    # softmax / log_softmax: forward and backward; logsumexp: its backward (the forward is one read anyway)
    assert len(made) == (1 if op == "logsumexp" else 2), len(made)
    for ws, cnt in made:
        assert cnt.dtype == torch.int32 and cnt.numel() == triton.cdiv(x.numel() // 37, cfg.BLOCK_M)
        assert torch.all(cnt == launches * cfg.split), cnt
        assert ws.shape == (2, x.numel() // 37, 5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's sequential programs make a group that never meets")
def test_resident_barrier_gives_up_with_nan(monkeypatch):
    # Without the arrive-first launch, program s of a row group sees s + 1 arrivals: after the poll limit the
    # first four tiles of each 37-long row (5 programs of 8) give NaN, the last one meets its group.
    import triton.language as tl

    from logitkit.triton import _lib

    monkeypatch.setattr(_lib, "GROUP_BARRIER_MAX_POLLS", tl.constexpr(3))
    monkeypatch.setattr(kernels, "_arrive_first", lambda cfg, x: False)
    x = torch.randn(2, 37, dtype=F32)
    with _tuning.force_softmax("resident", block_n=8):
        y = kernels.softmax_fwd(x, 1)
        dx = kernels.softmax_bwd(torch.softmax(x, 1), torch.randn_like(x), 1)
    for t in (y, dx):
        assert torch.isnan(t[:, :32]).all() and not torch.isnan(t[:, 32:]).any()
    assert torch.allclose(y[:, 32:].double(), torch.softmax(x.double(), 1)[:, 32:], rtol=1e-6, atol=0)


def test_resident_group_limit(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_tuning, "_sm_count", lambda idx: 132)
    with _tuning.force_softmax("resident"):
        cfg = _tuning.softmax_config(256, 1 << 20, 2, False, cuda)  # 1M bf16: 64 programs of 16384
        assert (cfg.regime, cfg.BLOCK_M, cfg.BLOCK_N, cfg.split) == ("resident", 1, 16384, 64), cfg
        cfg = _tuning.softmax_config(256, 1 << 16, 2, True, cuda)  # strided: 16 x 1024 tiles, 64 programs
        assert (cfg.regime, cfg.BLOCK_M, cfg.BLOCK_N, cfg.split) == ("resident", 16, 1024, 64), cfg
        with pytest.raises(ValueError, match="at most 66"):  # half the SMs
            _tuning.softmax_config(256, 1 << 17, 2, True, cuda)
        with pytest.raises(ValueError, match="resident"):
            _tuning.softmax_config(256, 1 << 21, 2, False, cuda)  # 128 programs
    monkeypatch.setattr(_tuning, "_sm_count", lambda idx: 64)
    with _tuning.force_softmax("resident"), pytest.raises(ValueError, match="at most 32"):
        _tuning.softmax_config(256, 1 << 20, 2, False, cuda)
    # the table's choice: never resident unless SOFTMAX_RESIDENT_AUTO; then wherever the group fits
    monkeypatch.setattr(_tuning, "_sm_count", lambda idx: 132)
    assert _tuning.softmax_config(256, 1 << 20, 2, False, cuda).regime == "split"
    monkeypatch.setattr(_tuning, "SOFTMAX_RESIDENT_AUTO", True)
    assert _tuning.softmax_config(256, 1 << 20, 2, False, cuda).regime == "resident"
    assert _tuning.softmax_config(256, 1 << 22, 2, False, cuda).regime == "split"  # too long: two reads
    assert _tuning.softmax_config(4096, 1024, 2, False, cuda).regime == "row"
    cfg = _tuning.softmax_config(64, 40000, 4, False, torch.device("cpu"))
    assert (cfg.regime, cfg.split) == ("resident", 5), cfg
    assert not _tuning.softmax_reverse(cfg, 64, 40000, 4, cuda)  # one read: no second pass to order


# The launcher's vector_rows: only 16 adjacent, 16-aligned strided rows keep the full tile; values stay exact.
@pytest.mark.parametrize("shape, dim, view, vector", [
    ((2, 600, 16), 1, None, True),   # K = 16: vector rows
    ((2, 600, 3), 1, None, False),   # K = 3: r // K changes inside a block of 16 rows
    ((600, 32), 0, "odd", False),    # rows 2 apart (a [:, ::2] view)
    ((2, 600, 16), 1, "offset", False),  # K = 16 but the base 4 bytes past a 16-byte boundary
])
def test_strided_vector_rows(shape, dim, view, vector, monkeypatch):
    seen = []
    real = _tuning.softmax_config
    monkeypatch.setattr(_tuning, "softmax_config", lambda *a, **k: seen.append(k) or real(*a, **k))
    x = (torch.randn(shape, dtype=F64) * 4).to(F32).to(DEVICE)
    if view == "odd":
        x = x[:, ::2]
    if view == "offset":
        x = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(shape)
        assert x.data_ptr() % 16 == 4
    with logitkit.use_backend("triton"):
        for op in OPS:
            ours = _fn(op, dim)(x)
            assert _value_error(op, ours, x, dim, F32) <= ULPS[op][F32], op
    assert seen and all(k["vector_rows"] is vector for k in seen), seen
    cfg = real(x.numel() // x.shape[dim], x.shape[dim], 4, True, x.device, vector_rows=vector)
    assert cfg.regime != "row" and cfg.BLOCK_M * cfg.BLOCK_N == (8192 if vector else 2048), cfg


# Values and gradients of every op in every regime, dtype and layout against the float64 oracle:
# the NUMERICS.md targets and err(ours) <= err(torch, same dtype) + slack.
@pytest.mark.parametrize("layout", LAYOUTS, ids=["last", "middle"])
@pytest.mark.parametrize("dtype", TARGET_DTYPES)
@pytest.mark.parametrize("regime", list(REGIMES))
def test_values_and_gradients(regime, dtype, layout):
    shape, dim = layout
    gen = torch.Generator().manual_seed(7)
    bad = []
    x, families = _inputs(dtype, shape, dim, seed=len(shape))
    for op in OPS:
        with logitkit.use_backend("triton"), _tuning.force_softmax(regime, **REGIMES[regime]):
            ours = _fn(op, dim)(x)
            g = torch.randn(ours.shape, generator=gen, dtype=F64).to(dtype).to(DEVICE)
            gours = _grad(_fn(op, dim), x, g)
        assert ours.dtype == dtype and gours.dtype == dtype
        theirs, gtheirs = _torch_fn(op, dim)(x), _grad(_torch_fn(op, dim), x, g)
        for name, sl in families:
            xf = x[sl].cpu()
            err = _value_error(op, ours[sl], xf, dim, dtype)
            ref = _value_error(op, theirs[sl], xf, dim, dtype)
            if not (err <= ULPS[op][dtype] and err <= ref + TORCH_SLACK[dtype]):
                bad.append((name, op, "value", err, ref))
            truth, scale = _grad_truth(op, xf, g[sl].cpu(), dim)
            gerr = oracle.scaled_error(gours[sl], truth, scale, dtype).max().item()
            gref = oracle.scaled_error(gtheirs[sl], truth, scale, dtype).max().item()
            # logsumexp: exp(x - lse) inherits |lse| u from the rounded working lse, as torch's does: no
            # absolute target in NUMERICS.md, the rule against torch only.
            bound = gref + TORCH_SLACK[dtype]
            if op != "logsumexp":
                bound = min(GRAD_SCALED[dtype], bound)
            if not gerr <= max(bound, 0.0):
                bad.append((name, op, "grad", gerr, gref))
    assert not bad, bad


# A non-last dim is a strided reduction with the same chunking: bit-for-bit the contiguous last-dim result.
@pytest.mark.parametrize("regime", list(REGIMES))
def test_layouts_bit_for_bit(regime):
    base = (torch.randn(3, 4, 37, dtype=F64) * 5).to(F32).to(DEVICE)
    with logitkit.use_backend("triton"), _tuning.force_softmax(regime, **REGIMES[regime]):
        for op in OPS:
            fn = logitkit.logsumexp if op == "logsumexp" else getattr(logitkit, op)
            ref = fn(base, -1) if op == "logsumexp" else fn(base, dim=-1)
            for dim in (0, 1):
                xd = base.movedim(-1, dim)
                got = fn(xd, dim) if op == "logsumexp" else fn(xd, dim=dim)
                want = ref if op == "logsumexp" else ref.movedim(-1, dim)
                assert torch.equal(got, want), (op, dim)
                assert torch.equal(fn(xd.contiguous(), dim) if op == "logsumexp" else fn(xd.contiguous(), dim=dim),
                                   want), (op, dim)
        strided = torch.randn(8, 74, dtype=F32, device=DEVICE)[::2, ::2]
        assert torch.equal(logitkit.softmax(strided.t(), dim=0), logitkit.softmax(strided.contiguous(), dim=1).t())


def _special_rows(dtype):
    """Rows of length 37 with the NUMERICS.md special cases, and a mask (expanded, stride 0 over the batch)."""
    # Seeded: the global generator's state depends on which tests an xdist worker ran before this one.
    x = torch.randn(7, 37, dtype=F64, generator=torch.Generator().manual_seed(5)).mul(3).to(dtype)
    x[1] = -math.inf  # all -inf
    x[2, 5] = math.inf  # +inf in the row
    x[3, 30] = math.nan  # NaN (masked out below)
    x[4, 0] = math.nan  # NaN (kept)
    x[5, ::2] = -math.inf  # -inf among finite values
    x[6, 20:] = -math.inf  # live entries only where the mask drops them: a row without mass under mask=
    keep = torch.ones(37, dtype=torch.bool)
    keep[30:] = False
    keep[1] = False
    return x.to(DEVICE), keep.to(DEVICE).expand(7, 37)


def _finite_part(a, b, what):
    """Asserts NaN where b is NaN and equality where b is +-inf or 0; returns (a, b, the other entries)."""
    a, b = a.cpu().double(), b.cpu().double()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    special = (~torch.isfinite(b) | (b == 0)) & ~torch.isnan(b)
    assert torch.equal(a[special], b[special]), what
    return a, b, torch.isfinite(b) & ~special


def _assert_same_specials_close(a, b, rel, what):
    """Specials as _finite_part, elsewhere |a - b| <= rel * max |b|."""
    a, b, finite = _finite_part(a, b, what)
    if finite.any():
        assert (a - b)[finite].abs().max() <= rel * b[finite].abs().max(), what


def _assert_same_specials_scaled(a, b, scale, dtype, what):
    """Specials as _finite_part, elsewhere NUMERICS.md's condition-scaled gradient error within GRAD_SCALED.

    Not |a - b| against max |b|: a softmax gradient y * (g - sum(g * y)) cancels, so an entry with large y
    carries y * eps * sum |g y| of rounding while max |b| may be small (that bound failed for ~5% of inputs).
    """
    a, b, finite = _finite_part(a, b, what)
    if finite.any():
        err = oracle.scaled_error(a[finite], b[finite], scale.cpu()[finite], dtype)
        assert err.max() <= GRAD_SCALED[dtype], what + (err.max().item(),)


# Special values and mask= (expanded, stride 0): values exactly as the reference path where special (NaN, inf,
# 0) and within the targets elsewhere; gradients as the float64 oracle (masked entries, rows without mass: 0).
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_specials_and_mask(regime, dtype):
    x, keep = _special_rows(dtype)
    keep = keep.clone()
    keep[6, :20] = False  # row 6: every kept entry is -inf
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(dtype).eps
    for mask in (None, keep, keep[0:1].expand(7, 37)):
        for op in OPS:
            fn = _fn(op, 1, mask)
            with logitkit.use_backend("reference"):
                want = fn(x)
            g = torch.randn(want.shape, generator=gen).to(dtype).to(DEVICE)
            with logitkit.use_backend("triton"), _tuning.force_softmax(regime, **REGIMES[regime]):
                got = fn(x)
                ggot = _grad(fn, x, g)
            m64 = None if mask is None else mask.cpu()
            xm = x.cpu() if mask is None else x.cpu().masked_fill(~m64, -math.inf)
            if op == "logsumexp":  # the reference path's convention: an all -inf row has gradient 0
                with logitkit.use_backend("reference"):
                    gwant = _grad(fn, x, g)
            else:
                gwant = getattr(oracle, op + "_bwd")(x.cpu(), g.cpu(), 1, mask=m64)
            what = (op, mask is None)
            _assert_same_specials_close(got, want, 4 * eps, what + ("value",))
            _, scale = _grad_truth(op, xm, g.cpu(), 1)
            _assert_same_specials_scaled(ggot, gwant, scale, dtype, what + ("grad",))


def test_masked_log_softmax_gradient_ignores_masked_upstream():
    # d/dx of sum(g * log_softmax(x, mask)) on the kept entries is g - p * sum(g over kept entries only):
    # the masked outputs are constants (-inf), their upstream g must not enter the sum (oracle.log_softmax_bwd).
    x = torch.randn(4, 37, dtype=F32, device=DEVICE)
    keep = torch.rand(4, 37, device=DEVICE) > 0.3
    g = torch.randn(4, 37, dtype=F32, device=DEVICE)
    for regime, kw in REGIMES.items():
        with logitkit.use_backend("triton"), _tuning.force_softmax(regime, **kw):
            got = _grad(lambda t: logitkit.log_softmax(t, dim=1, mask=keep), x, g)
        truth = oracle.log_softmax_bwd(x.cpu(), g.cpu(), 1, mask=keep.cpu())
        assert (got.cpu().double() - truth).abs().max() <= 1e-5, regime


def test_automatic_split_long_rows():
    # No override: two rows of 20000 fp32 take the split regime (chunks of 2048) on the interpreter's 8 programs.
    x = torch.randn(2, 20000, dtype=F32, device=DEVICE) * 4
    if DEVICE == "cpu":
        assert _tuning.softmax_config(2, 20000, 4, False, x.device).regime == "split"
    with logitkit.use_backend("triton"):
        for op in OPS:
            ours = _fn(op, 1)(x)
            assert _value_error(op, ours, x, 1, F32) <= ULPS[op][F32], op


def test_lengths_one_and_empty():
    with logitkit.use_backend("triton"):
        x = torch.randn(5, 1, dtype=F16, device=DEVICE)
        assert torch.equal(logitkit.softmax(x, dim=1), torch.ones_like(x))
        assert torch.equal(logitkit.log_softmax(x, dim=1), torch.zeros_like(x))
        assert torch.equal(logitkit.logsumexp(x, 1), x[:, 0])
        e = torch.randn(0, 5, device=DEVICE, requires_grad=True)
        assert logitkit.softmax(e, dim=1).shape == (0, 5)
        z = torch.randn(3, 0, device=DEVICE)
        assert torch.equal(logitkit.logsumexp(z, 1), torch.full((3,), -math.inf, device=DEVICE))


def test_float64_takes_the_reference_path():
    x = torch.randn(3, 9, dtype=F64, device=DEVICE)
    y = kernels.softmax_fwd(x, 1, log=True)
    with logitkit.use_backend("reference"):
        assert torch.equal(y, logitkit.log_softmax(x, dim=1))
    assert kernels.logsumexp_fwd(x, 1).dtype == F64


def test_out_variants_write_into_given_buffers():
    x = torch.randn(4, 37, dtype=BF16, device=DEVICE)
    out = torch.full_like(x, math.nan)
    assert kernels.softmax_fwd_out(x, 1, out=out) is out
    assert torch.equal(out, kernels.softmax_fwd(x, 1))


# The interpreter rounds every + - * on its own and its log1p keeps subnormal inputs; on the GPU that takes
# enable_fp_fusion=False (Triton 3.6-3.9 contract a * b + c into fma by default, which breaks _lib's two_prod /
# two_sum) and enable_reflect_ftz=False (libdevice's default FTZ log1p returns 0 for a subnormal rest sum).
# Neither shows in the interpreter, so check that every launch asks for both and that Triton knows the names
# (its backends drop unknown options silently).
STRICT_FP = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def _record_launches(monkeypatch, kernel):
    """(kernel name, launch kwargs) of every launch: JITFunction.run on CUDA, InterpretedFunction.run else."""
    seen = []
    cls = type(kernel)
    run = cls.run

    def recording_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", recording_run)
    return seen


def test_every_launch_asks_for_unfused_non_ftz_math(monkeypatch):
    from triton.backends.nvidia.compiler import CUDAOptions

    assert set(STRICT_FP) <= set(CUDAOptions.__dataclass_fields__)
    seen = _record_launches(monkeypatch, kernels._softmax_fwd_kernel)
    x = torch.randn(3, 37, device=DEVICE)
    for regime, blocks in REGIMES.items():
        with _tuning.force_softmax(regime, **blocks):
            y = kernels.softmax_fwd(x, 1, log=True)
            kernels.softmax_bwd(y, torch.randn_like(y), 1, log=True)
            lse = kernels.logsumexp_fwd(x, 1)
            kernels.logsumexp_bwd(x, lse, torch.ones_like(lse), 1)
    assert {name for name, _ in seen} == {"_state_kernel", "_lse_combine_kernel", "_softmax_fwd_kernel",
                                          "_softmax_bwd_kernel"}
    for name, kwargs in seen:
        assert {k: kwargs.get(k) for k in STRICT_FP} == STRICT_FP, name


# torch.library: the four ops pass opcheck (schema, fake impl, dispatch) and a fullgraph compile of the
# autograd.Functions on the triton path captures them without a graph break, forward and backward.
def test_library_opcheck():
    x = torch.randn(3, 37, device=DEVICE)
    keep = torch.rand(3, 37, device=DEVICE) > 0.2
    y = torch.ops.logitkit.softmax_fwd(x, 1, keep, False)
    lse = torch.ops.logitkit.logsumexp_fwd(x, 0, None)
    assert lse.shape == (1, 37) and lse.dtype == F32
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.logitkit.softmax_fwd.default, (x, 1, keep, False), test_utils=tests)
    torch.library.opcheck(torch.ops.logitkit.softmax_bwd.default, (y, x, 1, None, True), test_utils=tests)
    torch.library.opcheck(torch.ops.logitkit.logsumexp_fwd.default, (x, 0, keep), test_utils=tests)
    g = torch.randn(1, 37, device=DEVICE)
    torch.library.opcheck(torch.ops.logitkit.logsumexp_bwd.default, (x, lse, g, 0, None), test_utils=tests)


def test_compile_fullgraph_triton_path():
    keep = torch.rand(4, 33, device=DEVICE) > 0.3

    def f(x):
        a = SoftmaxFunction.apply(x, 1, keep, True, True).clamp_min(-30.0).sum()
        b = SoftmaxFunction.apply(x, 0, None, False, True).square().sum()
        return a + b + LogsumexpFunction.apply(x, 1, None, True).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1 = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out, ref = compiled(x1), f(x2)
    assert torch.equal(out, ref)
    out.backward()
    ref.backward()
    assert torch.equal(x1.grad, x2.grad)
