"""Vocab-block passes of linear cross-entropy (class-index targets): the elementwise work between its GEMMs.

Math:     the logits arrive in (M, n) blocks, classes [v0, v0 + n) of V, written by a GEMM (x W_b^T + b_b).
          Pass 1 (forward), per row and block: m = max, R_b = 2**64 rest sum w.r.t. m (as the CE kernel), and
          when asked Q_b = sum_j w_j (m - x_j) (label smoothing), E_b = 2**64 sum_j exp(x_j - m) (m - x_j)
          (entropy), U_b = sum_j w_j, and the target's logit when the target falls in the block; merged into
          the row's float64 state (a, r, S, U, E, x_t) as the torch path does (autograd/linear_cross_entropy.py):
            a' = max(a, m);  r' = r_hi + (r_lo + 1) exp(a_lo - a_hi)          (NUMERICS.md's merge)
            S' = S + U (a' - a) + Q_b + U_b (a' - m)                           (all terms >= 0)
            E' = exp(a - a') (E + (a' - a)(1 + r)) + exp(m - a') (E_b + (a' - m)(1 + r_b)).
          The loss, lse and entropy then come from that state by the torch path's float64 formulas (O(M)).
          Pass 2 (backward): G_b = s_i d loss_i / d logits_b from the row's final (a, R = 2**64 r, L, lse),
          the fused CE kernel's gradient (cross_entropy._ce_block: c1 p_j - (eps / V) w_j; at the target
          hard (p_t - 1) + (c1 - hard) p_t - (eps / V) w_t with p_t - 1 = -r / (1 + r) at a maximum), written
          over the block (the logits are consumed).
Traffic:  one program per row.  Pass 1 reads the block once (a row of n <= BLOCK_V stays in registers; a longer
          one is read again for the smoothing / entropy sums, from L2) and reads/writes 6 float64 per row.
          Pass 2 reads the block once and writes G once over it, plus O(1) per row.
Numerics: fp32 inside a block, exactly as the CE kernel (TwoSum shift for fp32 / capped logits, the rest sum
          scaled by 2**64 so subnormal terms keep their bits); across blocks float64 (per-row scalars only:
          r_b = R_b 2**-64 and E_b 2**-64 are exact in float64, so a block's sums are rounded once, in fp32,
          and every merge after that costs float64 roundings).  Softcap is applied on load in both passes
          by the same code, so pass 2 sees bitwise the capped logits pass 1 merged.  Ignored rows still get
          their statistics (lse is reported for them) and a zero gradient.  Row offsets in int64.
Special:  a NaN in a row makes its state (NaN, NaN) (as the torch path's NaN-propagating max); +inf makes
          a = inf; both end with L = NaN in the torch finish (lse NaN, resp. +inf), which gives the gradient
          NaN rows.  An all -inf block is the empty state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._lib import FP_OPTIONS, TWO_M64, div_rn, exp_acc, exp_scaled, round_to, tanh_acc, to_f32
from .cross_entropy import (
    _acc,
    _block_config,
    _block_state,
    _ce_block,
    _load_row_block,
    _row_coeffs,
    _row_stats,
    _shift,
)

# ---------------------------------------------------------------------------------------------------------
# Pass 1: block statistics merged into the row state
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _block_sums(x, cols, mask, m_ref, w_ptr, HAS_W: tl.constexpr, EXACT: tl.constexpr):
    """(Q, E, U) of one tile relative to the block max: sum w (m - x), 2**64 sum exp(x - m) (m - x), sum w."""
    hi, lo = _shift(x, m_ref, EXACT)
    dn = -(hi + lo)  # m - x >= 0 (inf for a -inf logit)
    if HAS_W:
        w = to_f32(tl.load(w_ptr + cols, mask=mask, other=0.0))
    else:
        w = tl.where(mask, 1.0, 0.0)
    q = tl.sum(tl.where(mask, w * dn, 0.0), axis=0)
    e = exp_scaled(hi, lo)
    ent = tl.sum(tl.where(e > 0.0, e * dn, 0.0), axis=0)  # a -inf logit has no mass and adds nothing
    return q, ent, tl.sum(w, axis=0)


@triton.heuristics({"HAS_W": lambda a: a["w_ptr"] is not None,
                    "SINGLE": lambda a: a["n"] <= a["BLOCK_V"]})
@triton.jit
def _lce_stats_kernel(
    x_ptr, stride_x_m, t_ptr, w_ptr,
    a_ptr, r_ptr, s_ptr, u_ptr, e_ptr, xt_ptr,
    v0, n, ignore_index, cap,
    BLOCK_V: tl.constexpr, HAS_W: tl.constexpr, SINGLE: tl.constexpr, HAS_SUMS: tl.constexpr,
    HAS_ENT: tl.constexpr, HAS_CAP: tl.constexpr, EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    if HAS_W:
        w_blk = w_ptr + v0
    else:
        w_blk = w_ptr
    if SINGLE:
        cols = tl.arange(0, BLOCK_V)
        mask = cols < n
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
        m, Rb = _block_state(x, EXACT)
    else:
        m, Rb = _row_stats(x_row, n, cap, BLOCK_V, HAS_CAP, EXACT)
    m_ref = tl.where(tl.abs(m) < float("inf"), m, 0.0)  # an infinite block max: the row ends NaN anyway

    # Smoothing / entropy sums relative to the block max (second read of a long block, from L2).
    Q = 0.0
    Eb = 0.0
    Ub = 0.0
    if HAS_SUMS or HAS_ENT:
        if SINGLE:
            Q, Eb, Ub = _block_sums(x, cols, mask, m_ref, w_blk, HAS_W, EXACT)
        else:
            Q_c = 0.0
            Eb_c = 0.0
            Ub_c = 0.0
            for start in range(0, n, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n
                xb = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
                q_b, e_b, u_b = _block_sums(xb, cols, mask, m_ref, w_blk, HAS_W, EXACT)
                Q, Q_c = _acc(Q, Q_c, q_b)
                Eb, Eb_c = _acc(Eb, Eb_c, e_b)
                Ub, Ub_c = _acc(Ub, Ub_c, u_b)
            Q = Q + Q_c
            Eb = Eb + Eb_c
            Ub = Ub + Ub_c

    # The target's logit (capped as the block was), when the target lies in this block.
    t = tl.load(t_ptr + row).to(tl.int64)
    j = t - v0
    inb = (t != ignore_index) & (j >= 0) & (j < n)
    x_t = to_f32(tl.load(x_row + tl.where(inb, j, 0)))
    if HAS_CAP:
        x_t = cap * tanh_acc(div_rn(x_t, cap))  # as _load_row_block caps the block
    tl.store(xt_ptr + row, x_t.to(tl.float64), mask=inb)

    # Float64 merge into the row state (per-row scalars: exact block sums, then float64 roundings).
    a0 = tl.load(a_ptr + row)
    r0 = tl.load(r_ptr + row)
    mb = m.to(tl.float64)
    rb = Rb.to(tl.float64) * TWO_M64  # exact: 2**-64 times an fp32 value stays normal in float64
    a1 = tl.maximum(a0, mb)
    # exp of a difference of two maxima (both -inf gives NaN, fixed below; +inf rows end NaN in the finish)
    first = a0 >= mb
    sc = exp_acc(tl.where(first, mb - a0, a0 - mb))
    r1 = tl.where(first, r0 + (rb + 1.0) * sc, rb + (r0 + 1.0) * sc)
    r1 = tl.where(a1 == float("-inf"), 0.0, r1)
    # a NaN in this block (its max ignored it) or an earlier one: (NaN, NaN) for good, as the torch path's
    # NaN-propagating max; the finish then gives NaN (an infinite max alone gives lse = that max)
    has_nan = (Rb != Rb) | (r0 != r0)
    a1 = tl.where(has_nan, float("nan"), a1)
    r1 = tl.where(has_nan, float("nan"), r1)
    fin = (tl.abs(a0) < float("inf")) & (tl.abs(a1) < float("inf"))
    shift = tl.where(fin, a1 - a0, 0.0)  # how far the row max moved (>= 0)
    up = a1 - mb  # >= 0; inf for an all -inf block under a finite max
    if HAS_SUMS:
        u0 = tl.load(u_ptr + row)
        ub = Ub.to(tl.float64)
        s1 = tl.load(s_ptr + row) + u0 * shift + Q.to(tl.float64) + ub * up
        tl.store(s_ptr + row, s1)
        tl.store(u_ptr + row, u0 + ub)
    if HAS_ENT:
        e0 = tl.load(e_ptr + row)
        old = tl.where(fin, exp_acc(a0 - tl.where(fin, a1, a0)) * (e0 + shift * (r0 + 1.0)), 0.0)
        fin_b = (tl.abs(mb) < float("inf")) & (tl.abs(a1) < float("inf"))
        mb_s = tl.where(fin_b, mb, 0.0)
        up_s = tl.where(fin_b, up, 0.0)
        new = exp_acc(mb_s - tl.where(fin_b, a1, 0.0)) * (Eb.to(tl.float64) * TWO_M64 + up_s * (rb + 1.0))
        tl.store(e_ptr + row, old + tl.where(fin_b, new, 0.0))
    tl.store(a_ptr + row, a1)
    tl.store(r_ptr + row, r1)


# ---------------------------------------------------------------------------------------------------------
# Pass 2: the gradient of one block from the row's final statistics, written over the block
# ---------------------------------------------------------------------------------------------------------


@triton.heuristics({"HAS_W": lambda a: a["w_ptr"] is not None})
@triton.jit
def _lce_grad_kernel(
    x_ptr, stride_x_m, t_ptr, w_ptr, wsum_ptr,
    a_ptr, R_ptr, L_ptr, lse_ptr, g_ptr,
    v0, n, V, ignore_index, eps, z, cap,
    BLOCK_V: tl.constexpr, HAS_W: tl.constexpr, HAS_EPS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_CAP: tl.constexpr, EXACT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_m
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    t = tl.where(valid & (t >= 0) & (t < V), t, 0)  # never read out of bounds (range checked by the caller)
    a_ref = tl.load(a_ptr + row)
    R = tl.load(R_ptr + row)
    L = tl.load(L_ptr + row)
    lse = tl.load(lse_ptr + row)
    if HAS_W:
        w_t = tl.where(valid, to_f32(tl.load(w_ptr + t)), 0.0)
        W = to_f32(tl.load(wsum_ptr))
    else:
        w_t = tl.where(valid, 1.0, 0.0)
        W = V * 1.0
    eps_over_v, hard, c1 = _row_coeffs(w_t, W, valid, eps, V, z, lse, HAS_EPS, HAS_Z)
    s = tl.where(valid, to_f32(tl.load(g_ptr + row)), 0.0)  # upstream gradient of the row (mean included)
    if HAS_W:
        w_blk = w_ptr + v0
    else:
        w_blk = w_ptr
    for start in range(0, n, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n
        x = _load_row_block(x_row, cols, mask, cap, HAS_CAP)
        # the block's own column numbering: the target is t - v0 there (outside [0, n) when elsewhere)
        g, _, _ = _ce_block(x, x_row, cols, mask, t - v0, valid, a_ref, R, L, w_blk, c1, hard, eps_over_v, cap,
                            HAS_W, HAS_EPS, HAS_CAP, EXACT)
        tl.store(x_row + cols, round_to(g * s, x_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _flags(x: Tensor, softcap: float | None) -> dict:
    # TwoSum-carried shift for fp32 logits (and capped ones, which are fp32 values), as the CE kernel
    return dict(EXACT=x.dtype == torch.float32 or softcap is not None)


def lce_stats_fwd_out(
    x: Tensor, v0: int, target: Tensor, *, a: Tensor, r: Tensor, s: Tensor | None, u: Tensor | None,
    e: Tensor | None, xt: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
    softcap: float | None = None,
) -> None:
    """Merge the (M, n) logits block ``x`` (classes v0 .. v0 + n - 1, unit column stride) into the per-row
    float64 state: ``a`` (max), ``r`` (rest sum), ``s``/``u`` (smoothing sums, both or neither), ``e``
    (entropy sum, optional) and ``xt`` (the target's capped logit, set where the target is in the block).
    Every state tensor has M contiguous float64 elements; start from (-inf, 0, 0, 0, 0, 0)."""
    assert x.dim() == 2 and x.stride(1) == 1, "launchers take (M, n) blocks with unit column stride"
    M, n = x.shape
    if M == 0 or n == 0:
        return
    assert (s is None) == (u is None)
    target = target.contiguous()  # indexed as dense vectors
    weight = weight.contiguous() if weight is not None else None
    block, warps = _block_config(n, x.device.type)
    _lce_stats_kernel[(M,)](
        x, x.stride(0), target, weight,
        a, r, s, u, e, xt,
        v0, n, ignore_index, float(softcap or 1.0),
        BLOCK_V=block, HAS_SUMS=s is not None, HAS_ENT=e is not None, HAS_CAP=softcap is not None,
        num_warps=warps, **_flags(x, softcap), **FP_OPTIONS,
    )


def lce_grad_bwd_out(
    x: Tensor, v0: int, V: int, target: Tensor, *, a: Tensor, R: Tensor, L: Tensor, lse: Tensor,
    grad_rows: Tensor, weight: Tensor | None = None, weight_sum: Tensor | None = None, ignore_index: int = -100,
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
) -> None:
    """Overwrite the (M, n) logits block ``x`` (classes v0 .. v0 + n - 1 of V) with the gradient of
    ``sum_i grad_rows[i] loss_i``, given per-row fp32 ``a`` (max, a logit value), ``R`` (2**64 rest sum),
    ``L`` (log1p(r), NaN for NaN / infinite rows), ``lse`` and (with ``weight`` and smoothing) the 1-element
    ``weight_sum``; ``grad_rows`` is (M,) (0 on ignored rows is not needed: the kernel zeroes them)."""
    assert x.dim() == 2 and x.stride(1) == 1, "launchers take (M, n) blocks with unit column stride"
    M, n = x.shape
    if M == 0 or n == 0:
        return
    target, grad_rows = target.contiguous(), grad_rows.contiguous()  # indexed as dense vectors
    weight = weight.contiguous() if weight is not None else None
    if weight is not None and weight_sum is None:
        weight_sum = weight.float().sum().reshape(1)
    block, warps = _block_config(n, x.device.type)
    _lce_grad_kernel[(M,)](
        x, x.stride(0), target, weight, weight_sum,
        a, R, L, lse, grad_rows,
        v0, n, V, ignore_index, float(label_smoothing), float(z_loss), float(softcap or 1.0),
        BLOCK_V=block, HAS_EPS=label_smoothing > 0.0, HAS_Z=z_loss != 0.0, HAS_CAP=softcap is not None,
        num_warps=warps, **_flags(x, softcap), **FP_OPTIONS,
    )
