"""Exact references for every op, for tests and the ``logitkit accuracy`` command.

Math:     the NUMERICS.md algorithm in float64 on the *rounded* input values: a = max, d = x - a,
          r = rest sum (the max's own exp(0) left out, ties counted 1 each), L = log1p(r);
          lse = a + L, log_softmax = d - L, softmax = exp(d) / (1 + r).  ``exact=True`` evaluates the
          per-row formulas in mpmath (200 bits) instead, for the cases float64 cannot resolve (lse near 0).
Numerics: float64 is exact for the fp16/bf16/fp32 inputs themselves; every output is formed without
          cancellation (CE = L - d_t, its target gradient -S * r/(1+r) + ...), so float64 results are
          accurate to a few float64 ulps, i.e. far below one float32 ulp.
Specials: the default (torch) semantics of NUMERICS.md: NaN anywhere or +inf -> NaN row, lse NaN / +inf;
          an all -inf row -> NaN softmax / log_softmax, lse -inf.  ``mask=`` gives the safe semantics:
          masked entries leave the row and an empty row gives softmax 0, log_softmax -inf, gradients 0.
Families: ``input_families`` (finite, NUMERICS.md's "Test families") and ``special_families`` (-inf, +inf,
          NaN rows); ``cross_entropy_targets`` picks targets on finite entries plus one deliberate -inf one.

All results are float64 tensors on the CPU.  Nothing runs at import time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "cross_entropy",
    "cross_entropy_bwd",
    "cross_entropy_targets",
    "entropy",
    "entropy_bwd",
    "input_families",
    "log_softmax",
    "log_softmax_bwd",
    "logsumexp",
    "logsumexp_bwd",
    "lse_error",
    "nll_loss",
    "nll_loss_bwd",
    "scaled_error",
    "selective_log_softmax",
    "selective_log_softmax_bwd",
    "softmax",
    "softmax_bwd",
    "softmax_bwd_scale",
    "special_families",
    "ulp",
    "ulp_error",
    "underflow_edge",
]

_F64 = torch.float64
_MP_PREC = 200  # bits; far beyond what a rounded float64 result needs even after cancellation


# ---------------------------------------------------------------------------------------------------------
# Row machinery: move the reduced dim(s) last and flatten them, compute, move back.
# ---------------------------------------------------------------------------------------------------------


def _f64(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"oracle expects a torch.Tensor, got {type(x).__name__}")
    return x.detach().to(device="cpu", dtype=_F64)


def _norm_dims(dim: int | Sequence[int], ndim: int) -> list[int]:
    dims = [dim] if isinstance(dim, int) else list(dim)
    n = max(ndim, 1)
    out = []
    for d in dims:
        if not -n <= d < n:
            raise IndexError(f"dim {d} out of range for a {ndim}-d tensor")
        out.append(d % n)
    return out


def _to_rows(x: Tensor, dims: list[int]) -> tuple[Tensor, list[int], tuple[int, ...]]:
    """(x with ``dims`` moved last and flattened into one, permutation, permuted shape)."""
    keep = [i for i in range(x.dim()) if i not in dims]
    perm = keep + dims
    xp = x.permute(perm)
    shape = tuple(xp.shape)
    lead = shape[: len(keep)]
    return xp.reshape(*lead, -1), perm, shape


def _from_rows(y: Tensor, perm: list[int], shape: tuple[int, ...]) -> Tensor:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return y.reshape(shape).permute(inv).contiguous()


def _mask_input(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x
    m = torch.broadcast_to(mask.to(device="cpu", dtype=torch.bool), x.shape)
    return x.masked_fill(~m, -math.inf)


# ---------------------------------------------------------------------------------------------------------
# The per-row state (a, d, e, r, L) in float64 over the last dim of a (..., V) float64 tensor.
# ---------------------------------------------------------------------------------------------------------


def _stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """a (..., 1), d, e = exp(d) (..., V), r, L (..., 1); d, e, r, L valid only where a is finite."""
    if x.shape[-1] == 0:
        a = torch.full((*x.shape[:-1], 1), -math.inf, dtype=_F64)
        z = torch.zeros((*x.shape[:-1], 1), dtype=_F64)
        return a, x.clone(), x.clone(), z, z
    a = x.amax(dim=-1, keepdim=True)  # NaN anywhere propagates to the max
    a_safe = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    d = x - a_safe
    e = torch.exp(d)
    is_max = d == 0
    k = is_max.sum(dim=-1, keepdim=True).to(_F64)
    # Rest sum: every entry below the max, plus one 1 for each tie beyond the first.
    r = torch.where(is_max, torch.zeros_like(e), e).sum(dim=-1, keepdim=True) + (k - 1).clamp_min(0)
    L = torch.log1p(r)
    return a, d, e, r, L


def _row_status(a: Tensor, x: Tensor, safe: bool) -> tuple[Tensor, Tensor]:
    """(nan_row, empty_row): rows whose normalised outputs are NaN, rows with no mass (all -inf)."""
    has_nan = torch.isnan(x).any(dim=-1, keepdim=True) if x.shape[-1] else torch.zeros_like(a, dtype=torch.bool)
    empty = torch.isneginf(a)
    nan_row = has_nan | torch.isposinf(a) | torch.isnan(a)
    if not safe:
        nan_row = nan_row | empty
        empty = torch.zeros_like(empty)
    return nan_row, empty


def _mp_rows(x: Tensor, fn) -> Tensor:
    """Apply ``fn(list[mpf]) -> list[mpf]`` to each row of a (R, V) float64 tensor under mpmath."""
    import mpmath

    rows = []
    with mpmath.workprec(_MP_PREC):
        for i in range(x.shape[0]):
            row = [mpmath.mpf(v) for v in x[i].tolist()]
            rows.append([float(v) for v in fn(row)])
    return torch.tensor(rows, dtype=_F64).reshape(x.shape[0], -1)


def _mp_rest_log(row):
    """(a, log1p(rest)): the rest sum leaves out one exp(0) = 1, so a rest below 2**-200 survives."""
    import mpmath

    a = max(row)
    i = row.index(a)
    rest = mpmath.fsum(mpmath.exp(v - a) for j, v in enumerate(row) if j != i)
    return a, mpmath.log1p(rest)


def _mp_lse(row):
    a, lg = _mp_rest_log(row)
    return a + lg


def _mp_log_softmax(row):
    a, lg = _mp_rest_log(row)
    return [(v - a) - lg for v in row]


def _mp_softmax(row):
    import mpmath

    a, lg = _mp_rest_log(row)
    return [mpmath.exp((v - a) - lg) for v in row]


def _normalised(x: Tensor, dim: int, log: bool, mask: Tensor | None, exact: bool) -> Tensor:
    x64 = _mask_input(_f64(x), mask)
    if x64.dim() == 0:
        return _normalised(x64.reshape(1), 0, log, None if mask is None else mask.reshape(1), exact).reshape(())
    dims = _norm_dims(dim, x64.dim())
    xr, perm, shape = _to_rows(x64, dims)
    a, d, e, r, L = _stats(xr)
    out = d - L if log else e / (1.0 + r)
    if exact and xr.numel():
        finite = torch.isfinite(a).reshape(-1)
        flat = xr.reshape(-1, xr.shape[-1])
        exact_vals = torch.empty_like(flat)
        rows = flat[finite]
        if rows.numel():
            vals = _mp_rows(rows, _mp_log_softmax if log else _mp_softmax)
            exact_vals[finite] = vals
        out = torch.where(torch.isfinite(a), exact_vals.reshape(out.shape), out)
    nan_row, empty = _row_status(a, xr, mask is not None)
    out = torch.where(nan_row, torch.full_like(out, math.nan), out)
    out = torch.where(empty, torch.full_like(out, -math.inf if log else 0.0), out)
    return _from_rows(out, perm, shape)


# ---------------------------------------------------------------------------------------------------------
# Forward references.
# ---------------------------------------------------------------------------------------------------------


def softmax(x: Tensor, dim: int = -1, *, mask: Tensor | None = None, exact: bool = False) -> Tensor:
    """softmax of the rounded values of ``x`` along ``dim`` in float64 (mpmath with ``exact=True``)."""
    return _normalised(x, dim, False, mask, exact)


def log_softmax(x: Tensor, dim: int = -1, *, mask: Tensor | None = None, exact: bool = False) -> Tensor:
    """log_softmax along ``dim``: d - L, two non-positive terms (mpmath with ``exact=True``)."""
    return _normalised(x, dim, True, mask, exact)


def logsumexp(
    x: Tensor,
    dim: int | Sequence[int] = -1,
    keepdim: bool = False,
    *,
    mask: Tensor | None = None,
    exact: bool = False,
) -> Tensor:
    """logsumexp over ``dim`` (int or tuple); ``exact=True`` resolves a + L near 0 with mpmath."""
    x64 = _mask_input(_f64(x), mask)
    if x64.dim() == 0:
        _norm_dims(dim, 0)
        return x64.clone()
    dims = _norm_dims(dim, x64.dim())
    xr, _, _ = _to_rows(x64, dims)
    a, _, _, _, L = _stats(xr)
    a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
    out = torch.where(torch.isinf(a), a, a_safe + L)  # a ± inf max is the answer (-inf for empty rows)
    if exact and xr.numel() and xr.shape[-1]:
        flat = xr.reshape(-1, xr.shape[-1])
        fin = torch.isfinite(a).reshape(-1)
        if fin.any():
            ex = _mp_rows(flat[fin], lambda row: [_mp_lse(row)])
            o = out.reshape(-1).clone()
            o[fin] = ex.reshape(-1)
            out = o.reshape(out.shape)
    has_nan = torch.isnan(xr).any(dim=-1, keepdim=True) if xr.shape[-1] else torch.zeros_like(a, dtype=torch.bool)
    out = torch.where(has_nan, torch.full_like(out, math.nan), out).squeeze(-1)
    if keepdim:
        for d in sorted(dims):
            out = out.unsqueeze(d)
    return out


def selective_log_softmax(x: Tensor, index: Tensor, dim: int = -1) -> Tensor:
    """log_softmax(x, dim).gather(dim, index) in float64."""
    return log_softmax(x, dim).gather(dim, index.to("cpu"))


def entropy(x: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy of softmax(x) along ``dim``: sum p_i (L - d_i), all terms >= 0 (0 log 0 = 0)."""
    p = softmax(x, dim)
    terms = torch.where(p == 0, torch.zeros_like(p), p * -log_softmax(x, dim))
    return terms.sum(dim) if terms.dim() else terms


def _class_dim(x: Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _reduce(loss: Tensor, denom: Tensor | float, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / denom
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _ce_setup(x, target, weight, ignore_index, label_smoothing):
    """Classes-last float64 logits plus the effective target distribution q (..., C), per-row denominators.

    Per row, the loss is sum_c q_c * (L - d_c); q_c = w_c ((1 - eps) y_c + eps / C) for probabilities and
    (1 - eps) w_t [c == t] + (eps / C) w_c for a class index t (0 for an ignored row).
    """
    x64 = _f64(x)
    cd = _class_dim(x64)
    xl = x64.movedim(cd, -1)
    C = xl.shape[-1]
    w = torch.ones(C, dtype=_F64) if weight is None else _f64(weight)
    eps = float(label_smoothing)
    if target.is_floating_point():
        y = _f64(target).movedim(cd, -1)
        q = (y * (1 - eps) + eps / C) if eps > 0 else y
        q = q * w
        denom = float(xl.numel() // max(C, 1)) if xl.numel() else math.nan  # torch: mean over rows, NaN if empty
        return xl, q, None, denom, C
    t = target.to("cpu", torch.long)
    valid = t != ignore_index
    ts = torch.where(valid, t, torch.zeros_like(t))
    wt = torch.where(valid, w[ts], torch.zeros((), dtype=_F64)) if C else torch.zeros(t.shape, dtype=_F64)
    onehot = torch.nn.functional.one_hot(ts, C).to(_F64) if C else torch.zeros((*t.shape, 0), dtype=_F64)
    q = (1 - eps) * wt.unsqueeze(-1) * onehot
    if eps > 0:
        q = q + (eps / C) * w * valid.unsqueeze(-1).to(_F64)
    return xl, q, (ts, valid, wt, w, eps), wt.sum(), C


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """torch.nn.functional.cross_entropy in float64, per row L - d_t (no cancellation)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    xl, q, idx, denom, C = _ce_setup(input, target, weight, ignore_index, label_smoothing)
    nlp = -log_softmax(xl, -1)  # L - d >= 0
    if idx is None:
        loss = (q * nlp).sum(-1)  # as torch: 0 * inf = NaN for a zero-probability -inf logit
        return _reduce(loss, denom, reduction)
    ts, valid, wt, w, eps = idx
    nll = torch.where(valid, wt * nlp.gather(-1, ts.unsqueeze(-1)).squeeze(-1), torch.zeros((), dtype=_F64))
    loss = nll if eps == 0 else (1 - eps) * nll
    if eps > 0:
        smooth = torch.where(valid, (w * nlp).sum(-1), torch.zeros((), dtype=_F64))
        loss = loss + smooth * (eps / C)
    return _reduce(loss, denom, reduction)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
) -> Tensor:
    """torch.nn.functional.nll_loss in float64: -w_t * input[t], ignored rows 0, mean over sum of w_t."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    x64 = _f64(input)
    xl = x64.movedim(_class_dim(x64), -1)
    C = xl.shape[-1]
    w = torch.ones(C, dtype=_F64) if weight is None else _f64(weight)
    t = target.to("cpu", torch.long)
    valid = t != ignore_index
    ts = torch.where(valid, t, torch.zeros_like(t))
    wt = torch.where(valid, w[ts], torch.zeros((), dtype=_F64))
    picked = xl.gather(-1, ts.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, -wt * picked, torch.zeros((), dtype=_F64))
    return _reduce(loss, wt.sum(), reduction)


# ---------------------------------------------------------------------------------------------------------
# Backward references (float64 gradients with respect to the rounded input).
# ---------------------------------------------------------------------------------------------------------


def softmax_bwd(x: Tensor, g: Tensor, dim: int = -1, *, mask: Tensor | None = None) -> Tensor:
    """d/dx of sum(g * softmax(x)): y * (g - sum(g * y)); 0 where y is 0 (masked or -inf)."""
    y = softmax(x, dim, mask=mask)
    g64 = _f64(g)
    dx = y * (g64 - (g64 * y).sum(dim, keepdim=True))
    return torch.where(y == 0, torch.zeros_like(dx), dx)


def log_softmax_bwd(x: Tensor, g: Tensor, dim: int = -1, *, mask: Tensor | None = None) -> Tensor:
    """d/dx of sum(g * log_softmax(x)): g - softmax * sum(g).

    As torch, an unmasked -inf entry of a live row gets g (d log_softmax_i / dx_i = 1 - p_i = 1).  With
    ``mask=``, masked entries and rows without mass get 0.
    """
    p = softmax(x, dim, mask=mask)
    g64 = torch.broadcast_to(_f64(g), p.shape)
    if mask is not None:
        m = torch.broadcast_to(mask.to("cpu", torch.bool), p.shape)
        g64 = torch.where(m, g64, torch.zeros_like(g64))
    dx = g64 - p * g64.sum(dim, keepdim=True)
    if mask is not None:
        dead = torch.isneginf(logsumexp(x, dim, keepdim=True, mask=mask))
        dx = torch.where(m & ~dead, dx, torch.zeros_like(dx))
    return dx


def logsumexp_bwd(
    x: Tensor, g: Tensor, dim: int | Sequence[int] = -1, keepdim: bool = False, *, mask: Tensor | None = None
) -> Tensor:
    """d/dx of sum(g * logsumexp(x, dim)): g * exp(x - lse).

    Default semantics as torch (an all -inf row gives 0/0 = NaN); with ``mask=`` rows without mass and
    masked entries get 0.
    """
    x64 = _mask_input(_f64(x), mask)
    if x64.dim() == 0:
        return _f64(g).clone()
    dims = _norm_dims(dim, x64.dim())
    lse = logsumexp(x64, dims, keepdim=True)
    g64 = _f64(g)
    if not keepdim:
        for d in sorted(dims):
            g64 = g64.unsqueeze(d)
    if mask is None:
        return torch.exp(x64 - lse) * g64
    l_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.where(torch.isneginf(x64), torch.zeros_like(x64), torch.exp(x64 - l_safe))
    return p * g64


def _grad_scale(grad_output: Tensor, denom, reduction: str, shape) -> Tensor:
    """The upstream gradient of each row's loss: grad_output itself ('none'), or shared and / denom."""
    g = _f64(grad_output)
    return (g / denom if reduction == "mean" else g).expand(shape)


def cross_entropy_bwd(
    input: Tensor,
    target: Tensor,
    grad_output: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """d loss / d input in float64, shaped like ``input``.

    Per row with q the effective target distribution and S = sum q: dx_i = p_i S - q_i; at the max entries
    (p_i near 1) it is evaluated as -S r / (1 + r) + (S - q_i), never via 1 - p_i, which cancels.  Rows
    with NaN, +inf or only -inf logits get NaN (as torch); a -inf logit at the target gets -q_t (finite).
    """
    if grad_output is None:
        grad_output = torch.ones((), dtype=_F64)
    xl, q, idx, denom, C = _ce_setup(input, target, weight, ignore_index, label_smoothing)
    x64 = _f64(input)
    cd = _class_dim(x64)
    a, d, e, r, _ = _stats(xl)
    p = e / (1.0 + r)
    S = q.sum(-1, keepdim=True)
    if idx is None:
        s_minus_q = S - q
    else:
        ts, valid, wt, w, eps = idx
        onehot = torch.nn.functional.one_hot(ts, C).to(_F64)
        v = valid.unsqueeze(-1).to(_F64)
        s_minus_q = (1 - eps) * wt.unsqueeze(-1) * (1 - onehot)
        if eps > 0:
            s_minus_q = s_minus_q + (eps / C) * (w.sum() - w) * v
    # At a max entry p_i S - q_i cancels: use -S (1 - p_i) + (S - q_i) with 1 - p_i = r / (1 + r) there.
    dx = torch.where(d == 0, -S * (r / (1.0 + r)) + s_minus_q, p * S - q)
    # As torch (log_softmax's backward g - exp(y) sum g on a NaN row): a row with NaN, +inf or only -inf
    # logits has a NaN gradient, ignored rows included; the formulas above would give 0 or -q there.
    nan_row, _ = _row_status(a, xl, False)
    dx = torch.where(nan_row, torch.full_like(dx, math.nan), dx)
    scale = _grad_scale(grad_output, denom, reduction, xl.shape[:-1]).unsqueeze(-1)
    return (dx * scale).movedim(-1, cd)


def nll_loss_bwd(
    input: Tensor,
    target: Tensor,
    grad_output: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """d loss / d input: -w_t (times the reduction scale) at the target, 0 elsewhere and on ignored rows."""
    if grad_output is None:
        grad_output = torch.ones((), dtype=_F64)
    x64 = _f64(input)
    cd = _class_dim(x64)
    xl = x64.movedim(cd, -1)
    C = xl.shape[-1]
    w = torch.ones(C, dtype=_F64) if weight is None else _f64(weight)
    t = target.to("cpu", torch.long)
    valid = t != ignore_index
    ts = torch.where(valid, t, torch.zeros_like(t))
    wt = torch.where(valid, w[ts], torch.zeros((), dtype=_F64))
    scale = _grad_scale(grad_output, wt.sum(), reduction, t.shape)
    dx = torch.zeros_like(xl)
    dx.scatter_(-1, ts.unsqueeze(-1), (-wt * scale).unsqueeze(-1))
    return dx.movedim(-1, cd)


def selective_log_softmax_bwd(x: Tensor, index: Tensor, g: Tensor, dim: int = -1) -> Tensor:
    """Backward of log_softmax(x).gather(dim, index): scatter-add g, then g - p * sum(g)."""
    x64 = _f64(x)
    G = torch.zeros_like(x64).scatter_add_(dim, index.to("cpu"), _f64(g))
    return log_softmax_bwd(x64, G, dim)


def entropy_bwd(x: Tensor, g: Tensor, dim: int = -1) -> Tensor:
    """d/dx of sum(g * H(softmax(x))): -p_j (log p_j + H) = p_j ((L - d_j) - H), times g."""
    p = softmax(x, dim)
    nlp = -log_softmax(x, dim)
    H = entropy(x, dim).unsqueeze(dim)
    dx = torch.where(p == 0, torch.zeros_like(p), p * (nlp - H))
    return dx * _f64(g).unsqueeze(dim)


# ---------------------------------------------------------------------------------------------------------
# Error metrics.
# ---------------------------------------------------------------------------------------------------------


def ulp(y: Tensor, dtype: torch.dtype) -> Tensor:
    """Spacing of ``dtype`` at |y| (float64): 2**(e-1) * eps for |y| in [2**(e-1), 2**e); the smallest
    subnormal spacing below the normal range (and at 0)."""
    fi = torch.finfo(dtype)
    y = _f64(y).abs()
    _, e = torch.frexp(torch.where(torch.isfinite(y), y, torch.zeros_like(y)))
    sp = torch.ldexp(torch.full_like(y, fi.eps), (e - 1).to(torch.int64))
    min_sp = fi.smallest_normal * fi.eps
    return torch.where(y == 0, torch.full_like(sp, min_sp), sp.clamp_min(min_sp))


def _special_mismatch(ours: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """(both_special_equal, special_mismatch) masks for NaN/inf handling."""
    o_nan, t_nan = torch.isnan(ours), torch.isnan(truth)
    o_inf, t_inf = torch.isinf(ours), torch.isinf(truth)
    same = (o_nan & t_nan) | (o_inf & t_inf & (ours == truth))
    special = o_nan | t_nan | o_inf | t_inf
    return same, special & ~same


def _finish(err: Tensor, ours: Tensor, truth: Tensor) -> Tensor:
    same, mismatch = _special_mismatch(ours, truth)
    err = torch.where(same, torch.zeros_like(err), err)
    return torch.where(mismatch, torch.full_like(err, math.inf), err)


def ulp_error(ours: Tensor, truth: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """|ours - truth| in ulps of ``dtype`` (default: ``ours``' dtype) at |truth|, float64.

    Equal infinities and NaN/NaN count 0; a special value on one side only (or infinities of opposite
    sign) counts inf.
    """
    dtype = ours.dtype if dtype is None else dtype
    o, t = _f64(ours), _f64(truth)
    o, t = torch.broadcast_tensors(o, t)
    err = (o - t).abs() / ulp(t, dtype)
    return _finish(err, o, t)


def lse_error(ours: Tensor, truth: Tensor, x: Tensor, dim=-1, keepdim: bool = False, dtype=None) -> Tensor:
    """The mixed metric for logsumexp: err / max(ulp(y), eps * sum_i p_i |x_i|).

    Away from 0 it is the ulp error; near lse = 0 (where a + L cancels, y is ill-conditioned) it is scaled
    by the condition number sum p_i |x_i| / |y|.
    """
    dtype = ours.dtype if dtype is None else dtype
    o, t = _f64(ours), _f64(truth)
    x64 = _f64(x)
    if x64.dim() == 0:
        return ulp_error(o, t, dtype)
    dims = _norm_dims(dim, x64.dim())
    p = torch.exp(x64 - logsumexp(x64, dims, keepdim=True))
    cond = (
        torch.where(torch.isfinite(x64), p * x64.abs(), torch.zeros_like(p)).nan_to_num(0.0).sum(dims, keepdim=keepdim)
    )
    denom = torch.maximum(ulp(t, dtype), torch.finfo(dtype).eps * cond)
    err = (o - t).abs() / denom
    return _finish(err, o, t)


def scaled_error(ours: Tensor, truth: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """|ours - truth| / (eps(dtype) * scale) with a floor of one subnormal spacing, specials as ulp_error.

    For gradients, ``scale`` is the conditioning of each entry (softmax_bwd_scale for softmax).
    """
    fi = torch.finfo(dtype)
    o, t = _f64(ours), _f64(truth)
    denom = torch.maximum(fi.eps * _f64(scale).abs(), torch.full_like(t, fi.smallest_normal * fi.eps))
    err = (o - t).abs() / denom
    return _finish(err, o, t)


def softmax_bwd_scale(x: Tensor, g: Tensor, dim: int = -1) -> Tensor:
    """NUMERICS.md's gradient scale y_i * (|g_i| + sum_j |g_j| y_j) for the softmax backward."""
    y = softmax(x, dim)
    ga = _f64(g).abs()
    return y * (ga + (ga * y).sum(dim, keepdim=True))


# ---------------------------------------------------------------------------------------------------------
# Input families of NUMERICS.md.
# ---------------------------------------------------------------------------------------------------------


def underflow_edge(dtype: torch.dtype) -> float:
    """log of half the smallest subnormal: where exp(d) rounds to 0 in ``dtype`` (fp16 -17.33, fp32 -103.97)."""
    fi = torch.finfo(dtype)
    return math.log(fi.smallest_normal) + math.log(fi.eps) - math.log(2.0)  # the product underflows in fp64


def input_families(dtype: torch.dtype, V: int, M: int = 4, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """(name, (M, V) tensor of ``dtype``) for each NUMERICS.md family, drawn from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=_F64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=_F64)

    def out(t: Tensor) -> Tensor:
        return t.to(dtype)

    for s in (1.0, 10.0, 100.0):
        yield f"normal_s{s:g}", out(randn(M, V) * s)
    yield "offset_1e4", out(1e4 + randn(M, V))
    # One max at 0 at a random position, every other entry below log(eps): exp(d) < eps for all of them.
    log_eps = math.log(torch.finfo(dtype).eps)
    pos = torch.randint(0, V, (M, 1), generator=gen)
    dom = log_eps - 0.5 - 8.0 * rand(M, V)
    yield "dominant", out(dom.scatter(1, pos, 0.0))
    # The rest straddles the point where exp(d) rounds to 0 in the output dtype.
    edge = underflow_edge(dtype) + 3.0 * (rand(M, V) - 0.5)
    yield "underflow_edge", out(edge.scatter(1, pos, 0.0))
    # x = log p for a probability vector p: lse is (up to input rounding) 0.
    p = torch.softmax(randn(M, V) * 2.0, dim=1)
    yield "log_p", out(torch.log(p))
    # Ties: entries from {c, c - 1, c - 2}, about half of them equal to the max c.
    c = randn(M, 1)
    lvl = torch.randint(0, 4, (M, V), generator=gen).clamp_max(2).to(_F64)
    yield "ties", out(c - torch.where(rand(M, V) < 0.5, torch.zeros_like(lvl), lvl))
    yield "constant", out(randn(M, 1).expand(M, V).clone())
    # Ascending rows: the running max changes at every element (stresses online rescaling).
    yield "sorted_ascending", out(torch.sort(randn(M, V) * 10.0, dim=1).values)


def special_families(dtype: torch.dtype, V: int, M: int = 4, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """(name, (M, V) tensor of ``dtype``) with the special values of NUMERICS.md's edge-case table.

    Kept apart from ``input_families``: those rows are finite, and the consumers that need finite rows
    (gradient-scale metrics, float64-vs-mpmath checks) keep iterating only them.

    neginf_masked: N(0, 3) with about a quarter of each row's entries -inf, never all of them (one random
                   entry per row stays finite): softmax 0 and log_softmax -inf there, lse finite.
    specials:      row i is kind i % 4 of: one +inf entry (NaN row, lse +inf); one NaN entry (NaN row and lse);
                   every entry -inf (NaN row, lse -inf); all -inf but one finite entry (softmax 1 there).
    """
    gen = torch.Generator().manual_seed(seed + 0x5EC)  # a stream of its own: input_families stays unchanged
    base = torch.randn(M, V, generator=gen, dtype=_F64) * 3.0
    keep = torch.randint(0, max(V, 1), (M, 1), generator=gen)
    masked = torch.rand(M, V, generator=gen, dtype=_F64) < 0.25
    masked.scatter_(1, keep, False)  # never a whole row
    yield "neginf_masked", base.masked_fill(masked, -math.inf).to(dtype)
    x = torch.randn(M, V, generator=gen, dtype=_F64) * 3.0
    pos = torch.randint(0, max(V, 1), (M,), generator=gen)
    for i in range(M if V else 0):
        kind = i % 4
        if kind == 0:
            x[i, pos[i]] = math.inf
        elif kind == 1:
            x[i, pos[i]] = math.nan
        elif kind == 2:
            x[i] = -math.inf
        else:
            v = x[i, pos[i]].item()
            x[i] = -math.inf
            x[i, pos[i]] = v
    yield "specials", x.to(dtype)


def cross_entropy_targets(x: Tensor, generator: torch.Generator, *, neginf_row: bool = True) -> Tensor:
    """Class targets (int64, x.shape[:-1]) for (..., V) logits: uniform over each row's finite entries (any
    class where a row has none).  With ``neginf_row``, the first row holding both a finite and a -inf entry
    targets a -inf one instead (torch's loss +inf there: NUMERICS.md's last table row)."""
    V = x.shape[-1]
    flat = _f64(x).reshape(-1, V)
    live = torch.isfinite(flat)
    fin = torch.where(live.any(1, keepdim=True), live, torch.ones_like(live))
    # A random key per entry, -1 off the allowed entries: the argmax is uniform over the allowed ones.
    key = torch.rand(flat.shape, generator=generator, dtype=_F64)
    t = torch.where(fin, key, torch.full_like(key, -1.0)).argmax(1)
    if neginf_row:
        neg = torch.isneginf(flat)
        rows = (neg.any(1) & live.any(1)).nonzero().flatten()
        if rows.numel():
            r = rows[0]
            t[r] = torch.where(neg[r], key[r], torch.full_like(key[r], -1.0)).argmax()
    return t.reshape(x.shape[:-1])
