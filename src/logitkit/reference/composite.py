"""Composite implementations for torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, vmap).

Only differentiable, batchable torch ops: no autograd.Function, no host syncs, no branching on tensor values,
so torch.func differentiates (forward and reverse, to any order) and vmaps these natively. functional.py
routes here while a transform is active (``_config.transforms_active``); the ordinary path never does.

Math:     per row (the reduced dim moved last) a = max(x), held constant (every output is invariant to the
          shift, so its derivative is 0 at every order); d = x - a; k = one argmax; s = sum over j != k of
          exp(d_j). Two forms of the rest sum, equal in value, differing in what autodiff forms from them:
          r = s + expm1(d_k) (expm1(d_k) is exactly 0 but carries the max's own exp(d_k) derivative: the
          derivatives of the full sum), and r_k = s * exp(-d_k) (= sum over j != k of exp(x_j - x_k)).
          lse = a + log1p(r);  log_softmax = d - log1p(r), and -log1p(r_k) at k;  softmax = exp(d) / (1 + r),
          and 1 / (1 + r_k) at k. At the max, autodiff of the first forms would give 1 - p_k, which cancels
          on a confident row; the r_k forms give products (r / (1 + r) for log_softmax: a confident row's
          cross-entropy gradient at its target is -2e-9, not 0), and the first forms give
          p_j = exp(d_j) / (1 + r) directly (no 1 - (1 - p) on flat rows).
Numerics: as plain.row_stats' general route: float32 working precision for fp16/bf16, x - a as TwoSum
          hi + lo for float32 (lo a constant: a rounding error has derivative 0), float64 for float64.
          Special rows (NUMERICS.md): with a shift of 0 (finfo.max for a +inf max) the formulas give lse
          -inf / +inf / NaN and torch's gradient exp(x - lse) (NaN on all -inf rows, 0 off the infinities of
          a +inf row); softmax / log_softmax rows that are NaN are multiplied by a NaN constant, so their
          gradients are NaN as torch's. mask= rows with nothing left become constants (gradient 0).
Cost:     unfused torch ops: ten to fifteen elementwise passes over the logits, and autograd keeps several
          (M, V) intermediates; ``linear_ce`` materialises the (M, V) logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import mean_denom
from .plain import deep_terms, rest_sum_dtype, working_dtype


class Rows(NamedTuple):
    """Per-row state of a (..., V) tensor, V >= 1, in working precision."""

    d: Tensor  # x - a_safe (the rounded hi part for float32)
    lo: Tensor | None  # TwoSum low part of x - a_safe (float32 only), a constant
    e: Tensor  # exp(d)
    others: Tensor  # (..., V) bool, False at the argmax k
    r: Tensor  # (..., 1) rest sum, with the full sum's derivatives
    L: Tensor  # (..., 1) log1p(r)
    r_k: Tensor  # (..., 1) rest sum relative to x_k (same value as r)
    L_k: Tensor  # (..., 1) log1p(r_k)
    a_safe: Tensor  # (..., 1) the shift, a constant
    nan_row: Tensor  # (..., 1) 1, or NaN on rows whose softmax is NaN (all -inf without mask=, +inf, NaN)
    empty: Tensor | None  # (..., 1) mask= rows with nothing left


def rows(xv: Tensor, mv: Tensor | None = None, masked: bool = False) -> Rows:
    """Row statistics of ``xv`` (..., V) along the last dim; ``masked``: mask= semantics for empty rows."""
    wd = working_dtype(xv.dtype)
    x = xv.to(wd)
    if mv is not None:
        x = x.masked_fill(~mv, -math.inf)  # masked entries (NaN and +inf included) leave the row
    a = x.detach().amax(-1, keepdim=True)
    empty = None
    if masked:
        empty = torch.isneginf(a)
        # Rows with nothing left are computed on zeros and replaced by constants: no NaN, gradient 0.
        x = torch.where(empty, 0.0, x)
        a = torch.where(empty, 0.0, a)
    # A -inf max shifts by 0 (1 + r is then 0: lse -inf, gradient 0/0 = NaN as torch); a +inf max by the
    # largest finite value, so that finite entries get exp(d) = 0 (torch's exp(x - inf)); NaN stays NaN.
    a_safe = torch.where(torch.isposinf(a), torch.finfo(wd).max, torch.where(torch.isneginf(a), 0.0, a))
    d = x - a_safe
    lo = None
    if xv.dtype == torch.float32:
        # Knuth's TwoSum on constants: x - a = d + lo exactly (a rounded d costs |d| u in exp(d)).
        xd = x.detach()
        bp = (xd - a_safe) - xd
        lo = (xd - ((xd - a_safe) - bp)) - (a_safe + bp)
        lo = torch.where(torch.isfinite(lo), lo, 0.0)
    k = x.detach().argmax(-1, keepdim=True)
    e = torch.exp(d)
    if lo is not None:
        # exp(hi + lo) = exp(hi) (1 + lo) to first order; skipped on rows with an infinite max (inf * 0).
        e = torch.where(torch.isfinite(a), e + e * lo, e)
    others = torch.arange(x.shape[-1], device=x.device) != k
    # The rest sum leaves out the max's exp(0) = 1, so nothing small is lost against it.
    if wd == torch.float32:
        # Terms below exp(-80) keep a few bits in float32 (the underflow edge): formed scaled by 2**64 and summed
        # apart (plain.deep_terms, whose ops autograd and vmap go through), in float64 where available.
        deep, es = deep_terms(d, lo)
        e = torch.where(deep, es * 2.0**-64, e)
        acc = rest_sum_dtype(wd, x.device)
        s = (torch.where(others & ~deep, e, 0.0).sum(-1, keepdim=True, dtype=acc)
             + es.sum(-1, keepdim=True, dtype=acc) * 2.0**-64).to(wd)
    else:
        s = torch.where(others, e, 0.0).sum(-1, keepdim=True)
    d_k = d.gather(-1, k)  # exactly 0 where the max is finite (-inf, +inf or NaN on the special rows)
    r = s + torch.expm1(d_k)
    r_k = s * torch.exp(-d_k)
    bad = torch.isposinf(a) | torch.isnan(a)
    if not masked:
        bad = bad | torch.isneginf(a)
    nan_row = torch.where(bad, math.nan, 1.0).to(wd)
    return Rows(d, lo, e, others, r, torch.log1p(r), r_k, torch.log1p(r_k), a_safe, nan_row, empty)


def log_softmax_of(s: Rows, mv: Tensor | None = None) -> Tensor:
    # d and -L are both <= 0: no cancellation. Times 1 per row (NaN on NaN rows, so their gradient is NaN).
    y = s.d - s.L
    if s.lo is not None:
        y = y + s.lo
    y = torch.where(s.others, y, -s.L_k) * s.nan_row
    if mv is not None:
        y = torch.where(mv, y, -math.inf * s.nan_row)  # masked outputs are constants
    if s.empty is not None:
        y = torch.where(s.empty, -math.inf, y)
    return y


def softmax_of(s: Rows) -> Tensor:
    # a true division: one rounding per entry
    p = torch.where(s.others, s.e / (1.0 + s.r), 1.0 / (1.0 + s.r_k)) * s.nan_row
    if s.empty is not None:
        p = torch.where(s.empty, 0.0, p)
    return p


def lse_of(s: Rows) -> Tensor:
    out = s.a_safe + s.L
    if s.empty is not None:
        out = torch.where(s.empty, -math.inf, out)
    return out


def normalize(x: Tensor, dim: int, mask: Tensor | None, log: bool) -> Tensor:
    """softmax / log_softmax of ``x`` along ``dim`` (``mask`` expanded to ``x.shape``), in ``x``'s dtype."""
    if x.shape[dim] == 0:
        return x * 1.0
    xv = x.movedim(dim, -1)
    mv = None if mask is None else mask.movedim(dim, -1)
    s = rows(xv, mv, mask is not None)
    y = log_softmax_of(s, mv) if log else softmax_of(s)
    return y.to(x.dtype).movedim(-1, dim)


def lse(x: Tensor, dim: int, mask: Tensor | None) -> Tensor:
    """logsumexp of ``x`` along ``dim``, keeping ``dim`` (size 1), in ``x``'s dtype."""
    wd = working_dtype(x.dtype)
    if x.shape[dim] == 0:
        return (x.to(wd).sum(dim, keepdim=True) - math.inf).to(x.dtype)
    xv = x.movedim(dim, -1)
    mv = None if mask is None else mask.movedim(dim, -1)
    return lse_of(rows(xv, mv, mask is not None)).to(x.dtype).movedim(-1, dim)


def capped(xv: Tensor, softcap: float | None) -> Tensor:
    """softcap * tanh(x / softcap) in working precision (x itself when softcap is None).

    The value is torch.tanh's; the derivative (any order, forward or reverse) comes from
    (1 - e) / (1 + e), e = exp(-2|u|), whose autograd slope 4 e / (1 + e)^2 has no subtraction: tanh's own
    1 - tanh^2 cancels where tanh saturates (reference/losses.cap_slope).
    """
    if softcap is None:
        return xv
    u = xv.to(working_dtype(xv.dtype)) / softcap
    ep = torch.exp(-2.0 * u.clamp(min=0.0))  # one branch per sign, so neither exp overflows
    en = torch.exp(2.0 * u.clamp(max=0.0))
    smooth = torch.where(u >= 0, (1.0 - ep) / (1.0 + ep), (en - 1.0) / (en + 1.0))
    return (torch.tanh(u).detach() + (smooth - smooth.detach())) * softcap


def _entropy_rows(y: Tensor) -> Tensor:
    p = torch.exp(y)
    # 0 log 0 = 0 with a finite factor on both sides (p * where(p > 0, y, 0)): where(p > 0, p * y, 0) would
    # send 0 * -inf = NaN back at -inf logits. A NaN row keeps p NaN, so H stays NaN.
    return -(p * torch.where(p > 0, y, 0.0)).sum(-1)


def _reduce(per_row: Tensor, denom: Tensor | float, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / denom


def ce_index(xv: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
             label_smoothing: float, z_loss: float, softcap: float | None,
             with_entropy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy for class indices, ``xv`` (*lead, C) class dim last, ``target`` (*lead,) int64.

    Returns (loss reduced as asked, per-row lse, per-row entropy or an empty tensor), as
    CrossEntropyFunction; lse and entropy are detached. 'mean' divides by the counted rows' weight sum.
    """
    wd = working_dtype(xv.dtype)
    C = xv.shape[-1]
    eps = label_smoothing
    xc = capped(xv, softcap)
    s = rows(xc)
    y = log_softmax_of(s)
    lse_row = lse_of(s).squeeze(-1)
    valid = target != ignore_index
    t_safe = torch.where(valid, target, 0)
    w = None if weight is None else weight.to(wd)
    w_t = torch.ones(target.shape, dtype=wd, device=xv.device) if w is None else w[t_safe]
    w_t = torch.where(valid, w_t, 0.0)
    # ignored rows give 0 even when their placeholder class 0 holds -inf (0 * inf would be NaN)
    row = torch.where(valid, -(1.0 - eps) * w_t * y.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1), 0.0)
    if eps > 0.0:
        wy = (y * w).sum(-1) if w is not None else y.sum(-1)
        row = row - torch.where(valid, (eps / C) * wy, 0.0)
    if z_loss != 0.0:
        row = row + torch.where(valid, z_loss * lse_row * lse_row, 0.0)
    loss = _reduce(row, mean_denom(w_t.sum(), eps), reduction)
    ent = _entropy_rows(y).detach() if with_entropy else xv.new_empty(0, dtype=wd)
    return loss, lse_row.detach(), ent


def ce_prob(xv: Tensor, target: Tensor, weight: Tensor | None, reduction: str, label_smoothing: float,
            z_loss: float, softcap: float | None, with_entropy: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Cross-entropy for class probabilities (``target`` shaped as ``xv``); differentiable in both.

    'mean' divides by the number of rows, as torch.
    """
    wd = working_dtype(xv.dtype)
    C = xv.shape[-1]
    xc = capped(xv, softcap)
    s = rows(xc)
    y = log_softmax_of(s)
    lse_row = lse_of(s).squeeze(-1)
    q = target.to(wd)
    if label_smoothing > 0.0:
        q = q * (1.0 - label_smoothing) + label_smoothing / C
    wq = q * weight.to(wd) if weight is not None else q
    # -sum_j w_j q_j y_j: terms of one sign for q, w >= 0. A -inf logit with q = 0 gives NaN, as torch.
    row = -(wq * y).sum(-1)
    if z_loss != 0.0:
        row = row + z_loss * lse_row * lse_row
    loss = _reduce(row, float(math.prod(xv.shape[:-1])), reduction)
    ent = _entropy_rows(y).detach() if with_entropy else xv.new_empty(0, dtype=wd)
    return loss, lse_row.detach(), ent


def selective(xv: Tensor, index: Tensor) -> Tensor:
    """log_softmax(x, -1).gather(-1, index), in ``xv``'s dtype (the full log-softmax is formed)."""
    return log_softmax_of(rows(xv)).gather(-1, index).to(xv.dtype)


def entropy(xv: Tensor) -> Tensor:
    """Shannon entropy of softmax(x) along the last dim; float32 for half inputs."""
    if xv.shape[-1] == 0:
        return xv.to(working_dtype(xv.dtype)).sum(-1)
    return _entropy_rows(log_softmax_of(rows(xv)))


def linear_ce(x2: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
              weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
              softcap: float | None, prob: bool, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """linear_cross_entropy through the (M, V) logits ``x2 @ W.T (+ b)``: no chunking, no memory saving."""
    logits = F.linear(x2, linear_weight, linear_bias)
    if prob:
        return ce_prob(logits, target, weight, reduction, label_smoothing, z_loss, softcap, with_entropy)
    return ce_index(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    with_entropy)
