"""Global (max, rest-sum) row statistics of a class dimension sharded across ranks: two all-reduces.

Math:     pass 1: a_loc = local row max; all-reduce(max) -> a (the global max, NaN rows sent as +inf); ops
          that need class offsets let every rank's local size ride in slots of its own (_comm.max_and_layout).
          pass 2: every rank shifts by the *global* a, so each exp(x_j - a) is bit-for-bit the single-process
          value; the rank(s) whose local max equals a drop one argmax entry from their local rest sum and
          send holds = 1; one packed all-reduce(sum) of [r_loc, holds, has_nan, per-op columns..., scalars]
          gives r = sum r_loc + (sum holds - 1): ties across ranks add back exactly 1 each, and a confident
          row's rest sum never meets the max's 1, so its loss stays 2e-9, not 0.
Traffic:  2 all-reduces of M (+ 2 per rank) and M * (3 + k) + s values; nothing of size V crosses the network.
Numerics: elementwise work follows reference/plain.py exactly (working precision, fp32 TwoSum shift);
          partial sums travel in float64, so the only difference from one process is the summation order
          of r (rounded once back to the working precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..reference.plain import as_rows, exp_and_deep, iter_row_blocks, two_diff, working_dtype
from . import _comm

ACC = torch.float64  # dtype of partial sums on the wire: exact enough that only the order differs


def shifted_parts(xw: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(d_hi, d_lo, exp(d), deep) of a working-precision (R, V) block shifted by a (R, 1), as plain.row_stats;
    for float32 work ``deep`` is plain.deep_terms' 2**64 exp(d) of the entries below exp(-80) (0 elsewhere),
    whose exp(d) in the third tensor is rounded once from it; None for float64."""
    a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
    if xw.dtype == torch.float32:
        d_hi, d_lo = two_diff(xw, a_safe)
        e, es = exp_and_deep(d_hi, d_lo)  # exp(hi) (1 + lo) to first order: the shift loses nothing
        return d_hi, d_lo, e, es
    d_hi = xw - a_safe
    return d_hi, None, torch.exp(d_hi), None


def shifted(xw: Tensor, a: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """(d_hi, d_lo, exp(d)) of ``shifted_parts``."""
    return shifted_parts(xw, a)[:3]


def rest_sum(rest: Tensor, es: Tensor | None) -> Tensor:
    """Row sums (ACC) of the rest terms ``rest`` (R, V), the deep ones from their scaled ``es`` when given."""
    if es is None:
        return rest.sum(dim=1, dtype=ACC)
    return torch.where(es > 0, 0.0, rest).sum(dim=1, dtype=ACC) + es.sum(dim=1, dtype=ACC) * 2.0**-64


def full_d(d_hi: Tensor, d_lo: Tensor | None) -> Tensor:
    return d_hi if d_lo is None else d_hi + d_lo


class Block(NamedTuple):
    """What a per-op hook sees in pass 2 for one block of rows (all (R, V_local) or (R, 1))."""

    sl: tuple
    xw: Tensor
    d_hi: Tensor
    d_lo: Tensor | None
    e: Tensor  # exp(d), the argmax entry still in


class RowStats(NamedTuple):
    """Global per-row statistics (shape ``lead``, working precision) plus the op's reduced columns."""

    a: Tensor  # global max; +inf for NaN rows
    r: Tensor  # global rest sum
    L: Tensor  # log1p(r); NaN where softmax is NaN
    lse: Tensor  # a + L with the plain.lse_of conventions; NaN where the row has a NaN
    cols: Tensor | None  # (*lead, k) float64, the summed per-op columns
    scalars: Tensor | None  # (s,) float64, the summed per-op scalars


def prepare(xv: Tensor, mv: Tensor | None, cap: Callable[[Tensor], Tensor] | None = None):
    """Row blocks of the (*lead, V_local) view as working-precision (R, V_local) tensors (masked -> -inf)."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    for sl in iter_row_blocks(lead, V):
        x2 = as_rows(xv[sl])
        if cap is not None:
            x2 = cap(x2)
        xw = x2.to(wd)
        if mv is not None:
            xw = xw.masked_fill(~as_rows(mv[sl]), -math.inf)  # masked entries (NaN included) leave the row
        yield sl, xw


class RowMax(NamedTuple):
    """Pass 1's result: the local and the global row max, and the shard with its layout resolved."""

    a_loc: Tensor  # this rank's row max (working precision); NaN rows NaN, empty shard -inf
    a: Tensor  # the global max; +inf for NaN rows
    shard: _comm.Shard | None


def global_max(
    xv: Tensor,
    mv: Tensor | None,
    group,
    cap: Callable[[Tensor], Tensor] | None = None,
    shard: _comm.Shard | None = None,
) -> RowMax:
    """Pass 1, the first all-reduce; it also carries the local sizes when ``shard`` has no start yet."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    # Pass 1: local max. An empty shard has max -inf; a NaN row is sent as +inf (MAX does not order NaN).
    a_loc = torch.full(lead, -math.inf, dtype=wd, device=xv.device)
    if V > 0:
        for sl, xw in prepare(xv, mv, cap):
            a_loc[sl] = xw.amax(dim=1).view(a_loc[sl].shape)
    a = torch.where(torch.isnan(a_loc), torch.full_like(a_loc, math.inf), a_loc)
    if shard is None:
        _comm.all_reduce(a, "max", group)
    else:
        shard = _comm.max_and_layout(a, shard, group)
    return RowMax(a_loc, a, shard)


def global_stats(
    xv: Tensor,
    mv: Tensor | None,
    masked: bool,
    group,
    hook: Callable[[Block], Tensor] | None = None,
    n_cols: int = 0,
    scalars: Tensor | None = None,
    cap: Callable[[Tensor], Tensor] | None = None,
    m: RowMax | None = None,
) -> RowStats:
    """The two all-reduces (only the second when pass 1's ``m`` is given, from ``global_max``). ``hook``
    returns (R, n_cols) float64 columns per block, summed across ranks."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    dev = xv.device
    wd = working_dtype(xv.dtype)
    if m is None:
        m = global_max(xv, mv, group, cap)
    a_loc, a = m.a_loc, m.a
    has_nan = torch.isnan(a_loc)

    # Pass 2: rest sums under the global shift, and the op's columns.
    k = 3 + n_cols
    n_s = 0 if scalars is None else scalars.numel()
    buf = torch.zeros(math.prod(lead) * k + n_s, dtype=ACC, device=dev)
    cols = buf[: buf.numel() - n_s].view(*lead, k)
    holds = (a_loc == a) & torch.isfinite(a)
    cols[..., 1] = holds.to(ACC)
    cols[..., 2] = has_nan.to(ACC)
    if V > 0:
        for sl, xw in prepare(xv, mv, cap):
            a2 = a[sl].reshape(-1, 1)
            d_hi, d_lo, e, es = shifted_parts(xw, a2)
            blk = Block(sl, xw, d_hi, d_lo, e)
            out = cols[sl]
            if hook is not None:
                out[..., 3:] = hook(blk).view(*out.shape[:-1], n_cols)
            h2 = holds[sl].reshape(-1, 1)
            idx = xw.argmax(dim=1, keepdim=True)
            # Drop the max's own exp(0) = 1 on the rank(s) holding the global max: the rest sum keeps
            # everything that 1 + r would round away.
            rest = e.scatter(1, idx, torch.where(h2, torch.zeros_like(h2, dtype=e.dtype), e.gather(1, idx)))
            out[..., 0] = rest_sum(rest, es).view(out.shape[:-1])  # deep terms (never the max) scaled
    if n_s:
        buf[buf.numel() - n_s :] = scalars.to(ACC)
    _comm.all_reduce(buf, "sum", group)

    # Ties across ranks: every holder dropped one 1, only one should have.
    r = (cols[..., 0] + (cols[..., 1] - 1.0).clamp_(min=0.0)).to(wd)
    L = torch.log1p(r)
    bad = torch.isposinf(a) if masked else torch.isinf(a)
    L = torch.where(bad, torch.full_like(L, math.nan), L)
    a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
    lse = torch.where(torch.isinf(a), a, a_safe + L)
    lse = torch.where(cols[..., 2] > 0, torch.full_like(lse, math.nan), lse)
    out_cols = cols[..., 3:] if n_cols else None
    out_s = buf[buf.numel() - n_s :] if n_s else None
    return RowStats(a, r, L, lse, out_cols, out_s)


def row_blocks(xv: Tensor, mv: Tensor | None, cap: Callable[[Tensor], Tensor] | None = None):
    """Pass-3 / backward helper: (sl, xw) blocks; an empty shard yields nothing."""
    if xv.shape[-1] == 0:
        return iter(())
    return prepare(xv, mv, cap)
