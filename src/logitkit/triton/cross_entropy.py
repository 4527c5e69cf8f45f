"""Cross-entropy (class indices and class probabilities), selective log-softmax and entropy over (M, V) rows.

Math:     per row a = max(x), r = rest sum (exp(x - a) over all entries but one argmax), L = log1p(r),
          lse = a + L, p = exp(x - a) / (1 + r).
          Class indices: loss = (1 - eps) w_t (L - d_t) + (eps / V) (L W - sum_j w_j d_j) + z lse^2;
          dx_j = s (c1 p_j - (eps / V) w_j) off target, c1 = (1 - eps) w_t + (eps / V) W + 2 z lse;
          at the target hard (p_t - 1) + (c1 - hard) p_t - (eps / V) w_t with hard = (1 - eps) w_t.
          Softcap: x -> cap tanh(x / cap) on load; the gradient is multiplied by 1 - (x_capped / cap)^2.
          Probabilities (y smoothed, wy = w y): loss = L sum(wy) - sum(wy d) + z lse^2; dx = s (c1 p - wy),
          c1 = sum(wy) + 2 z lse.  Selective: out_k = d[i_k] - L; dx = G_match (1 - p) - p (G - G_match).
          Entropy: H = L - sum p d (two non-negative terms); dH/dx = -p (d - L + H).
Traffic:  one program per row.  A row that fits one block (V <= BLOCK_V) is read once and, with the gradient
          fused, written once.  A longer row is read twice (the online (max, rest) pass, then the gradient
          pass, whose second read comes from L2 while few rows are in flight) and written once.  Forward only
          writes fp32 per-row loss / lse (/ entropy); nothing of size M * V besides the gradient.
Numerics: fp32 working precision; for fp32 (or softcapped) logits d = x - a is carried as hi + lo (TwoSum) and
          exp(d) = exp(hi) (1 + lo); the target gradient p_t - 1 is -r / (1 + r) when x_t is a maximum (exact,
          never softmax_t - 1, which cancels) and exp(d_t - L) - 1 otherwise (p_t <= 1/2 there: no cancellation);
          row offsets in int64 (M * V may exceed 2**31).  On CUDA, exp / log1p / tanh / division come from
          libdevice (correctly rounded to ~1 ulp; tl.exp is ex2.approx after a rounded multiply, |x| ulps off);
          the interpreter uses NumPy's.
Special:  a row with NaN or +-inf maximum gets L = NaN (loss and gradient NaN, lse = the infinite max), as the
          reference path and torch; a -inf logit at the target gives loss +inf; ignored rows get loss 0 and a
          zero gradient.  Out-of-range class indices are checked by the caller (``_validate``); the kernel
          clamps them to 0 so it never reads out of bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _tuning

try:  # Triton >= 3.0 exposes the CUDA libdevice wrappers here.
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None

# ---------------------------------------------------------------------------------------------------------
# Configs: the block/warp table is the "# cross-entropy" section of _tuning.py
# ---------------------------------------------------------------------------------------------------------


def _block_config(V: int, device_type: str) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V classes (tests force small blocks with _tuning.force_cross_entropy)."""
    return _tuning.cross_entropy_config(V, device_type)


# ---------------------------------------------------------------------------------------------------------
# Shared @triton.jit helpers (generic ones are candidates for _lib.py)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)  # ~1 ulp; tl.exp rounds x * log2(e) first (|x| ulps off)
    else:
        return tl.exp(x)


@triton.jit
def _log1p(r, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log1p(r)
    else:
        # Interpreter (no libdevice there): Goldberg's log1p, log(u) r / (u - 1) with u = 1 + r, in float64
        # so that the result rounds to fp32 correctly (the fp32 form is ~2 ulps off).
        r64 = r.to(tl.float64)
        u = 1.0 + r64
        res = tl.where(u == 1.0, r64, tl.log(u) * (r64 / tl.where(u == 1.0, 1.0, u - 1.0)))
        return res.to(tl.float32)


@triton.jit
def _div(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.math.div_rn(a, b)  # a true division: '/' is div.full.f32 (2 ulp) on CUDA
    else:
        return a / b


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.tanh(x)
    else:
        # Interpreter: tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)) in float64, expm1 by Goldberg's trick.
        z = -2.0 * tl.abs(x.to(tl.float64))
        u = tl.exp(z)
        em1 = tl.where(u == 1.0, z, (u - 1.0) * (z / tl.where(u == 1.0, 1.0, tl.log(u))))
        em1 = tl.where(u == 0.0, -1.0, em1)
        t = (-em1 / (2.0 + em1)).to(tl.float32)
        return tl.where(x < 0, -t, t)


@triton.jit
def _load_row_block(x_ptr, cols, mask, cap, HAS_CAP: tl.constexpr, PRECISE: tl.constexpr):
    """A block of logits in fp32, -inf past the row end, softcapped when asked."""
    x = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_CAP:
        x = tl.where(mask, cap * _tanh(x / cap, PRECISE), float("-inf"))
    return x


@triton.jit
def _shifted_exp(x, a, EXACT: tl.constexpr, PRECISE: tl.constexpr):
    """(exp(x - a), hi, lo) with x - a = hi + lo exactly when EXACT (TwoSum); lo = 0 otherwise."""
    hi = x - a
    if EXACT:
        bp = hi - x  # the part of hi that came from -a
        lo = (x - (hi - bp)) - (bp + a)
        lo = tl.where(tl.abs(hi) < float("inf"), lo, 0.0)  # -inf lanes: hi - x is NaN
        e = _exp(hi, PRECISE)
        e = e + e * lo  # exp(hi + lo) = exp(hi) (1 + lo) to first order, |lo| <= u |hi|
    else:
        lo = tl.zeros_like(hi)
        e = _exp(hi, PRECISE)
    return e, hi, lo


@triton.jit
def _prob(hi, lo, L, PRECISE: tl.constexpr):
    """p = exp(d - L) as one exp (not exp(d) / (1 + r): a subnormal exp(d) would lose its bits first)."""
    p = _exp(hi - L, PRECISE)
    return p + p * lo


@triton.jit
def _block_state(x, EXACT: tl.constexpr, PRECISE: tl.constexpr):
    """(max, rest sum, NaN count) of one block; the rest leaves out one copy of the maximum's exp(0) = 1."""
    m = tl.max(x, axis=0)
    m_ref = tl.where(tl.abs(m) < float("inf"), m, 0.0)  # an infinite max: shift by 0, the row is NaN anyway
    e, _, _ = _shifted_exp(x, m_ref, EXACT, PRECISE)
    # ties with the max count 1 each (minus the one kept out); the others add exp(x - m)
    rest = tl.sum(tl.where(x < m, e, 0.0), axis=0) + (tl.sum((x == m).to(tl.float32), axis=0) - 1.0)
    nans = tl.sum((x != x).to(tl.float32), axis=0)
    return m, rest, nans


@triton.jit
def _merge(a, r, m, rest, EXACT: tl.constexpr, PRECISE: tl.constexpr):
    """Online merge of (a, r) with a block's (m, rest): r = r_hi + (r_lo + 1) exp(a_lo - a_hi).

    The empty state is (-inf, -1) (total mass r + 1 = 0); two -inf maxima stay at mass 0, never NaN.
    """
    a_new = tl.maximum(a, m)
    a_ref = tl.where(tl.abs(a_new) < float("inf"), a_new, 0.0)
    lo_a = tl.minimum(a, m)
    scale, _, _ = _shifted_exp(lo_a, a_ref, EXACT, PRECISE)  # exp(-inf - a_ref) = 0 for an empty side
    scale = tl.where(lo_a == float("-inf"), 0.0, scale)
    r_new = tl.where(a >= m, r + (rest + 1.0) * scale, rest + (r + 1.0) * scale)
    return a_new, r_new


@triton.jit
def _finish(a, r, nans, PRECISE: tl.constexpr):
    """(a_ref, L, lse): L = log1p(r), NaN for a NaN or infinite max; lse = the infinite max or a + L."""
    bad = (nans > 0) | (tl.abs(a) == float("inf"))
    L = tl.where(bad, float("nan"), _log1p(tl.maximum(r, 0.0), PRECISE))
    a_ref = tl.where(tl.abs(a) < float("inf"), a, 0.0)
    lse = tl.where((nans == 0) & (tl.abs(a) == float("inf")), a, a + L)
    return a_ref, L, lse


@triton.jit
def _row_stats(x_row, V, cap, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr, EXACT: tl.constexpr,
               PRECISE: tl.constexpr):
    """Online (max, rest, NaN count) over a whole row, BLOCK_V entries at a time."""
    a = float("-inf")
    r = -1.0
    nans = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, cap, HAS_CAP, PRECISE)
        m, rest, nb = _block_state(x, EXACT, PRECISE)
        a, r = _merge(a, r, m, rest, EXACT, PRECISE)
        nans += nb
    return a, r, nans


# ---------------------------------------------------------------------------------------------------------
# Class-index cross-entropy
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _ce_block(x, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard, eps_over_v, cap,
              HAS_W: tl.constexpr, HAS_EPS: tl.constexpr, HAS_CAP: tl.constexpr, EXACT: tl.constexpr,
              PRECISE: tl.constexpr):
    """One block's (unscaled gradient, sum w d, sum p d) given the row's final (a, r, L)."""
    e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
    p = _prob(hi, lo, L, PRECISE)
    d = hi + lo
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    swd = tl.sum(tl.where(mask, w * d, 0.0), axis=0)
    spd = tl.sum(tl.where(p > 0.0, p * d, 0.0), axis=0)  # -inf logits: p = 0 and p * d would be NaN
    g = c1 * p
    if HAS_EPS:
        g = g - eps_over_v * w
    # p_t - 1: -r / (1 + r) at a maximum (exact), p - 1 elsewhere (p <= 1/2 there: no cancellation)
    pm1 = tl.where(hi == 0.0, -_div(r, 1.0 + r, PRECISE), p - 1.0)
    at_t = hard * pm1 + (c1 - hard) * p
    if HAS_EPS:
        at_t = at_t - eps_over_v * w
    g = tl.where(cols == t, at_t, g)
    g = tl.where(valid, g, 0.0)
    if HAS_CAP:
        q = x / cap
        g = g * (1.0 - q * q)  # d/dx cap tanh(x / cap) = 1 - tanh^2
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
    EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    t = tl.where(valid & (t >= 0) & (t < V), t, 0)  # never read out of bounds (range checked by the caller)
    # the target logit is read before any gradient store: dx may alias x (inplace_backward)
    x_t = tl.load(x_row + t).to(tl.float32)
    if HAS_CAP:
        x_t = cap * _tanh(x_t / cap, PRECISE)

    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP, PRECISE)
        a, r, nans = _block_state(x, EXACT, PRECISE)
    else:
        a, r, nans = _row_stats(x_row, V, cap, BLOCK_V, HAS_CAP, EXACT, PRECISE)
    a_ref, L, lse = _finish(a, r, nans, PRECISE)

    if HAS_W:
        w_t = tl.where(valid, tl.load(w_ptr + t).to(tl.float32), 0.0)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    if HAS_WSUM:
        W = tl.load(wsum_ptr).to(tl.float32)
    else:
        W = V * 1.0
    eps_over_v = eps / V
    hard = (1.0 - eps) * w_t
    c1 = hard
    if HAS_EPS:
        c1 = c1 + eps_over_v * W
    if HAS_Z:
        c1 = c1 + 2.0 * z * lse
    c1 = tl.where(valid, c1, 0.0)
    # gradient scale of this row: upstream g (per row or broadcast) / mean denominator; 0 on ignored rows
    s = 1.0
    if HAS_G:
        s = s * tl.load(g_ptr + row * stride_g_m).to(tl.float32)
    if HAS_DENOM:
        s = s / tl.load(denom_ptr).to(tl.float32)
    s = tl.where(valid, s, 0.0)

    swd = 0.0
    spd = 0.0
    if SINGLE:
        g, swd, spd = _ce_block(x, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard, eps_over_v, cap,
                                HAS_W, HAS_EPS, HAS_CAP, EXACT, PRECISE)
        if WRITE_GRAD:
            tl.store(dx_ptr + row * stride_dx_m + cols, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)
    elif WRITE_GRAD or HAS_EPS or HAS_ENT:
        # second read of the row (from L2 when the row was read recently), gradient written once
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = _load_row_block(x_row, cols, mask, cap, HAS_CAP, PRECISE)
            g, swd_b, spd_b = _ce_block(x, cols, mask, t, valid, a_ref, r, L, w_ptr, c1, hard, eps_over_v,
                                        cap, HAS_W, HAS_EPS, HAS_CAP, EXACT, PRECISE)
            swd += swd_b
            spd += spd_b
            if WRITE_GRAD:
                tl.store(dx_ptr + row * stride_dx_m + cols, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)

    if WRITE_LOSS:
        # d_t = x_t - a as hi + lo: L - d_t is a sum of two non-negative terms
        hi_t = x_t - a_ref
        lo_t = 0.0
        if EXACT:
            bp = hi_t - x_t
            lo_t = tl.where(tl.abs(hi_t) < float("inf"), (x_t - (hi_t - bp)) - (bp + a_ref), 0.0)
        nll = (L - hi_t) - lo_t
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
            tl.store(ent_ptr + row, L - spd)  # H = L - sum p d, both >= 0


# ---------------------------------------------------------------------------------------------------------
# Class-probability cross-entropy
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W: tl.constexpr, HAS_EPS: tl.constexpr):
    y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_EPS:
        y = tl.where(mask, y * (1.0 - eps) + eps / V, 0.0)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _ce_prob_block(x, wy, a_ref, r, L, c1, cap, HAS_CAP: tl.constexpr, EXACT: tl.constexpr,
                   PRECISE: tl.constexpr):
    e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
    p = _prob(hi, lo, L, PRECISE)
    d = hi + lo
    swyd = tl.sum(tl.where(wy != 0.0, wy * d, 0.0), axis=0)  # 0 * -inf (masked lanes) counts 0
    spd = tl.sum(tl.where(p > 0.0, p * d, 0.0), axis=0)
    g = c1 * p - wy
    if HAS_CAP:
        q = x / cap
        g = g * (1.0 - q * q)
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
    EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    y_row = y_ptr + row * stride_y_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP, PRECISE)
        a, r, nans = _block_state(x, EXACT, PRECISE)
        wy = _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS)
        swy = tl.sum(wy, axis=0)
    else:
        a = float("-inf")
        r = -1.0
        nans = 0.0
        swy = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            xb = _load_row_block(x_row, cols, mask, cap, HAS_CAP, PRECISE)
            m, rest, nb = _block_state(xb, EXACT, PRECISE)
            a, r = _merge(a, r, m, rest, EXACT, PRECISE)
            nans += nb
            swy += tl.sum(_ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS), axis=0)
    a_ref, L, lse = _finish(a, r, nans, PRECISE)
    c1 = swy
    if HAS_Z:
        c1 = c1 + 2.0 * z * lse
    s = 1.0
    if HAS_G:
        s = s * tl.load(g_ptr + row * stride_g_m).to(tl.float32)
    if HAS_DENOM:
        s = s / tl.load(denom_ptr).to(tl.float32)

    if SINGLE:
        g, swyd, spd = _ce_prob_block(x, wy, a_ref, r, L, c1, cap, HAS_CAP, EXACT, PRECISE)
        if WRITE_GRAD:
            tl.store(dx_ptr + row * stride_dx_m + cols, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        swyd = 0.0
        spd = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            xb = _load_row_block(x_row, cols, mask, cap, HAS_CAP, PRECISE)
            wyb = _ce_prob_wy(y_row, w_ptr, cols, mask, eps, V, HAS_W, HAS_EPS)
            g, swyd_b, spd_b = _ce_prob_block(xb, wyb, a_ref, r, L, c1, cap, HAS_CAP, EXACT, PRECISE)
            swyd += swyd_b
            spd += spd_b
            if WRITE_GRAD:
                tl.store(dx_ptr + row * stride_dx_m + cols, (g * s).to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_LOSS:
        # sum_j wy_j (L - d_j) = L sum(wy) - sum(wy d): both terms >= 0 for wy >= 0
        loss = L * swy - swyd
        if HAS_Z:
            loss = loss + z * lse * lse
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if HAS_ENT:
            tl.store(ent_ptr + row, L - spd)


# ---------------------------------------------------------------------------------------------------------
# Selective log-softmax and entropy
# ---------------------------------------------------------------------------------------------------------


@triton.heuristics({"SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _selective_fwd_kernel(
    x_ptr, stride_x_m, idx_ptr, stride_idx_m, out_ptr, stride_out_m, a_ptr, r_ptr,
    V, K,
    BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, 1.0, False, PRECISE)
        a, r, nans = _block_state(x, EXACT, PRECISE)
    else:
        a, r, nans = _row_stats(x_row, V, 1.0, BLOCK_V, False, EXACT, PRECISE)
    a_ref, L, lse = _finish(a, r, nans, PRECISE)
    tl.store(a_ptr + row, a)
    tl.store(r_ptr + row, tl.where(L == L, r, float("nan")))  # NaN r marks a NaN row for the backward
    for k in range(0, K):
        i = tl.load(idx_ptr + row * stride_idx_m + k).to(tl.int64)
        x_i = tl.load(x_row + i).to(tl.float32)
        hi = x_i - a_ref
        lo = 0.0
        if EXACT:
            bp = hi - x_i
            lo = tl.where(tl.abs(hi) < float("inf"), (x_i - (hi - bp)) - (bp + a_ref), 0.0)
        # d - L: two non-positive terms, no cancellation
        tl.store(out_ptr + row * stride_out_m + k, (hi - L) + lo)


@triton.jit
def _selective_bwd_kernel(
    x_ptr, stride_x_m, idx_ptr, stride_idx_m, g_ptr, stride_g_m, a_ptr, r_ptr, dx_ptr, stride_dx_m,
    V, K,
    BLOCK_V: tl.constexpr, EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    a = tl.load(a_ptr + row)
    r = tl.load(r_ptr + row)
    a_ref = tl.where(tl.abs(a) < float("inf"), a, 0.0)
    L = _log1p(tl.maximum(r, 0.0), PRECISE)
    G = 0.0
    for k in range(0, K):
        G += tl.load(g_ptr + row * stride_g_m + k).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, 1.0, False, PRECISE)
        e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
        p = _prob(hi, lo, L, PRECISE)
        gm = tl.zeros_like(p)
        for k in range(0, K):
            i = tl.load(idx_ptr + row * stride_idx_m + k)
            gm += tl.where(cols == i, tl.load(g_ptr + row * stride_g_m + k).to(tl.float32), 0.0)
        # 1 - p: r / (1 + r) at a maximum (exact), 1 - p elsewhere (p <= 1/2 there)
        one_m_p = tl.where(hi == 0.0, _div(r, 1.0 + r, PRECISE), 1.0 - p)
        dx = gm * one_m_p - p * (G - gm)
        dx = tl.where(r == r, dx, float("nan"))
        tl.store(dx_ptr + row * stride_dx_m + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.heuristics({"SINGLE": lambda a: a["V"] <= a["BLOCK_V"]})
@triton.jit
def _entropy_fwd_kernel(
    x_ptr, stride_x_m, h_ptr, a_ptr, r_ptr,
    V,
    BLOCK_V: tl.constexpr, SINGLE: tl.constexpr, EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        x = _load_row_block(x_row, cols, cols < V, 1.0, False, PRECISE)
        a, r, nans = _block_state(x, EXACT, PRECISE)
        a_ref, L, lse = _finish(a, r, nans, PRECISE)
        e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
        p = _prob(hi, lo, L, PRECISE)
        spd = tl.sum(tl.where(p > 0.0, p * (hi + lo), 0.0), axis=0)
    else:
        a, r, nans = _row_stats(x_row, V, 1.0, BLOCK_V, False, EXACT, PRECISE)
        a_ref, L, lse = _finish(a, r, nans, PRECISE)
        spd = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = _load_row_block(x_row, cols, cols < V, 1.0, False, PRECISE)
            e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
            p = _prob(hi, lo, L, PRECISE)
            spd += tl.sum(tl.where(p > 0.0, p * (hi + lo), 0.0), axis=0)
    tl.store(h_ptr + row, L - spd)  # H = L + sum p |d|: two non-negative terms
    tl.store(a_ptr + row, a)
    tl.store(r_ptr + row, tl.where(L == L, r, float("nan")))


@triton.jit
def _entropy_bwd_kernel(
    x_ptr, stride_x_m, g_ptr, h_ptr, a_ptr, r_ptr, dx_ptr, stride_dx_m,
    V,
    BLOCK_V: tl.constexpr, EXACT: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    a = tl.load(a_ptr + row)
    r = tl.load(r_ptr + row)
    H = tl.load(h_ptr + row)
    g = tl.load(g_ptr + row).to(tl.float32)
    a_ref = tl.where(tl.abs(a) < float("inf"), a, 0.0)
    L = _log1p(tl.maximum(r, 0.0), PRECISE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _load_row_block(x_row, cols, mask, 1.0, False, PRECISE)
        e, hi, lo = _shifted_exp(x, a_ref, EXACT, PRECISE)
        p = _prob(hi, lo, L, PRECISE)
        logp = (hi - L) + lo
        dx = tl.where(p > 0.0, -g * p * (logp + H), 0.0)  # dH/dx = -p (log p + H); -inf logits: 0
        dx = tl.where(r == r, dx, float("nan"))
        tl.store(dx_ptr + row * stride_dx_m + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Gradient scaling by a device scalar (backward of the fused path)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_scale_kernel(dx_ptr, stride_dx_m, g_ptr, V, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # loss.backward() passes 1: every program returns after one scalar load, no host sync
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        ptr = dx_ptr + row * stride_dx_m + cols
        v = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (v * g).to(dx_ptr.dtype.element_ty), mask=mask)


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
    return dict(EXACT=x.dtype == torch.float32 or softcap is not None, PRECISE=x.device.type == "cuda")


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
        num_warps=warps, **_flags(x, softcap),
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
        num_warps=warps, **_flags(x, softcap),
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
    _grad_scale_kernel[(M, triton.cdiv(V, block))](dx, dx.stride(0), g.reshape(1), V, BLOCK=block)
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
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, PRECISE=x.device.type == "cuda",
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
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, PRECISE=x.device.type == "cuda",
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
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, PRECISE=x.device.type == "cuda",
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
        BLOCK_V=block, num_warps=warps, EXACT=x.dtype == torch.float32, PRECISE=x.device.type == "cuda",
    )
    return dx
