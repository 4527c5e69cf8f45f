"""The reference path: the NUMERICS.md algorithm in plain PyTorch, for the CPU and as the fallback anywhere.

Math:     per row a = max(x); d = x - a; r = sum of exp(d) over all entries but one argmax (the "rest" sum,
          ties count 1 each); L = log1p(r).  lse = a + L;  log_softmax = d - L;  softmax = exp(d) / (1 + r).
Traffic:  rows are processed in blocks of about BLOCK_ELEMS elements, so temporaries are O(block), never
          O(input); a non-last ``dim`` is handled by copying one block at a time into a (rows, V) buffer.
Numerics: working precision float32 for fp16/bf16 inputs, float64 for float64.  For float32 inputs the
          shift d = x - a is carried as an unevaluated sum d_hi + d_lo (TwoSum), because a rounded d costs
          |d| * u of relative accuracy in exp(d) (16 ulps at d = -50); the correction keeps softmax, the
          rest sum and log_softmax within the accuracy table while staying in fast float32 arithmetic.
          Every block is computed on a contiguous (rows, V) copy, so results do not depend on layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements per block: large enough that the per-op overhead is amortised, small enough that the block's
# few temporaries stay in a core's L2 (each element pass over an L2-resident block is several times faster).
BLOCK_ELEMS = 1 << 16


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compute dtype for an input dtype: at least float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def iter_row_blocks(lead: tuple[int, ...], V: int, budget: int = BLOCK_ELEMS) -> Iterator[tuple]:
    """Index tuples into a (*lead, V) tensor, each selecting whole rows, about ``budget`` elements each."""

    def gen(prefix: tuple, k: int) -> Iterator[tuple]:
        rest = math.prod(lead[k:]) * max(V, 1)
        if rest <= budget or k == len(lead):
            yield prefix
            return
        per = math.prod(lead[k + 1 :]) * max(V, 1)
        if per <= budget or k == len(lead) - 1:
            n = max(1, budget // per)
            for s in range(0, lead[k], n):
                yield (*prefix, slice(s, s + n))
        else:
            for i in range(lead[k]):
                yield from gen((*prefix, i), k + 1)

    yield from gen((), 0)


def as_rows(t: Tensor) -> Tensor:
    """A (..., V) block as a contiguous (rows, V) tensor (a view when already contiguous)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


class Stats(NamedTuple):
    """Per-row state of a (R, V) block in working precision; d = d_hi (+ d_lo when not None)."""

    d_hi: Tensor  # (R, V) x - a_safe, rounded
    d_lo: Tensor | None  # (R, V) rounding error of d_hi (float32 inputs only)
    e: Tensor  # (R, V) exp(d); exactly 1 at the maxima
    a: Tensor  # (R, 1) row max (±inf and NaN kept)
    L: Tensor  # (R, 1) log1p(rest); NaN for rows whose softmax is NaN
    r: Tensor  # (R, 1) rest sum


def _two_diff(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """x - a = hi + lo exactly (Knuth's TwoSum), entries with non-finite hi get lo = 0."""
    hi = x - a
    bp = hi - x  # the part of hi that came from -a
    lo = torch.sub(x, torch.sub(hi, bp), out=torch.empty_like(x))  # x - x'
    lo.sub_(bp.add_(a))  # ... + (-a - b')
    return hi, lo.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def row_stats(x2: Tensor, mask2: Tensor | None, masked: bool) -> Stats:
    """(max, rest-sum) statistics of each row of a contiguous (R, V) block, V >= 1.

    ``masked`` selects the safe behaviour for rows whose max is -inf (all -inf or all masked out):
    softmax 0 / log_softmax -inf instead of torch's NaN.
    """
    wd = working_dtype(x2.dtype)
    xw = x2.to(wd)
    if mask2 is not None:
        xw = xw.masked_fill(~mask2, -math.inf)  # masked entries (NaN included) leave the row
    a = xw.amax(dim=1, keepdim=True)
    # A ±inf max would turn d into NaN; shift by 0 instead and repair those rows below.
    a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
    if x2.dtype == torch.float32:
        d_hi, d_lo = _two_diff(xw, a_safe)
        e = torch.exp(d_hi)
        e.addcmul_(e, d_lo)  # exp(hi + lo) = exp(hi) * (1 + lo) to first order; |lo| <= u |hi|
    else:
        d_hi, d_lo = xw - a_safe, None
        e = torch.exp(d_hi)
    # The rest sum leaves out one max's exp(0) = 1, so nothing small is lost against it: sum the entries
    # below 1, then add back the k - 1 other maxima (k = number of exact 1s, recovered as an integer).
    s_all = e.sum(dim=1, keepdim=True)
    below = F.threshold(e.neg(), -1.0, 0.0, inplace=True)  # -e where e < 1, else 0
    s_rest = below.sum(dim=1, keepdim=True).neg_()
    r = s_rest + (torch.round(s_all - s_rest) - 1.0)
    r = torch.where(torch.isneginf(a), torch.zeros_like(r), r)  # no entries: r = 0 (lse -inf, softmax 0)
    L = torch.log1p(r)
    # +inf anywhere -> NaN row (as torch); a -inf max -> NaN row unless the caller asked for mask= semantics.
    bad = torch.isposinf(a) if masked else torch.isinf(a)
    L = torch.where(bad, torch.full_like(L, math.nan), L)
    return Stats(d_hi, d_lo, e, a, L, r)


def lse_of(s: Stats) -> Tensor:
    """a + L, with lse = a for infinite a (−inf for empty/all −inf rows, +inf when +inf is present)."""
    a_safe = torch.where(torch.isinf(s.a), torch.zeros_like(s.a), s.a)
    return torch.where(torch.isinf(s.a), s.a, a_safe + s.L)


def log_softmax_from(s: Stats, out: Tensor | None = None) -> Tensor:
    # d - L: both terms <= 0, so the subtraction never cancels.
    if s.d_lo is None:
        return torch.sub(s.d_hi, s.L, out=out) if out is not None else s.d_hi - s.L
    t = s.d_hi - s.L
    return torch.add(t, s.d_lo, out=out) if out is not None else t.add_(s.d_lo)


def softmax_from(s: Stats, out: Tensor | None = None) -> Tensor:
    e = s.e
    denom = torch.where(torch.isnan(s.L), s.L, 1.0 + s.r)
    # A true division, not a multiply by the reciprocal: one rounding per entry.
    return torch.div(e, denom, out=out) if out is not None else e.div_(denom)


def d_full(s: Stats) -> Tensor:
    return s.d_hi if s.d_lo is None else s.d_hi + s.d_lo


# ---------------------------------------------------------------------------------------------------------
# Whole-tensor drivers over a (*lead, V) view (the softmax dim already moved last).
# ---------------------------------------------------------------------------------------------------------


def _blocks(xv: Tensor, mv: Tensor | None):
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    for sl in iter_row_blocks(lead, V):
        yield sl, as_rows(xv[sl]), (as_rows(mv[sl]) if mv is not None else None)


def _store(dst: Tensor, res: Tensor) -> None:
    dst.copy_(res.view(dst.shape))


def _direct_out(dst: Tensor) -> Tensor | None:
    """A (rows, V) view of an output block when it can be written in place."""
    if dst.is_contiguous():
        return dst.view(-1, dst.shape[-1])
    return None


def normalize_fwd(xv: Tensor, mv: Tensor | None, log: bool, out: Tensor) -> Tensor:
    """softmax / log_softmax of every row of ``xv`` (*lead, V), written into ``out`` (same shape, any strides)."""
    if xv.shape[-1] == 0 or out.numel() == 0:
        return out
    masked = mv is not None
    for sl, x2, m2 in _blocks(xv, mv):
        s = row_stats(x2, m2, masked)
        dst = out[sl]
        direct = _direct_out(dst) if dst.dtype == working_dtype(x2.dtype) else None
        res = log_softmax_from(s, direct) if log else softmax_from(s, direct)
        if direct is None:
            _store(dst, res)
    return out


def lse_fwd(xv: Tensor, mv: Tensor | None) -> Tensor:
    """logsumexp of every row of ``xv`` in working precision, shape ``lead``."""
    lead = xv.shape[:-1]
    wd = working_dtype(xv.dtype)
    if xv.shape[-1] == 0:
        return torch.full(lead, -math.inf, dtype=wd, device=xv.device)
    out = torch.empty(lead, dtype=wd, device=xv.device)
    for sl, x2, m2 in _blocks(xv, mv):
        s = row_stats(x2, m2, True)
        _store(out[sl], lse_of(s))
    return out


def softmax_bwd(y: Tensor, g: Tensor, dx: Tensor) -> Tensor:
    """dx = y * (g - sum(g * y)), formed in working precision, for (*lead, V) views."""
    if y.numel() == 0:
        return dx
    wd = working_dtype(y.dtype)
    for sl in iter_row_blocks(tuple(y.shape[:-1]), y.shape[-1]):
        y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
        s = (g2 * y2).sum(dim=1, keepdim=True)
        _store(dx[sl], y2 * (g2 - s))
    return dx


def log_softmax_bwd(y: Tensor, g: Tensor, mv: Tensor | None, dx: Tensor) -> Tensor:
    """dx = g - exp(y) * sum(g); entries excluded by ``mask`` get 0."""
    if y.numel() == 0:
        return dx
    wd = working_dtype(y.dtype)
    for sl in iter_row_blocks(tuple(y.shape[:-1]), y.shape[-1]):
        y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
        res = g2 - torch.exp(y2) * g2.sum(dim=1, keepdim=True)
        if mv is not None:
            res = res.masked_fill_(~as_rows(mv[sl]), 0.0)
        _store(dx[sl], res)
    return dx


def lse_bwd(xv: Tensor, lse: Tensor, g: Tensor, mv: Tensor | None, dx: Tensor) -> Tensor:
    """dx = g * exp(x - lse) with ``lse`` and ``g`` of shape lead; masked or all -inf rows get 0."""
    if xv.numel() == 0:
        return dx
    wd = working_dtype(xv.dtype)
    for sl in iter_row_blocks(tuple(xv.shape[:-1]), xv.shape[-1]):
        x2 = as_rows(xv[sl]).to(wd)
        l2 = lse[sl].reshape(-1, 1).to(wd)
        g2 = g[sl].reshape(-1, 1).to(wd)
        # exp(x - lse) of a row whose lse is -inf is 0/0: such rows have no mass, the gradient is 0.
        l_safe = torch.where(torch.isneginf(l2), torch.zeros_like(l2), l2)
        p = torch.exp(x2 - l_safe)
        if mv is not None:
            p = p.masked_fill_(~as_rows(mv[sl]), 0.0)
        _store(dx[sl], p.mul_(g2))
    return dx
