"""The oracle against mpmath and against its own definitions: if it is wrong, every other test is."""

import math
import subprocess
import sys

import mpmath
import pytest
import torch

from logitkit.reference import oracle

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def mp_log_softmax_row(row):
    """(log_softmax, softmax, lse) of a row at 300 bits, rounded to float64."""
    with mpmath.workprec(300):
        a = mpmath.mpf(max(row))
        lg = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v) - a) for v in row))
        lse = a + lg
        ls = [(mpmath.mpf(v) - a) - lg for v in row]
        return [float(v) for v in ls], [float(mpmath.exp(v)) for v in ls], float(lse)


# Every family and a short/odd/long row: the float64 rest-sum path must agree with 300-bit mpmath.
@pytest.mark.parametrize("V", [1, 2, 7, 33, 1025])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_float64_path_matches_mpmath(dtype, V):
    for name, x in oracle.input_families(dtype, V, M=2, seed=V):
        ls = oracle.log_softmax(x, 1)
        sm = oracle.softmax(x, 1)
        for i in range(x.shape[0]):
            ref_ls, ref_sm, lse = mp_log_softmax_row([float(v) for v in x[i].double()])
            # a few float64 ulps (exp's rounding, one division), far below any fp32 ulp
            assert oracle.ulp_error(ls[i], torch.tensor(ref_ls, dtype=F64), F64).max() <= 8, name
            assert oracle.ulp_error(sm[i], torch.tensor(ref_sm, dtype=F64), F64).max() <= 8, name
            lse_err = oracle.lse_error(oracle.logsumexp(x[i], 0), torch.tensor(lse, dtype=F64), x[i], 0, dtype=F64)
            assert lse_err <= 8, name


def test_exact_mode_resolves_lse_near_zero():
    # x = log p: lse is ~1e-8 in float32; exact=True must give it to float64 precision.
    p = torch.softmax(torch.randn(3, 33, dtype=F64, generator=torch.Generator().manual_seed(1)), 1)
    x = p.log().float()
    exact = oracle.logsumexp(x, 1, exact=True)
    for i in range(3):
        _, _, lse = mp_log_softmax_row([float(v) for v in x[i].double()])
        assert exact[i].item() == pytest.approx(lse, rel=1e-15, abs=0)
    # and the float64 path agrees to the mixed metric in float32 terms
    assert oracle.lse_error(oracle.logsumexp(x, 1), exact, x, 1, dtype=F32).max() <= 0.01


def test_exact_mode_softmax_and_log_softmax():
    x = torch.tensor([[0.0, -20.0, 3.5], [1.0, 1.0, 1.0]])
    assert torch.equal(oracle.softmax(x, 1, exact=True), oracle.softmax(x, 1)) or (
        oracle.ulp_error(oracle.softmax(x, 1, exact=True), oracle.softmax(x, 1), F64).max() <= 4
    )
    assert oracle.ulp_error(oracle.log_softmax(x, 1, exact=True), oracle.log_softmax(x, 1), F64).max() <= 4


def test_headline_truth():
    x = torch.tensor([0.0, -20.0])
    truth = -math.log1p(math.exp(-20.0))
    assert oracle.log_softmax(x, 0)[0].item() == pytest.approx(truth, rel=1e-15)
    ce = oracle.cross_entropy(x[None], torch.tensor([0]))
    assert ce.item() == pytest.approx(-truth, rel=1e-15)
    g = oracle.cross_entropy_bwd(x[None], torch.tensor([0]))
    assert g[0, 1].item() == pytest.approx(math.exp(-20.0) / (1 + math.exp(-20.0)), rel=1e-15)
    assert abs(g.sum().item()) <= 1e-16 * abs(g[0, 1].item())


# Each function against torch's float64 implementation on ordinary inputs (where torch's float64 is accurate).
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_oracle_matches_torch_float64(dim):
    gen = torch.Generator().manual_seed(dim + 5)
    x = torch.randn(6, 9, dtype=F64, generator=gen)
    g = torch.randn(6, 9, dtype=F64, generator=gen)
    torch.testing.assert_close(oracle.softmax(x, dim), torch.softmax(x, dim), rtol=1e-14, atol=0)
    torch.testing.assert_close(oracle.log_softmax(x, dim), torch.log_softmax(x, dim), rtol=1e-14, atol=0)
    torch.testing.assert_close(oracle.logsumexp(x, dim), torch.logsumexp(x, dim), rtol=1e-14, atol=0)
    xr = x.clone().requires_grad_()
    for fn, ref in [
        (lambda t: torch.softmax(t, dim), oracle.softmax_bwd(x, g, dim)),
        (lambda t: torch.log_softmax(t, dim), oracle.log_softmax_bwd(x, g, dim)),
    ]:
        (gx,) = torch.autograd.grad(fn(xr), xr, g)
        torch.testing.assert_close(ref, gx, rtol=1e-12, atol=1e-15)
    gl = g.select(dim, 0)
    (gx,) = torch.autograd.grad(torch.logsumexp(xr, dim), xr, gl)
    torch.testing.assert_close(oracle.logsumexp_bwd(x, gl, dim), gx, rtol=1e-13, atol=0)
    p = torch.softmax(xr, dim)
    H = -(p * torch.log_softmax(xr, dim)).sum(dim)
    torch.testing.assert_close(oracle.entropy(x, dim), H.detach(), rtol=1e-13, atol=0)
    (gx,) = torch.autograd.grad(H, xr, gl)
    torch.testing.assert_close(oracle.entropy_bwd(x, gl, dim), gx, rtol=1e-10, atol=1e-15)
    idx = torch.randint(0, x.shape[dim], (3, 3) if dim else (3, 9), generator=gen)
    if dim == 0:
        idx = torch.randint(0, 6, (3, 9), generator=gen)
    else:
        idx = torch.randint(0, 9, (6, 3), generator=gen)
    gi = torch.randn(idx.shape, dtype=F64, generator=gen)
    torch.testing.assert_close(
        oracle.selective_log_softmax(x, idx, dim), torch.log_softmax(x, dim).gather(dim, idx), rtol=1e-14, atol=0
    )
    (gx,) = torch.autograd.grad(torch.log_softmax(xr, dim).gather(dim, idx), xr, gi)
    torch.testing.assert_close(oracle.selective_log_softmax_bwd(x, idx, gi, dim), gx, rtol=1e-12, atol=1e-15)


def test_logsumexp_tuple_dims_and_keepdim():
    x = torch.randn(3, 4, 5, dtype=F64)
    for dims in [(0, 2), (1,), (-1, 0), (0, 1, 2)]:
        for keep in (False, True):
            torch.testing.assert_close(
                oracle.logsumexp(x, dims, keep), torch.logsumexp(x, dims, keep), rtol=1e-14, atol=0
            )
            g = torch.randn(torch.logsumexp(x, dims, keep).shape, dtype=F64)
            xr = x.clone().requires_grad_()
            (gx,) = torch.autograd.grad(torch.logsumexp(xr, dims, keep), xr, g)
            torch.testing.assert_close(oracle.logsumexp_bwd(x, g, dims, keep), gx, rtol=1e-13, atol=0)


# The loss references against torch in float64 over every option that changes the formula.
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (2, 7, 3), (7,)])
@pytest.mark.parametrize("prob", [False, True])
def test_loss_references_match_torch(reduction, label_smoothing, weighted, shape, prob):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, dtype=F64, generator=gen)
    cd = 1 if len(shape) > 1 else 0
    C = shape[cd]
    tshape = shape[:cd] + shape[cd + 1 :]
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=F64, generator=gen), cd)
    else:
        t = torch.randint(0, C, tshape, generator=gen)
        if t.dim():
            t.view(-1)[0] = -100
    w = torch.rand(C, dtype=F64, generator=gen) + 0.5 if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    ref = torch.nn.functional.cross_entropy(x, t, **kw)
    torch.testing.assert_close(oracle.cross_entropy(x, t, **kw), ref, rtol=1e-13, atol=1e-15)
    go = torch.rand(ref.shape, dtype=F64, generator=gen)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xr, t, **kw), xr, go)
    torch.testing.assert_close(oracle.cross_entropy_bwd(x, t, go, **kw), gx, rtol=1e-12, atol=1e-15)
    if not prob and label_smoothing == 0:
        lp = torch.log_softmax(x, cd)
        kw.pop("label_smoothing")
        torch.testing.assert_close(oracle.nll_loss(lp, t, **kw), torch.nn.functional.nll_loss(lp, t, **kw))
        lr = lp.clone().requires_grad_()
        (gl,) = torch.autograd.grad(torch.nn.functional.nll_loss(lr, t, **kw), lr, go)
        torch.testing.assert_close(oracle.nll_loss_bwd(lp, t, go, **kw), gl)


def test_special_values_follow_the_table():
    inf, nan = math.inf, math.nan
    x = torch.tensor([[-inf, -inf], [0.0, inf], [0.0, nan], [0.0, -inf]])
    sm, ls, lse = oracle.softmax(x, 1), oracle.log_softmax(x, 1), oracle.logsumexp(x, 1)
    assert torch.isnan(sm[:3]).all() and torch.isnan(ls[:3]).all()
    assert sm[3].tolist() == [1.0, 0.0] and ls[3].tolist() == [0.0, -inf]
    assert lse[0] == -inf and lse[1] == inf and torch.isnan(lse[2]) and lse[3] == 0.0
    m = torch.tensor([[False, False], [True, True], [True, False], [True, True]])
    sm, ls, lse = oracle.softmax(x, 1, mask=m), oracle.log_softmax(x, 1, mask=m), oracle.logsumexp(x, 1, mask=m)
    assert sm[0].tolist() == [0.0, 0.0] and ls[0].tolist() == [-inf, -inf] and lse[0] == -inf
    assert torch.isnan(sm[1]).all() and lse[1] == inf
    assert sm[2].tolist() == [1.0, 0.0] and ls[2].tolist() == [0.0, -inf] and lse[2] == 0.0
    assert oracle.softmax_bwd(x, torch.ones_like(x), 1, mask=m)[0].tolist() == [0.0, 0.0]
    assert oracle.log_softmax_bwd(x, torch.ones_like(x), 1, mask=m)[0].tolist() == [0.0, 0.0]
    assert oracle.logsumexp_bwd(x, torch.ones(4), 1, mask=m)[0].tolist() == [0.0, 0.0]


def test_ulp_error_conventions():
    inf, nan = math.inf, math.nan
    ours = torch.tensor([1.0, 1.0, nan, inf, -inf, inf, nan, 1.0, 0.0], dtype=F32)
    truth = torch.tensor([1.0, 1.0 + 2**-23, nan, inf, -inf, -inf, 1.0, inf, 2**-149], dtype=F64)
    assert oracle.ulp_error(ours, truth, F32).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, inf, inf, inf, 1.0]
    # spacing: below a power of two the spacing halves; subnormals use the smallest subnormal spacing
    assert oracle.ulp(torch.tensor([1.0, 0.75, 0.0, 1e-40]), F32).tolist() == [2**-23, 2**-24, 2**-149, 2**-149]
    assert oracle.ulp(torch.tensor([1.0, 1e-6]), F16).tolist() == [2**-10, 2**-24]
    assert oracle.ulp(torch.tensor([1.0]), BF16).tolist() == [2**-7]


# The families: one tensor each, of the asked dtype and shape, and reproducible from the seed.
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
def test_input_families_shapes_and_determinism(dtype):
    a = dict(oracle.input_families(dtype, 33, M=3, seed=7))
    b = dict(oracle.input_families(dtype, 33, M=3, seed=7))
    assert {
        "normal_s1",
        "normal_s10",
        "normal_s100",
        "offset_1e4",
        "dominant",
        "underflow_edge",
        "log_p",
        "ties",
        "constant",
        "sorted_ascending",
    } <= set(a)
    for name, t in a.items():
        assert t.dtype == dtype and t.shape == (3, 33), name
        assert torch.equal(t, b[name]), name
    # the dominant family: one entry 0, every other below log(eps)
    d = a["dominant"].double()
    assert (d.amax(1) == 0).all() and ((d < math.log(torch.finfo(dtype).eps)).sum(1) == 32).all()
    assert (torch.sort(a["sorted_ascending"], 1).values == a["sorted_ascending"]).all()
    assert (a["constant"] == a["constant"][:, :1]).all()
    assert (oracle.logsumexp(a["log_p"], 1).abs() < 1e-2).all()


# The special-value families: their shape and contents, reproducible, and the input_families unchanged by them.
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("V", [1, 2, 33, 1025])  # a trivial row, the shortest with a -inf beside a value, longer
def test_special_families_shapes_and_contents(dtype, V):
    a = dict(oracle.special_families(dtype, V, M=8, seed=7))
    b = dict(oracle.special_families(dtype, V, M=8, seed=7))
    assert set(a) == {"neginf_masked", "specials"}
    for name, t in a.items():
        assert t.dtype == dtype and t.shape == (8, V), name
        assert torch.equal(t.isnan(), b[name].isnan()) and torch.equal(t.nan_to_num(0.0), b[name].nan_to_num(0.0))
    m = a["neginf_masked"]
    assert torch.isfinite(m).any(1).all() and not (m.isnan() | m.isposinf()).any()  # never a whole row
    if V == 1025:
        frac = m.isneginf().double().mean().item()
        assert 0.2 < frac < 0.3, frac  # about a quarter
    s = a["specials"]
    for i in range(8):
        row = s[i]
        n_fin = torch.isfinite(row).sum().item()
        kind = i % 4
        if kind == 0:
            assert row.isposinf().sum() == 1 and n_fin == V - 1
        elif kind == 1:
            assert row.isnan().sum() == 1 and n_fin == V - 1
        elif kind == 2:
            assert row.isneginf().all()
        else:
            assert n_fin == 1 and row.isneginf().sum() == V - 1
    fam = dict(oracle.input_families(dtype, V, M=3, seed=7))
    assert all(torch.isfinite(t).all() for t in fam.values())  # the finite families stay finite


def test_cross_entropy_targets():
    x = torch.cat([t for _, t in oracle.special_families(F32, 9, M=8, seed=3)])
    t = oracle.cross_entropy_targets(x, torch.Generator().manual_seed(0))
    assert t.shape == (16,) and t.dtype == torch.long
    picked = x.gather(1, t[:, None]).squeeze(1)
    live = torch.isfinite(x).any(1)
    neg_rows = (torch.isneginf(x).any(1) & live).nonzero().flatten()
    first = neg_rows[0].item()
    assert picked[first] == -math.inf  # the deliberate -inf target: loss +inf
    others = live.clone()
    others[first] = False
    assert torch.isfinite(picked[others]).all()  # every other live row targets a finite entry
    assert oracle.cross_entropy(x, t, reduction="none")[first] == math.inf
    t2 = oracle.cross_entropy_targets(x, torch.Generator().manual_seed(0), neginf_row=False)
    assert torch.isfinite(x.gather(1, t2[:, None]).squeeze(1)[live]).all()


# The oracle gives torch's edge semantics (NUMERICS.md's table) on the special-value families: values and
# gradients against torch's float64, special values exactly (NaN == NaN).
@pytest.mark.parametrize("V", [1, 2, 33])  # one entry (a row that is all one special), two, a short odd row
def test_special_families_match_torch_float64(V):
    gen = torch.Generator().manual_seed(V)
    x = torch.cat([t for _, t in oracle.special_families(F64, V, M=8, seed=V)])
    g = torch.randn(x.shape, dtype=F64, generator=gen)
    close = dict(rtol=1e-12, atol=1e-15, equal_nan=True)
    xr = x.clone().requires_grad_()
    for op in ("softmax", "log_softmax"):
        ref = getattr(torch, op)(xr, 1)
        torch.testing.assert_close(getattr(oracle, op)(x, 1), ref.detach(), **close)
        (gx,) = torch.autograd.grad(ref, xr, g)
        torch.testing.assert_close(getattr(oracle, op + "_bwd")(x, g, 1), gx, **close)
    ref = torch.logsumexp(xr, 1)
    torch.testing.assert_close(oracle.logsumexp(x, 1), ref.detach(), **close)
    (gx,) = torch.autograd.grad(ref, xr, g[:, 0])
    torch.testing.assert_close(oracle.logsumexp_bwd(x, g[:, 0], 1), gx, **close)
    t = oracle.cross_entropy_targets(x, gen)
    t[5] = -100  # an ignored row with special values still gets a NaN gradient in torch
    for kw in (dict(reduction="none"), dict(reduction="sum", label_smoothing=0.2), dict(reduction="mean")):
        ref = torch.nn.functional.cross_entropy(xr, t, **kw)
        torch.testing.assert_close(oracle.cross_entropy(x, t, **kw), ref.detach(), **close)
        go = torch.rand(ref.shape, dtype=F64, generator=gen)
        (gx,) = torch.autograd.grad(ref, xr, go)
        torch.testing.assert_close(oracle.cross_entropy_bwd(x, t, go, **kw), gx, **close)


def test_import_has_no_side_effects():
    code = "import sys; import logitkit.reference.oracle; print('mpmath' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": ":".join(sys.path)}
    )
    assert out.stdout.strip() == "False"
