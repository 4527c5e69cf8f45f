"""Cross-entropy (class indices and class probabilities), selective log-softmax and entropy over (M, V) rows.

Math:     per row a = max(x), r = rest sum (exp(x - a) over all entries but one argmax), L = log1p(r),
          lse = a + L, p = exp(x - a) / (1 + r).
          Class indices: loss = (1 - eps) w_t (L - d_t) + (eps / V) (L W - sum_j w_j d_j) + z lse^2;
          dx_j = s (c1 p_j - (eps / V) w_j) off target, c1 = (1 - eps) w_t + (eps / V) W + 2 z lse;
          at the target hard (p_t - 1) + (c1 - hard) p_t - (eps / V) w_t with hard = (1 - eps) w_t.
          Softcap: x -> cap tanh(x / cap) on load; the gradient is multiplied by sech^2(x / cap), formed as
          4 e / (1 + e)^2 with e = exp(-2|x| / cap) from the raw block read again (L1/L2), not as
          1 - (x_capped / cap)^2, which cancels where tanh saturates.
          Probabilities (y smoothed, wy = w y): loss = L sum(wy) - sum(wy d) + z lse^2; dx = s (c1 p - wy),
          c1 = sum(wy) + 2 z lse.  Selective: out_k = d[i_k] - L; dx = G_match (1 - p) - p (G - G_match).
          Entropy: H = L - sum p d (two non-negative terms); dH/dx = -p (d - L + H).
Traffic:  one program per row.  A row that fits one block (V <= BLOCK_V) is read once and, with the gradient
          fused, written once.  A longer row is read twice (the online (max, rest) pass, then the gradient
          pass, whose second read comes from L2 while few rows are in flight) and written once; the second
          pass takes the blocks last first when the rows in flight outgrow the L2 (_tuning.py "second-pass
          order": the re-reads then start with the most recently read lines).  Forward only
          writes fp32 per-row loss / lse (/ entropy); nothing of size M * V besides the gradient.
Numerics: fp32 working precision (no float64 on the GPU); for fp32 (or softcapped) logits d = x - a is carried
          as hi + lo (TwoSum) and exp(d) = exp(hi) (1 + lo).  The rest sum is carried scaled, R = 2**64 r, its
          terms 2**64 exp(d) formed accurately also where exp(d) is subnormal (_lib.exp_scaled), so a confident
          row's loss (= r) keeps its bits down to 2**-149; p = 2**64 exp(d) / (2**64 + R), a true division
          rounded once.  A looped row merges its blocks' states with compensation (_lib.merge_state_comp)
          and sums its per-block sum p d / sum w d / sum wy with TwoSum, so it rounds about once however many
          blocks it has; sum p d is formed scaled, as sum 2**64 exp(d) d / (2**64 + R), so rows whose p are
          subnormal keep an accurate entropy.  L - d_t and d - L are formed with TwoSum and rounded once.
          The target gradient p_t - 1 is -r / (1 + r) when x_t is a maximum (exact, never softmax_t - 1,
          which cancels) and p - 1 otherwise (p_t <= 1/2 there: no cancellation); row offsets in int64
          (M * V may exceed 2**31).
          exp / log1p / tanh / division come from _lib.py: libdevice on CUDA (tl.exp is ex2.approx after a
          rounded multiply, |x| ulps off), float64 NumPy in the interpreter (NumPy's float32 exp is 2.3 ulp off).
Special:  a row with NaN or +-inf maximum gets L = NaN (loss and gradient NaN, lse = the infinite max), as the
          reference path and torch; a -inf logit at the target gives loss +inf; ignored rows get loss 0 and a
          zero gradient (NaN where their L is NaN, as torch's 0 * softmax).  Out-of-range class indices are
          checked by the caller (``_validate``); the kernel clamps them to 0 so it never reads out of bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _tuning
from ._lib import (
    FP_OPTIONS,
    TWO_64,
    TWO_M64,
    chunk_start,
    div_rn,
    exp_acc,
    exp_scaled,
    log1p_acc,
    merge_state_comp,
    round_to,
    tanh_acc,
    to_f32,
    two_diff,
    two_sum,
)

# ---------------------------------------------------------------------------------------------------------
# Configs: the block/warp table is the "# cross-entropy" section of _tuning.py
# ---------------------------------------------------------------------------------------------------------


def _block_config(V: int, device_type: str) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V classes (tests force small blocks with _tuning.force_cross_entropy)."""
    return _tuning.cross_entropy_config(V, device_type)


# ---------------------------------------------------------------------------------------------------------
# Row state helpers.  Generic pieces (TwoSum, accurate exp / log1p / tanh / division, the interpreter's
# rounding casts) come from _lib.py.  The state differs from _lib's tile_state_scaled / merge_state_scaled in
# one way: the rest sum is carried scaled, R = 2**64 r (exact), with terms from exp_scaled, because these kernels return
# fp32 losses whose targets hold down to subnormal values (a confident row's loss is r itself): unscaled, every
# term below e**-87 would be rounded to a multiple of 2**-149 before the sum (NUMERICS.md underflow family).
# Empty state (-inf, 0); a NaN in the row makes R NaN and it stays NaN through merges.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _load_row_block(x_ptr, cols, mask, cap, HAS_CAP: tl.constexpr):
    """A block of logits in fp32, -inf past the row end, softcapped when asked."""
    x = to_f32(tl.load(x_ptr + cols, mask=mask, other=float("-inf")))
    if HAS_CAP:
        x = tl.where(mask, cap * tanh_acc(div_rn(x, cap)), float("-inf"))
    return x


@triton.jit
def _cap_slope(x_row, cols, mask, cap):
    """d/dx cap tanh(x / cap) = sech^2(u) = 4 e / (1 + e)^2 with e = exp(-2|u|), u = x / cap, from the raw
    logits read again (the block just loaded: an L1/L2 hit, before any gradient store over it): 1 - tanh^2 of
    the rounded tanh cancels where tanh saturates (100 ulp at u = 3, 0 instead of 4e-8 past u = 9)."""
    u = div_rn(to_f32(tl.load(x_row + cols, mask=mask, other=0.0)), cap)
    e = exp_acc(-2.0 * tl.abs(u))
    return div_rn(4.0 * e, (1.0 + e) * (1.0 + e))


@triton.jit
def _shift(x, a, EXACT: tl.constexpr):
    """x - a as hi + lo: exactly (TwoSum) for fp32 / capped logits; half logits' difference is exact already."""
    if EXACT:
        hi, lo = two_diff(x, a)
    else:
        hi = x - a
        lo = tl.zeros_like(hi)
    return hi, lo


@triton.jit
def _prob(hi, lo, R, L):
    """p = exp(d) / (1 + r) as 2**64 exp(d) / (2**64 + R): a true division of normal numbers, rounded once
    (also where p is subnormal); NaN on rows whose L is NaN."""
    p, _ = _prob_scaled(hi, lo, R, L)
    return p


@triton.jit
def _prob_scaled(hi, lo, R, L):
    """(p, e = 2**64 exp(d)): e keeps the bits p loses where p is subnormal (sum p d is formed from it)."""
    e = exp_scaled(hi, lo)
    p = div_rn(e, TWO_64 + R)
    return tl.where(L == L, p, float("nan")), e


@triton.jit
def _pd_sum(e, d):
    """sum e d = 2**64 sum exp(d) d of a block (<= 0): scaled, so terms whose p is subnormal keep their bits
    (an entropy of 1e-36 came out 4000 eps off from p d rounded to multiples of 2**-149); e = 0 at -inf logits,
    where e d would be NaN."""
    return tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)


@triton.jit
def _pd_finish(spd, R):
    """sum p d from the scaled sum: one division by 2**64 + R (p's own denominator), rounded once."""
    return div_rn(spd, TWO_64 + R)


@triton.jit
def _acc(s, c, b):
    """Compensated running sum (s + c) += b over a row's blocks: each addition's rounding error goes into c
    (TwoSum), so 64 blocks round once instead of 64 times. An infinite sum (sum w d at a -inf logit) keeps c:
    TwoSum's error term is NaN there (inf - inf), and the total is the infinity anyway."""
    t, e = two_sum(s, b)
    return t, c + tl.where(tl.abs(t) < float("inf"), e, 0.0)


@triton.jit
def _block_state(x, EXACT: tl.constexpr):
    """(max, scaled rest sum R) of one block; R leaves out one copy of the maximum's exp(0) = 1."""
    isnan = x != x
    xs = tl.where(isnan, float("-inf"), x)  # max ignores NaN the same way on the GPU and in the interpreter
    m = tl.max(xs, axis=0)
    m_ref = tl.where(tl.abs(m) < float("inf"), m, 0.0)  # an infinite max: shift by 0, the row is NaN anyway
    hi, lo = _shift(xs, m_ref, EXACT)
    top = xs == m
    # ties with the max count 1 each (minus the one kept out); the others add 2**64 exp(x - m)
    rest = tl.sum(tl.where(top, 0.0, exp_scaled(hi, lo)), axis=0)
    rest += (tl.sum(top.to(tl.float32), axis=0) - 1.0) * TWO_64
    rest = tl.where(m == float("-inf"), 0.0, rest)  # an empty (all -inf) block: the state (-inf, 0)
    return m, tl.where(tl.sum(isnan.to(tl.int32), axis=0) > 0, float("nan"), rest)


@triton.jit
def _finish(a, R):
    """(a_ref, L, lse): L = log1p(r), NaN for a NaN or infinite max; lse = the infinite max or a + L."""
    r = R * TWO_M64  # rounded once where r is subnormal; log1p(r) = r there
    bad = (R != R) | (tl.abs(a) == float("inf"))
    L = tl.where(bad, float("nan"), log1p_acc(tl.maximum(r, 0.0)))
    a_ref = tl.where(tl.abs(a) < float("inf"), a, 0.0)
    lse = tl.where((R == R) & (tl.abs(a) == float("inf")), a, a + L)
    return a_ref, L, lse


@triton.jit
def _merge_comp(a, R, C, m, Rm):
    """Online merge of a block's scaled state into a compensated row state (a, R + C), the scale
    exp(a_lo - a_hi) always accurate (exact maxima difference for half logits, TwoSum-carried for fp32 ones).
    The merge's roundings go into C (_lib.merge_state_comp), so a row of many blocks rounds its rest sum about
    once (before 2026-12-07: once per block, 7.5 ulps of fp32 lse at 513 blocks)."""
    return merge_state_comp(a, R, C, m, Rm, 0.0, True)


@triton.jit
def _row_stats(x_row, V, cap, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr, EXACT: tl.constexpr):
    """Online (max, scaled rest) over a whole row, BLOCK_V entries at a time, the rest sum compensated."""
    a = float("-inf")
    R = 0.0
    C = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, cap, HAS_CAP)
        m, Rm = _block_state(x, EXACT)
        a, R, C = _merge_comp(a, R, C, m, Rm)
    return a, R + C


@triton.jit
def _minus(u, hi, lo):
    """u - (hi + lo) rounded once (TwoSum of u - hi, then the small parts)."""
    s, e = two_diff(u, hi)
    return s + (e - lo)


# ---------------------------------------------------------------------------------------------------------
# Class-index cross-entropy
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _row_coeffs(w_t, W, valid, eps, V, z, lse, HAS_EPS: tl.constexpr, HAS_Z: tl.constexpr):
    """(eps / V, hard = (1 - eps) w_t, c1 = hard + (eps / V) W + 2 z lse) of a row; c1 = 0 on ignored rows."""
    eps_over_v = div_rn(eps, V * 1.0)
    hard = (1.0 - eps) * w_t
    c1 = hard
    if HAS_EPS:
        c1 = c1 + eps_over_v * W
    if HAS_Z:
        c1 = c1 + 2.0 * z * lse
    return eps_over_v, hard, tl.where(valid, c1, 0.0)


@triton.jit
def _ce_block(x, x_row, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard, eps_over_v, cap,
              HAS_W: tl.constexpr, HAS_EPS: tl.constexpr, HAS_CAP: tl.constexpr, EXACT: tl.constexpr):
    """One block's (unscaled gradient, sum w d, 2**64 sum p d (1 + r)) given the row's final (a, r, L)."""
    hi, lo = _shift(x, a_ref, EXACT)
    p, e = _prob_scaled(hi, lo, r, L)
    d = hi + lo
    if HAS_W:
        w = to_f32(tl.load(w_ptr + cols, mask=mask, other=0.0))
    else:
        w = tl.where(mask, 1.0, 0.0)
    swd = tl.sum(tl.where(mask, w * d, 0.0), axis=0)
    spd = _pd_sum(e, d)
    g = c1 * p
    if HAS_EPS:
        g = g - eps_over_v * w
    # p_t - 1: -r / (1 + r) at a maximum (exact), p - 1 elsewhere (p <= 1/2 there: no cancellation)
    pm1 = tl.where(hi == 0.0, -div_rn(r, TWO_64 + r), p - 1.0)
    at_t = hard * pm1 + (c1 - hard) * p
    if HAS_EPS:
        at_t = at_t - eps_over_v * w
    g = tl.where(cols == t, at_t, g)
    # an ignored row's gradient is 0, but NaN where the row's softmax is (a NaN, a +inf, all -inf): as torch's
    # 0 * softmax and the reference path
    g = tl.where(valid, g, tl.where(L == L, 0.0, float("nan")))
    if HAS_CAP:
        g = g * _cap_slope(x_row, cols, mask, cap)
    return g, swd, spd


@triton.heuristics({"HAS_W": lambda a: a["w_ptr"] is not None,
                    "HAS_G": lambda a: a["g_ptr"] is not None,
                    "HAS_DENOM": lambda a: a["denom_ptr"] is not None,
                    "HAS_WSUM": lambda a: a["wsum_ptr"] is not None,
                    "SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _ce_fwd_kernel(
    x_ptr, stride_x_m, t_ptr, w_ptr, wsum_ptr,
    dx_ptr, stride_dx_m, g_ptr, stride_g_m, denom_ptr,
    loss_ptr, lse_ptr, ent_ptr,
    V, ignore_index, eps, z, cap,
    BLOCK_V: tl.constexpr, HAS_W: tl.constexpr, HAS_G: tl.constexpr, HAS_DENOM: tl.constexpr,
    HAS_WSUM: tl.constexpr, SINGLE: tl.constexpr, HAS_EPS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_LOSS: tl.constexpr, HAS_ENT: tl.constexpr,
    EXACT: tl.constexpr, REVERSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    t = tl.where(valid & (t >= 0) & (t < V), t, 0)  # never read out of bounds (range checked by the caller)
    # the target logit is read before any gradient store: dx may alias x (inplace_backward)
    x_t = to_f32(tl.load(x_row + t))
    if HAS_CAP:
        x_t = cap * tanh_acc(div_rn(x_t, cap))

    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
        a, r = _block_state(x, EXACT)
    else:
        a, r = _row_stats(x_row, V, cap, BLOCK_V, HAS_CAP, EXACT)
    a_ref, L, lse = _finish(a, r)

    if HAS_W:
        w_t = tl.where(valid, to_f32(tl.load(w_ptr + t)), 0.0)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    if HAS_WSUM:
        W = to_f32(tl.load(wsum_ptr))
    else:
        W = V * 1.0
    eps_over_v, hard, c1 = _row_coeffs(w_t, W, valid, eps, V, z, lse, HAS_EPS, HAS_Z)
    # gradient scale of this row: upstream g (per row or broadcast) / mean denominator; 0 on ignored rows
    s = 1.0
    if HAS_G:
        s = s * to_f32(tl.load(g_ptr + row * stride_g_m))
    if HAS_DENOM:
        s = div_rn(s, to_f32(tl.load(denom_ptr)))
    s = tl.where(valid, s, 0.0)

    swd = 0.0
    spd = 0.0
    swd_c = 0.0
    spd_c = 0.0
    if SINGLE:
        g, swd, spd = _ce_block(x, x_row, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard, eps_over_v, cap,
                                HAS_W, HAS_EPS, HAS_CAP, EXACT)
        if WRITE_GRAD:
            tl.store(dx_ptr + row * stride_dx_m + cols, round_to(g * s, dx_ptr.dtype.element_ty), mask=mask)
    elif WRITE_GRAD or HAS_EPS or HAS_ENT:
        # second read of the row (from L2 when the row was read recently; last block first when REVERSE),
        # gradient written once
        for start in range(0, V, BLOCK_V):
            cols = chunk_start(0, V, start, BLOCK_V, REVERSE) + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
            g, swd_b, spd_b = _ce_block(x, x_row, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard,
                                        eps_over_v, cap, HAS_W, HAS_EPS, HAS_CAP, EXACT)
            swd, swd_c = _acc(swd, swd_c, swd_b)
            spd, spd_c = _acc(spd, spd_c, spd_b)
            if WRITE_GRAD:
                tl.store(dx_ptr + row * stride_dx_m + cols, round_to(g * s, dx_ptr.dtype.element_ty), mask=mask)
        swd = swd + swd_c
        spd = spd + spd_c

    if WRITE_LOSS:
        # d_t = x_t - a as hi + lo: L - d_t is a sum of two non-negative terms, rounded once
        hi_t, lo_t = _shift(x_t, a_ref, EXACT)
        nll = _minus(L, hi_t, lo_t)
        loss = hard * nll
        if HAS_EPS:
            # sum_j w_j (L - d_j) = L W - sum_j w_j d_j: both terms >= 0 for non-negative weights
            loss = loss + eps_over_v * (L * W - swd)
        if HAS_Z:
            loss = loss + z * lse * lse
        loss = tl.where(valid, loss, 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if HAS_ENT:
            tl.store(ent_ptr + row, L - _pd_finish(spd, r))  # H = L - sum p d, both >= 0


# ---------------------------------------------------------------------------------------------------------
# Class-probability cross-entropy
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W: tl.constexpr, HAS_EPS: tl.constexpr):
    y = to_f32(tl.load(y_row + cols, mask=mask, other=0.0))
    if HAS_EPS:
        y = tl.where(mask, y * (1.0 - eps) + div_rn(eps, V * 1.0), 0.0)
    if HAS_W:
        y = y * to_f32(tl.load(w_ptr + cols, mask=mask, other=0.0))
    return y


@triton.jit
def _ce_prob_block(x, x_row, cols, wy, mask, a_ref, r, L, c1, cap, HAS_CAP: tl.constexpr, EXACT: tl.constexpr):
    hi, lo = _shift(x, a_ref, EXACT)
    p, e = _prob_scaled(hi, lo, r, L)
    d = hi + lo
    # padding lanes count 0; a real -inf logit with probability 0 gives 0 * -inf = NaN, as torch
    swyd = tl.sum(tl.where(mask, wy * d, 0.0), axis=0)
    spd = _pd_sum(e, d)
    g = c1 * p - wy
    if HAS_CAP:
        g = g * _cap_slope(x_row, cols, mask, cap)
    return g, swyd, spd


@triton.heuristics({"HAS_W": lambda a: a["w_ptr"] is not None,
                    "HAS_G": lambda a: a["g_ptr"] is not None,
                    "HAS_DENOM": lambda a: a["denom_ptr"] is not None,
                    "SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _ce_prob_fwd_kernel(
    x_ptr, stride_x_m, y_ptr, stride_y_m, w_ptr,
    dx_ptr, stride_dx_m, g_ptr, stride_g_m, denom_ptr,
    loss_ptr, lse_ptr, ent_ptr,
    V, eps, z, cap,
    BLOCK_V: tl.constexpr, HAS_W: tl.constexpr, HAS_G: tl.constexpr, HAS_DENOM: tl.constexpr,
    SINGLE: tl.constexpr, HAS_EPS: tl.constexpr, HAS_Z: tl.constexpr, HAS_CAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr, WRITE_LOSS: tl.constexpr, HAS_ENT: tl.constexpr,
    EXACT: tl.constexpr, REVERSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    y_row = y_ptr + row * stride_y_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
        a, r = _block_state(x, EXACT)
        wy = _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS)
        swy = tl.sum(wy, axis=0)
    else:
        a = float("-inf")
        r = 0.0
        r_c = 0.0
        swy = 0.0
        swy_c = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            xb = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
            m, rest = _block_state(xb, EXACT)
            a, r, r_c = _merge_comp(a, r, r_c, m, rest)
            swy, swy_c = _acc(swy, swy_c, tl.sum(_ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS),
                                                   axis=0))
        r = r + r_c
        swy = swy + swy_c
    a_ref, L, lse = _finish(a, r)
    c1 = swy
    if HAS_Z:
        c1 = c1 + 2.0 * z * lse
    s = 1.0
    if HAS_G:
        s = s * to_f32(tl.load(g_ptr + row * stride_g_m))
    if HAS_DENOM:
        s = div_rn(s, to_f32(tl.load(denom_ptr)))

    if SINGLE:
        g, swyd, spd = _ce_prob_block(x, x_row, cols, wy, mask, a_ref, r, L, c1, cap, HAS_CAP, EXACT)
        if WRITE_GRAD:
            tl.store(dx_ptr + row * stride_dx_m + cols, round_to(g * s, dx_ptr.dtype.element_ty), mask=mask)
    else:
        swyd = 0.0
        spd = 0.0
        swyd_c = 0.0
        spd_c = 0.0
        for start in range(0, V, BLOCK_V):  # the second read: last block first when REVERSE
            cols = chunk_start(0, V, start, BLOCK_V, REVERSE) + tl.arange(0, BLOCK_V)
            mask = cols < V
            xb = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
            wyb = _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS)
            g, swyd_b, spd_b = _ce_prob_block(xb, x_row, cols, wyb, mask, a_ref, r, L, c1, cap, HAS_CAP, EXACT)
            swyd, swyd_c = _acc(swyd, swyd_c, swyd_b)
            spd, spd_c = _acc(spd, spd_c, spd_b)
            if WRITE_GRAD:
                tl.store(dx_ptr + row * stride_dx_m + cols, round_to(g * s, dx_ptr.dtype.element_ty), mask=mask)
        swyd = swyd + swyd_c
        spd = spd + spd_c
    if WRITE_LOSS:
        # sum_j wy_j (L - d_j) = L sum(wy) - sum(wy d): both terms >= 0 for wy >= 0
        loss = L * swy - swyd
        if HAS_Z:
            loss = loss + z * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if HAS_ENT:
            tl.store(ent_ptr + row, L - _pd_finish(spd, r))


# ---------------------------------------------------------------------------------------------------------
# Selective log-softmax and entropy
# ---------------------------------------------------------------------------------------------------------


@triton.heuristics({"SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _selective_fwd_kernel(
    x_ptr, stride_x_m, idx_ptr, stride_idx_m, out_ptr, stride_out_m, a_ptr, r_ptr,
    V, K,
    BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, 1.0, False)
        a, r = _block_state(x, EXACT)
    else:
        a, r = _row_stats(x_row, V, 1.0, BLOCK_V, False, EXACT)
    a_ref, L, lse = _finish(a, r)
    tl.store(a_ptr + row, a)
    tl.store(r_ptr + row, tl.where(L == L, r, float("nan")))  # NaN r marks a NaN row for the backward
    for k in range(0, K):
        i = tl.load(idx_ptr + row * stride_idx_m + k).to(tl.int64)
        x_i = to_f32(tl.load(x_row + i))
        hi, lo = _shift(x_i, a_ref, EXACT)
        # d - L = -(L - d): two non-positive terms, no cancellation, rounded once
        tl.store(out_ptr + row * stride_out_m + k, -_minus(L, hi, lo))


@triton.jit
def _selective_bwd_kernel(
    x_ptr, stride_x_m, idx_ptr, stride_idx_m, g_ptr, stride_g_m, a_ptr, r_ptr, dx_ptr, stride_dx_m,
    V, K,
    BLOCK_V: tl.constexpr, EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    a = tl.load(a_ptr + row)
    r = tl.load(r_ptr + row)
    a_ref, L, _ = _finish(a, r)  # r: the saved scaled rest sum, NaN on NaN / infinite rows
    G = 0.0
    for k in range(0, K):
        G += to_f32(tl.load(g_ptr + row * stride_g_m + k))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, 1.0, False)
        hi, lo = _shift(x, a_ref, EXACT)
        p = _prob(hi, lo, r, L)
        gm = tl.zeros_like(p)
        for k in range(0, K):
            i = tl.load(idx_ptr + row * stride_idx_m + k)
            gm += tl.where(cols == i, to_f32(tl.load(g_ptr + row * stride_g_m + k)), 0.0)
        # 1 - p: r / (1 + r) at a maximum (exact), 1 - p elsewhere (p <= 1/2 there)
        one_m_p = tl.where(hi == 0.0, div_rn(r, TWO_64 + r), 1.0 - p)
        dx = gm * one_m_p - p * (G - gm)
        dx = tl.where(r == r, dx, float("nan"))
        tl.store(dx_ptr + row * stride_dx_m + cols, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _entropy_fwd_kernel(
    x_ptr, stride_x_m, h_ptr, a_ptr, r_ptr,
    V,
    BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, EXACT: tl.constexpr, REVERSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, 1.0, False)
        a, r = _block_state(x, EXACT)
        a_ref, L, lse = _finish(a, r)
        hi, lo = _shift(x, a_ref, EXACT)
        _, e = _prob_scaled(hi, lo, r, L)
        spd = _pd_sum(e, hi + lo)
    else:
        a, r = _row_stats(x_row, V, 1.0, BLOCK_V, False, EXACT)
        a_ref, L, lse = _finish(a, r)
        spd = 0.0
        spd_c = 0.0
        for start in range(0, V, BLOCK_V):  # the second read: last block first when REVERSE
            cols = chunk_start(0, V, start, BLOCK_V, REVERSE) + tl.arange(0, BLOCK_V)
            x = _load_row_block(x_row, cols, cols < V, 1.0, False)
            hi, lo = _shift(x, a_ref, EXACT)
            _, e = _prob_scaled(hi, lo, r, L)
            spd, spd_c = _acc(spd, spd_c, _pd_sum(e, hi + lo))
        spd = spd + spd_c
    # H = L + sum p |d|: two non-negative terms; a NaN row (L NaN) stays NaN
    tl.store(h_ptr + row, L - _pd_finish(spd, r))
    tl.store(a_ptr + row, a)
    tl.store(r_ptr + row, tl.where(L == L, r, float("nan")))


@triton.jit
def _entropy_bwd_kernel(
    x_ptr, stride_x_m, g_ptr, h_ptr, a_ptr, r_ptr, dx_ptr, stride_dx_m,
    V,
    BLOCK_V: tl.constexpr, EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    a = tl.load(a_ptr + row)
    r = tl.load(r_ptr + row)
    H = tl.load(h_ptr + row)
    g = to_f32(tl.load(g_ptr + row))
    a_ref, L, _ = _finish(a, r)  # r: the saved scaled rest sum, NaN on NaN / infinite rows
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, 1.0, False)
        hi, lo = _shift(x, a_ref, EXACT)
        p = _prob(hi, lo, r, L)
        logp = -_minus(L, hi, lo)
        dx = tl.where(p > 0.0, -g * p * (logp + H), 0.0)  # dH/dx = -p (log p + H); -inf logits: 0
        dx = tl.where(r == r, dx, float("nan"))
        tl.store(dx_ptr + row * stride_dx_m + cols, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Gradient scaling by a device scalar (backward of the fused path)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_scale_kernel(dx_ptr, stride_dx_m, g_ptr, V, BLOCK: tl.constexpr):
    g = to_f32(tl.load(g_ptr))
    if g != 1.0:  # loss.backward() passes 1: every program returns after one scalar load, no host sync
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        ptr = dx_ptr + row * stride_dx_m + cols
        v = to_f32(tl.load(ptr, mask=mask, other=0.0))
        tl.store(ptr, round_to(v * g, dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


class CEStats(NamedTuple):
    """Per-row fp32 results of :func:`ce_fwd`; ``entropy`` and ``dx`` are None unless asked for."""

    loss: Tensor
    lse: Tensor
    entropy: Tensor | None
    dx: Tensor | None


def _rows(x: Tensor) -> Tensor:
    assert x.dim() == 2 and x.stride(1) == 1, "launchers take (M, V) logits with unit column stride"
    return x


def _flags(x: Tensor, softcap: float | None) -> dict:
    # TwoSum-carried shift for fp32 logits (and capped ones, which are fp32 values)
    return dict(EXACT=x.dtype == torch.float32 or softcap is not None)


def ce_fwd_out(
    x: Tensor, target: Tensor, *, loss: Tensor | None, lse: Tensor | None, entropy: Tensor | None = None,
    dx: Tensor | None = None, weight: Tensor | None = None, weight_sum: Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    grad_scale: Tensor | None = None, denom: Tensor | None = None,
) -> None:
    """Class-index cross-entropy of (M, V) logits ``x`` (unit column stride) and (M,) ``target``.

    Writes per-row fp32 ``loss`` and ``lse`` (both (M,), or both None to skip them), ``entropy`` when given,
    and, when ``dx`` (an (M, V) buffer with unit column stride, ``x`` itself allowed) is given, the gradient
    ``s_i d loss_i / dx`` with ``s_i = grad_scale[i] / denom`` (``grad_scale``: (M,) or a 1-element tensor,
    default 1; ``denom``: a 1-element device tensor, e.g. the mean's sum of target weights; both stay on the
    device).  ``weight_sum`` (1 element) is ``weight.sum()``, needed with ``weight`` and label smoothing.
    """
    _rows(x)
    M, V = x.shape
    if M == 0:
        return
    # the kernel indexes target and weight as dense vectors: a strided view (w[::2]) would read other values
    target = target.contiguous()
    weight = weight.contiguous() if weight is not None else None
    if weight is not None and label_smoothing > 0.0 and weight_sum is None:
        weight_sum = weight.float().sum().reshape(1)
    block, warps = _block_config(V, x.device.type)
    if dx is not None:
        _rows(dx)
    write_loss = loss is not None
    if (loss is None) != (lse is None):
        raise AssertionError("loss and lse are written together")
    stride_g = 0 if grad_scale is None or grad_scale.numel() == 1 else grad_scale.stride(0)
    _ce_fwd_kernel[(M,)](
        x, x.stride(0), target, weight, weight_sum if (weight is not None and label_smoothing > 0.0) else None,
        dx, dx.stride(0) if dx is not None else 0, grad_scale, stride_g, denom,
        loss, lse, entropy,
        V, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        BLOCK_V=block, HAS_EPS=label_smoothing > 0.0, HAS_Z=z_loss != 0.0, HAS_CAP=softcap is not None,
        WRITE_GRAD=dx is not None, WRITE_LOSS=write_loss, HAS_ENT=entropy is not None,
        REVERSE=_tuning.cross_entropy_reverse(M, V, block, warps, x.element_size(), x.device),
        num_warps=warps, **_flags(x, softcap), **FP_OPTIONS,
    )


def ce_fwd(
    x: Tensor, target: Tensor, *, weight: Tensor | None = None, ignore_index: int = -100,
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None, with_grad: bool = False,
    with_entropy: bool = False, grad_scale: Tensor | None = None, denom: Tensor | None = None,
    inplace: bool = False,
) -> CEStats:
    """Allocating form of :func:`ce_fwd_out`; ``inplace=True`` writes the gradient over ``x``."""
    M = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, lse = torch.empty(M, **f32), torch.empty(M, **f32)
    ent = torch.empty(M, **f32) if with_entropy else None
    dx = (x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)) if with_grad else None
    ce_fwd_out(x, target, loss=loss, lse=lse, entropy=ent, dx=dx, weight=weight, ignore_index=ignore_index,
               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad_scale=grad_scale, denom=denom)
    return CEStats(loss, lse, ent, dx)


def ce_bwd_out(
    x: Tensor, target: Tensor, grad_scale: Tensor, *, dx: Tensor, weight: Tensor | None = None,
    ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    denom: Tensor | None = None,
) -> None:
    """Recompute path: the gradient of ``sum_i grad_scale_i loss_i / denom`` written into ``dx``."""
    ce_fwd_out(x, target, loss=None, lse=None, dx=dx, weight=weight, ignore_index=ignore_index,
               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, grad_scale=grad_scale, denom=denom)


def ce_bwd(x: Tensor, target: Tensor, grad_scale: Tensor, **kw) -> Tensor:
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    ce_bwd_out(x, target, grad_scale, dx=dx, **kw)
    return dx


def ce_prob_fwd_out(
    x: Tensor, y: Tensor, *, loss: Tensor | None, lse: Tensor | None, entropy: Tensor | None = None,
    dx: Tensor | None = None, weight: Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
    softcap: float | None = None, grad_scale: Tensor | None = None, denom: Tensor | None = None,
) -> None:
    """Class-probability cross-entropy of (M, V) ``x`` against (M, V) ``y``; arguments as :func:`ce_fwd_out`."""
    _rows(x)
    _rows(y)
    M, V = x.shape
    if M == 0:
        return
    weight = weight.contiguous() if weight is not None else None  # indexed as a dense vector
    block, warps = _block_config(V, x.device.type)
    if dx is not None:
        _rows(dx)
    stride_g = 0 if grad_scale is None or grad_scale.numel() == 1 else grad_scale.stride(0)
    _ce_prob_fwd_kernel[(M,)](
        x, x.stride(0), y, y.stride(0), weight,
        dx, dx.stride(0) if dx is not None else 0, grad_scale, stride_g, denom,
        loss, lse, entropy,
        V, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        BLOCK_V=block, HAS_EPS=label_smoothing > 0.0, HAS_Z=z_loss != 0.0, HAS_CAP=softcap is not None,
        WRITE_GRAD=dx is not None, WRITE_LOSS=loss is not None, HAS_ENT=entropy is not None,
        REVERSE=_tuning.cross_entropy_reverse(M, V, block, warps, x.element_size() + y.element_size(), x.device),
        num_warps=warps, **_flags(x, softcap), **FP_OPTIONS,
    )


def ce_prob_fwd(x: Tensor, y: Tensor, *, with_grad: bool = False, with_entropy: bool = False,
                inplace: bool = False, **kw) -> CEStats:
    M = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, lse = torch.empty(M, **f32), torch.empty(M, **f32)
    ent = torch.empty(M, **f32) if with_entropy else None
    dx = (x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)) if with_grad else None
    ce_prob_fwd_out(x, y, loss=loss, lse=lse, entropy=ent, dx=dx, **kw)
    return CEStats(loss, lse, ent, dx)


def ce_prob_bwd(x: Tensor, y: Tensor, grad_scale: Tensor, **kw) -> Tensor:
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    ce_prob_fwd_out(x, y, loss=None, lse=None, dx=dx, grad_scale=grad_scale, **kw)
    return dx


def grad_scale_(dx: Tensor, g: Tensor) -> Tensor:
    """``dx *= g`` in place for a 1-element device tensor ``g``; free (one scalar load per program) at g == 1."""
    _rows(dx)
    M, V = dx.shape
    if dx.numel() == 0:
        return dx
    block = min(triton.next_power_of_2(V), 4096 if dx.device.type == "cuda" else 1024)
    _grad_scale_kernel[(M, triton.cdiv(V, block))](dx, dx.stride(0), g.reshape(1), V, BLOCK=block, **FP_OPTIONS)
    return dx


def selective_fwd(x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log_softmax(x).gather(1, index) in fp32 for (M, V) ``x``, (M, K) ``index``; returns (out, a, r)."""
    _rows(x)
    M, V = x.shape
    K = index.shape[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    out = torch.empty((M, K), **f32)
    a, r = torch.empty(M, **f32), torch.empty(M, **f32)
    if M == 0:
        return out, a, r
    index = index.contiguous()
    block, warps = _block_config(V, x.device.type)
    _selective_fwd_kernel[(M,)](
        x, x.stride(0), index, index.stride(0), out, out.stride(0), a, r, V, K,
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, **FP_OPTIONS,
    )
    return out, a, r


def selective_bwd(x: Tensor, index: Tensor, g: Tensor, a: Tensor, r: Tensor) -> Tensor:
    """dx = scatter_add(g at index) - p sum(g), the match formed as G_match (1 - p) (no cancellation)."""
    M, V = x.shape
    K = index.shape[1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M == 0:
        return dx
    index, g = index.contiguous(), g.contiguous()
    block, warps = _block_config(V, x.device.type)
    _selective_bwd_kernel[(M,)](
        x, x.stride(0), index, index.stride(0), g, g.stride(0), a, r, dx, dx.stride(0), V, K,
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, **FP_OPTIONS,
    )
    return dx


def entropy_fwd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row fp32 entropy of softmax(x) for (M, V) ``x``; returns (H, a, r) (a, r: saved for backward)."""
    _rows(x)
    M, V = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    h, a, r = torch.empty(M, **f32), torch.empty(M, **f32), torch.empty(M, **f32)
    if M == 0:
        return h, a, r
    block, warps = _block_config(V, x.device.type)
    _entropy_fwd_kernel[(M,)](
        x, x.stride(0), h, a, r, V,
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32,
        REVERSE=_tuning.cross_entropy_reverse(M, V, block, warps, x.element_size(), x.device), **FP_OPTIONS,
    )
    return h, a, r


def entropy_bwd(x: Tensor, g: Tensor, h: Tensor, a: Tensor, r: Tensor) -> Tensor:
    M, V = x.shape
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M == 0:
        return dx
    block, warps = _block_config(V, x.device.type)
    _entropy_bwd_kernel[(M,)](
        x, x.stride(0), g.contiguous(), h, a, r, dx, dx.stride(0), V,
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, **FP_OPTIONS,
    )
    return dx
