"""softmax, log_softmax and logsumexp over any ``dim``, forward and backward.

Math:     per row a = max(x), r = rest sum (every entry but one argmax of exp(x - a)), L = log1p(r);
          lse = a + L; log_softmax = (x - a) - L; softmax = exp(x - a) / (1 + r).
          Backward: softmax dx = y (g - sum(g y)); log_softmax dx = g - exp(y) sum(g); lse dx = g softmax(x)
          (recomputed from x: exp(x - lse) would inherit the rounding of lse, |lse| u).
Layout:   x is viewed as (P, N, K) with the reduced dim N in the middle and any strides, so a non-last dim
          is a strided reduction in the kernel, never a transpose copy; a row is (p, k), row index p*K + k.
Regimes:  (triton/_tuning.py) "row": the whole row in registers, several rows per program, x read once;
          "loop": an online (max, rest-sum) pass over chunks, then an output pass (second read mostly from L2);
          "split": rows cut into segments, a state per segment to a workspace, then a combining output pass;
          "resident" (not the default until measured): a row held by a group of programs, one tile each, which
          publish their tiles' states, meet at a barrier (_lib.group_barrier) and write from registers.
          The output pass walks its chunks (split: and programs) in reverse when the rows in flight outgrow
          the L2 (_tuning.py "second-pass order"): the re-reads then start with the most recently read lines.
Traffic:  forward reads x once ("row", "resident") or twice (else) and writes y once; backward reads y and g
          once or twice.
Numerics: fp32 working precision; the rest sum is carried scaled, rest = 2**64 r (_lib's *_scaled helpers), so
          terms whose exp(x - a) is subnormal in fp32 keep their bits (underflow family); float32 inputs carry
          x - a as TwoSum hi + lo and use libdevice exp/log1p (tl.exp is ex2.approx on the GPU); true divisions
          (div_rn); int64 offsets; 1-D grids; no host syncs.
          float64 inputs take the reference path.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import plain
from . import _tuning
from ._lib import (
    FP_OPTIONS,
    TWO_64,
    TWO_M64,
    chunk_start,
    combine_states_scaled,
    div_rn,
    exp_acc,
    exp_fast,
    exp_scaled_diff,
    finish_lse_scaled,
    group_barrier,
    log1p_acc,
    merge_state_comp,
    merge_state_scaled,
    program_index,
    round_to,
    tile_state_scaled,
    to_f32,
    two_diff,
)

# ---------------------------------------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(pid_m, R, K, s_p, s_k, BLOCK_M: tl.constexpr):
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < R
    p = rows // K
    k = rows - p * K
    return rows, row_ok, p, k


@triton.jit
def _load_row_tile(x_ptr, m_ptr, xrow, mrow, row_ok, cols, N, sx_n, sm_n, HAS_MASK: tl.constexpr):
    """fp32 tile; padding and masked-out entries (NaN included) read as -inf."""
    ok = row_ok[:, None] & (cols[None, :] < N)
    c64 = cols.to(tl.int64)[None, :]
    x = to_f32(tl.load(x_ptr + (xrow[:, None] + c64 * sx_n), mask=ok, other=float("-inf")))
    if HAS_MASK:
        keep = tl.load(m_ptr + (mrow[:, None] + c64 * sm_n), mask=ok, other=0) != 0
        x = tl.where(keep, x, float("-inf"))
    return x, ok


@triton.jit
def _segment_state(x_ptr, m_ptr, xrow, mrow, row_ok, start, end, sx_n, sm_n,
                   HAS_MASK: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online scaled state (a, rest = 2**64 r) over columns [start, end) of BLOCK_M rows, chunk by chunk."""
    a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    rest = tl.zeros([BLOCK_M], tl.float32)
    comp = tl.zeros([BLOCK_M], tl.float32)  # float32: the merges' rounding errors, added once at the end
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        x, _ = _load_row_tile(x_ptr, m_ptr, xrow, mrow, row_ok, cols, end, sx_n, sm_n, HAS_MASK)
        a_c, rest_c = tile_state_scaled(x, EXACT)
        if EXACT:
            a, rest, comp = merge_state_comp(a, rest, comp, a_c, rest_c, tl.zeros_like(rest_c), EXACT)
        else:
            a, rest = merge_state_scaled(a, rest, a_c, rest_c, EXACT)
    return a, rest + comp


@triton.jit
def _normalised(x, a, rest, LOG: tl.constexpr, MASKED: tl.constexpr, EXACT: tl.constexpr):
    """softmax or log_softmax of a fp32 tile from its rows' scaled states (a, rest = 2**64 r)."""
    bad = (rest != rest) | (a == float("inf"))  # NaN or +inf in the row: a NaN row, as torch
    if not MASKED:
        bad = bad | (a == float("-inf"))  # all -inf without mask=: NaN, as torch
    a_safe = tl.where(tl.abs(a) < float("inf"), a, 0.0)[:, None]  # with mask=, an empty row: d = -inf
    # r = rest 2**-64 rounded once, also where it is subnormal (a confident row's log_softmax at the max is -r)
    L = tl.where(bad, float("nan"), log1p_acc(rest * TWO_M64))[:, None]
    if LOG:
        # d - L: two non-positive terms, no cancellation; float32 adds the TwoSum tail of d last.
        if EXACT:
            hi, lo = two_diff(x, a_safe)
            return (hi - L) + lo
        else:
            return (x - a_safe) - L
    else:
        denom = tl.where(bad, float("nan"), TWO_64 + rest)[:, None]
        # 2**64 exp(d) / (2**64 + rest): normal operands, one rounding also where p is subnormal; a true division
        # (the `/` operator is div.full.f32, 2 ulp, on the GPU)
        return div_rn(exp_scaled_diff(x, a_safe, EXACT), denom + tl.zeros_like(x))


@triton.jit
def _times_g(y, x, a, rest, g):
    """The logsumexp gradient g softmax(x); a row holding +inf gets torch's exp(x - inf) * g: 0 off the
    infinities, NaN on them (its softmax is a NaN row)."""
    inf_row = ((a == float("inf")) & (rest == rest))[:, None]
    return tl.where(inf_row, tl.where(x == float("inf"), float("nan"), 0.0), y) * g


@triton.jit
def _state_kernel(x_ptr, m_ptr, out_ptr, ws_ptr, R, N, K,
                  sx_p, sx_n, sx_k, sm_p, sm_n, sm_k, SEGMENT, SPLIT,
                  HAS_MASK: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per (row block, segment): lse into out (SPLIT == 1) or the partial scaled state (a, rest = 2**64 r)
    into ws[2, R, SPLIT]."""
    pid = tl.program_id(0)
    pid_m = pid // SPLIT
    seg = pid % SPLIT
    rows, row_ok, p, k = _row_offsets(pid_m, R, K, sx_p, sx_k, BLOCK_M)
    xrow = p * sx_p + k * sx_k
    mrow = p * sm_p + k * sm_k
    start = seg.to(tl.int64) * SEGMENT
    end = tl.minimum(start + SEGMENT, N)
    a, rest = _segment_state(x_ptr, m_ptr, xrow, mrow, row_ok, start, end, sx_n, sm_n,
                             HAS_MASK, EXACT, BLOCK_M, BLOCK_N)
    if SPLIT == 1:
        tl.store(out_ptr + rows, finish_lse_scaled(a, rest), mask=row_ok)
    else:
        tl.store(ws_ptr + rows * SPLIT + seg, a, mask=row_ok)
        tl.store(ws_ptr + (R + rows) * SPLIT + seg, rest, mask=row_ok)


@triton.jit
def _load_states(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S: tl.constexpr):
    """The SPLIT partial states of each row, from L2 (".cg": the resident regime's were written by other SMs
    during this launch)."""
    s = tl.arange(0, BLOCK_S)
    ok = row_ok[:, None] & (s[None, :] < SPLIT)
    off = rows[:, None] * SPLIT + s[None, :]
    a = tl.load(ws_ptr + off, mask=ok, other=float("-inf"), cache_modifier=".cg")
    rest = tl.load(ws_ptr + R * SPLIT + off, mask=ok, other=0.0, cache_modifier=".cg")
    return a, rest


@triton.jit
def _lse_combine_kernel(ws_ptr, out_ptr, R, SPLIT, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < R
    a_s, rest_s = _load_states(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S)
    a, rest = combine_states_scaled(a_s, rest_s, EXACT)
    tl.store(out_ptr + rows, finish_lse_scaled(a, rest), mask=row_ok)


@triton.jit
def _softmax_fwd_kernel(x_ptr, m_ptr, y_ptr, ws_ptr, g_ptr, cnt_ptr, R, N, K,
                        sx_p, sx_n, sx_k, sm_p, sm_n, sm_k, sy_p, sy_n, sy_k, sg_p, sg_k, SEGMENT, SPLIT,
                        LOG: tl.constexpr, HAS_MASK: tl.constexpr, EXACT: tl.constexpr, ONE_TILE: tl.constexpr,
                        FROM_WS: tl.constexpr, SCALE_G: tl.constexpr, REVERSE: tl.constexpr,
                        RESIDENT: tl.constexpr, WAIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """softmax / log_softmax; SCALE_G: softmax times a per-row g (the logsumexp backward, g of shape (P, 1, K));
    REVERSE: the output pass walks its chunks (and, from the workspace, the programs) last first.
    RESIDENT: program (row block, seg) holds tile seg of its rows, publishes its state to ws, meets the row
    block's SPLIT programs at cnt[row block] and writes the tile; WAIT=False only arrives (the interpreter's
    first launch, see _lib.group_barrier)."""
    if FROM_WS:
        pid = program_index(REVERSE)
    else:
        pid = tl.program_id(0)
    pid_m = pid // SPLIT
    seg = pid % SPLIT
    rows, row_ok, p, k = _row_offsets(pid_m, R, K, sx_p, sx_k, BLOCK_M)
    xrow = p * sx_p + k * sx_k
    mrow = p * sm_p + k * sm_k
    yrow = p * sy_p + k * sy_k
    if SCALE_G:
        g = to_f32(tl.load(g_ptr + (p * sg_p + k * sg_k), mask=row_ok, other=0.0))[:, None]
    if ONE_TILE:  # "row": read once, reduce, write
        cols = tl.arange(0, BLOCK_N)
        x, ok = _load_row_tile(x_ptr, m_ptr, xrow, mrow, row_ok, cols, N, sx_n, sm_n, HAS_MASK)
        a, rest = tile_state_scaled(x, EXACT)
        y = _normalised(x, a, rest, LOG, HAS_MASK, EXACT)
        if SCALE_G:
            y = _times_g(y, x, a, rest, g)
        tl.store(y_ptr + (yrow[:, None] + cols.to(tl.int64)[None, :] * sy_n), round_to(y, y_ptr.dtype.element_ty),
                 mask=ok)
    elif RESIDENT:
        cols = seg.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        x, ok = _load_row_tile(x_ptr, m_ptr, xrow, mrow, row_ok, cols, N, sx_n, sm_n, HAS_MASK)
        a_c, rest_c = tile_state_scaled(x, EXACT)
        tl.store(ws_ptr + rows * SPLIT + seg, a_c, mask=row_ok)
        tl.store(ws_ptr + (R + rows) * SPLIT + seg, rest_c, mask=row_ok)
        complete = group_barrier(cnt_ptr + pid_m, SPLIT, WAIT)
        if WAIT:
            a_s, rest_s = _load_states(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S)
            a, rest = combine_states_scaled(a_s, rest_s, EXACT)
            y = _normalised(x, a, rest, LOG, HAS_MASK, EXACT)
            if SCALE_G:
                y = _times_g(y, x, a, rest, g)
            y = tl.where(complete, y, float("nan"))  # the group never met (see _lib.group_barrier): NaN, no hang
            tl.store(y_ptr + (yrow[:, None] + cols[None, :] * sy_n), round_to(y, y_ptr.dtype.element_ty), mask=ok)
    else:
        if FROM_WS:  # "split": the partial states of this row's segments, combined
            a_s, rest_s = _load_states(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S)
            a, rest = combine_states_scaled(a_s, rest_s, EXACT)
        else:  # "loop": the online pass over the whole row
            a, rest = _segment_state(x_ptr, m_ptr, xrow, mrow, row_ok, 0, N, sx_n, sm_n,
                                     HAS_MASK, EXACT, BLOCK_M, BLOCK_N)
        start = seg.to(tl.int64) * SEGMENT
        end = tl.minimum(start + SEGMENT, N)
        for n0 in range(start, end, BLOCK_N):
            cols = chunk_start(start, end, n0, BLOCK_N, REVERSE) + tl.arange(0, BLOCK_N)
            x, ok = _load_row_tile(x_ptr, m_ptr, xrow, mrow, row_ok, cols, end, sx_n, sm_n, HAS_MASK)
            y = _normalised(x, a, rest, LOG, HAS_MASK, EXACT)
            if SCALE_G:
                y = _times_g(y, x, a, rest, g)
            tl.store(y_ptr + (yrow[:, None] + cols.to(tl.int64)[None, :] * sy_n),
                     round_to(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_bwd_tile(y_ptr, g_ptr, m_ptr, yrow, grow, mrow, row_ok, cols, N, sy_n, sg_n, sm_n,
                   HAS_MASK: tl.constexpr):
    """fp32 (y, g, keep) tiles; padding reads y = 0 (-inf for log), g = 0, keep = False."""
    ok = row_ok[:, None] & (cols[None, :] < N)
    c64 = cols.to(tl.int64)[None, :]
    y = to_f32(tl.load(y_ptr + (yrow[:, None] + c64 * sy_n), mask=ok, other=0.0))
    g = to_f32(tl.load(g_ptr + (grow[:, None] + c64 * sg_n), mask=ok, other=0.0))
    if HAS_MASK:
        keep = (tl.load(m_ptr + (mrow[:, None] + c64 * sm_n), mask=ok, other=0) != 0) & ok
    else:
        keep = ok
    return y, g, keep, ok


@triton.jit
def _bwd_partials(y, g, keep, LOG: tl.constexpr):
    """Row partials (s, alive): s = sum(g y) (softmax) or sum of g over kept entries (log_softmax);
    alive = 1 when some kept y is above -inf or NaN (a row with mass, or a NaN row), else 0."""
    if LOG:
        s = tl.sum(tl.where(keep, g, 0.0), axis=1)
    else:
        s = tl.sum(g * y, axis=1)  # padding has y = 0 and g = 0
    live = keep & ((y > float("-inf")) | (y != y))  # explicit NaN test: GPU max ignores NaN, NumPy's does not
    alive = tl.max(tl.where(live, 1.0, 0.0), axis=1)
    return s, alive


@triton.jit
def _bwd_values(y, g, keep, s, alive, LOG: tl.constexpr, HAS_MASK: tl.constexpr, EXACT: tl.constexpr):
    if LOG:
        if EXACT:
            p = exp_acc(y)
        else:
            p = exp_fast(y)
        dx = g - p * s[:, None]
        if HAS_MASK:
            # masked entries, and rows with no mass left (every kept entry -inf), get 0
            dx = tl.where(keep & (alive > 0.0)[:, None], dx, 0.0)
    else:
        dx = y * (g - s[:, None])
    return dx


@triton.jit
def _load_partials(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S: tl.constexpr):
    """The rows' backward partials summed (s) and maxed (alive) over their SPLIT segments (from L2, as
    _load_states)."""
    sidx = tl.arange(0, BLOCK_S)
    sok = row_ok[:, None] & (sidx[None, :] < SPLIT)
    off = rows[:, None] * SPLIT + sidx[None, :]
    s = tl.sum(tl.load(ws_ptr + off, mask=sok, other=0.0, cache_modifier=".cg"), axis=1)
    alive = tl.max(tl.load(ws_ptr + R * SPLIT + off, mask=sok, other=0.0, cache_modifier=".cg"), axis=1)
    return s, alive


@triton.jit
def _softmax_bwd_kernel(y_ptr, g_ptr, m_ptr, dx_ptr, ws_ptr, cnt_ptr, R, N, K,
                        sy_p, sy_n, sy_k, sg_p, sg_n, sg_k, sm_p, sm_n, sm_k, sd_p, sd_n, sd_k,
                        SEGMENT, SPLIT,
                        LOG: tl.constexpr, HAS_MASK: tl.constexpr, EXACT: tl.constexpr, ONE_TILE: tl.constexpr,
                        PHASE: tl.constexpr, REVERSE: tl.constexpr, RESIDENT: tl.constexpr, WAIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """PHASE 0: "row"/"loop" in one launch; 1: split partials (s, alive) to ws; 2: combine them and write dx.
    REVERSE: the dx pass walks its chunks (and, in PHASE 2, the programs) last first.
    RESIDENT (PHASE 0): program (row block, seg) holds tiles seg of y and g, publishes its partials to ws,
    meets the row block's SPLIT programs at cnt[row block] (WAIT=False: arrive only) and writes its dx tile."""
    if PHASE == 2:
        pid = program_index(REVERSE)
    else:
        pid = tl.program_id(0)
    pid_m = pid // SPLIT
    seg = pid % SPLIT
    rows, row_ok, p, k = _row_offsets(pid_m, R, K, sy_p, sy_k, BLOCK_M)
    yrow = p * sy_p + k * sy_k
    grow = p * sg_p + k * sg_k
    mrow = p * sm_p + k * sm_k
    drow = p * sd_p + k * sd_k
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_N)
        y, g, keep, ok = _load_bwd_tile(y_ptr, g_ptr, m_ptr, yrow, grow, mrow, row_ok, cols, N, sy_n, sg_n, sm_n,
                                        HAS_MASK)
        s, alive = _bwd_partials(y, g, keep, LOG)
        dx = _bwd_values(y, g, keep, s, alive, LOG, HAS_MASK, EXACT)
        tl.store(dx_ptr + (drow[:, None] + cols.to(tl.int64)[None, :] * sd_n), round_to(dx, dx_ptr.dtype.element_ty),
                 mask=ok)
    elif RESIDENT:
        cols = seg.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        y, g, keep, ok = _load_bwd_tile(y_ptr, g_ptr, m_ptr, yrow, grow, mrow, row_ok, cols, N, sy_n, sg_n, sm_n,
                                        HAS_MASK)
        s_c, alive_c = _bwd_partials(y, g, keep, LOG)
        tl.store(ws_ptr + rows * SPLIT + seg, s_c, mask=row_ok)
        tl.store(ws_ptr + (R + rows) * SPLIT + seg, alive_c, mask=row_ok)
        complete = group_barrier(cnt_ptr + pid_m, SPLIT, WAIT)
        if WAIT:
            s, alive = _load_partials(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S)
            dx = _bwd_values(y, g, keep, s, alive, LOG, HAS_MASK, EXACT)
            dx = tl.where(complete, dx, float("nan"))
            tl.store(dx_ptr + (drow[:, None] + cols[None, :] * sd_n), round_to(dx, dx_ptr.dtype.element_ty), mask=ok)
    else:
        start = seg.to(tl.int64) * SEGMENT
        end = tl.minimum(start + SEGMENT, N)
        if PHASE == 2:
            s, alive = _load_partials(ws_ptr, rows, row_ok, R, SPLIT, BLOCK_S)
        else:
            s = tl.zeros([BLOCK_M], tl.float32)
            alive = tl.zeros([BLOCK_M], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                y, g, keep, ok = _load_bwd_tile(y_ptr, g_ptr, m_ptr, yrow, grow, mrow, row_ok, cols, end,
                                                sy_n, sg_n, sm_n, HAS_MASK)
                s_c, alive_c = _bwd_partials(y, g, keep, LOG)
                s += s_c
                alive = tl.maximum(alive, alive_c)
        if PHASE == 1:
            tl.store(ws_ptr + rows * SPLIT + seg, s, mask=row_ok)
            tl.store(ws_ptr + (R + rows) * SPLIT + seg, alive, mask=row_ok)
        else:
            for n0 in range(start, end, BLOCK_N):
                cols = chunk_start(start, end, n0, BLOCK_N, REVERSE) + tl.arange(0, BLOCK_N)
                y, g, keep, ok = _load_bwd_tile(y_ptr, g_ptr, m_ptr, yrow, grow, mrow, row_ok, cols, end,
                                                sy_n, sg_n, sm_n, HAS_MASK)
                dx = _bwd_values(y, g, keep, s, alive, LOG, HAS_MASK, EXACT)
                tl.store(dx_ptr + (drow[:, None] + cols.to(tl.int64)[None, :] * sd_n),
                         round_to(dx, dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------------------


def _collapse(shape, strides) -> int | None:
    """The single stride of a group of dims viewed as one, or None when they do not collapse."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    if not dims:
        return 0
    for (_, s0), (n1, s1) in zip(dims[:-1], dims[1:], strict=True):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def _pnk(t: Tensor, dim: int) -> tuple[Tensor, int, int, int]:
    """``t`` and the strides of its (P, N, K) view around ``dim``; a copy only when the outer or inner dims
    cannot be viewed as one (never for contiguous tensors, any dim, or a transposed 2-d tensor)."""
    shape, strides = t.shape, t.stride()
    sp = _collapse(shape[:dim], strides[:dim])
    sk = _collapse(shape[dim + 1:], strides[dim + 1:])
    if sp is None or sk is None:
        t = t.contiguous()
        return _pnk(t, dim)
    return t, sp, t.stride(dim), sk


def _geometry(x: Tensor, dim: int) -> tuple[int, int, int]:
    N = x.shape[dim]
    K = math.prod(x.shape[dim + 1:])
    P = math.prod(x.shape[:dim])
    return P * K, N, K


def _mask_args(mask: Tensor | None, x: Tensor, dim: int):
    if mask is None:
        return x, 0, 0, 0  # never read (HAS_MASK is False)
    m, sp, sn, sk = _pnk(mask, dim)
    return m.view(torch.uint8), sp, sn, sk


def _config(R: int, N: int, K: int, x: Tensor, sx_p: int, sx_n: int, sx_k: int) -> _tuning.SoftmaxConfig:
    # Strided rows load as 16-byte vectors only where Triton sees 16 adjacent, 16-aligned rows: adjacent
    # (sx_k == 1), K and sx_p multiples of 16 (so r // K is constant per block) and a 16-byte aligned base
    # (Triton's specialisation of integer and pointer arguments).
    vector_rows = sx_k == 1 and K % 16 == 0 and sx_p % 16 == 0 and x.data_ptr() % 16 == 0
    return _tuning.softmax_config(R, N, x.element_size(), sx_n != 1 and N > 1, x.device, vector_rows=vector_rows)


def _grid(cfg: _tuning.SoftmaxConfig, R: int) -> tuple[int]:
    return (triton.cdiv(R, cfg.BLOCK_M) * cfg.split,)


def _resident_workspace(cfg: _tuning.SoftmaxConfig, R: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The resident regime's per-tile partials (2, R, SPLIT) and one zeroed arrival counter per row block."""
    ws = torch.empty((2, R, cfg.split), dtype=torch.float32, device=device)
    return ws, torch.zeros(triton.cdiv(R, cfg.BLOCK_M), dtype=torch.int32, device=device)


def _arrive_first(cfg: _tuning.SoftmaxConfig, x: Tensor) -> bool:
    """The interpreter runs a grid's programs one after another, so a resident launch would wait forever for
    the programs after it: there the grid runs once with WAIT=False first (each program publishes its tile and
    arrives), and the waiting launch then finds its counters complete (_lib.group_barrier)."""
    return cfg.regime == "resident" and x.device.type != "cuda"


def _states(x, dim, mask, cfg, R, N, K, lse_out):
    """Launch the state kernel: lse into ``lse_out`` (split == 1) or partial states into a new workspace."""
    xv, sx_p, sx_n, sx_k = _pnk(x, dim)
    m, sm_p, sm_n, sm_k = _mask_args(mask, x, dim)
    ws = torch.empty((2, R, cfg.split), dtype=torch.float32, device=x.device) if cfg.split > 1 else lse_out
    _state_kernel[_grid(cfg, R)](
        xv, m, lse_out, ws, R, N, K, sx_p, sx_n, sx_k, sm_p, sm_n, sm_k, cfg.segment, cfg.split,
        HAS_MASK=mask is not None, EXACT=x.dtype == torch.float32, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        num_warps=cfg.num_warps, **FP_OPTIONS,
    )
    return ws


def _normalise_launch(x: Tensor, dim: int, mask: Tensor | None, log: bool, out: Tensor, g: Tensor | None) -> Tensor:
    R, N, K = _geometry(x, dim)
    xv, sx_p, sx_n, sx_k = _pnk(x, dim)
    m, sm_p, sm_n, sm_k = _mask_args(mask, x, dim)
    yv, sy_p, sy_n, sy_k = _pnk(out, dim)
    assert yv.data_ptr() == out.data_ptr() and yv.stride() == out.stride(), "out must be viewable as (P, N, K)"
    gv, sg_p, sg_k = (xv, 0, 0) if g is None else (lambda t: (t[0], t[1], t[3]))(_pnk(g, dim))
    cfg = _config(R, N, K, xv, sx_p, sx_n, sx_k)
    ws = cnt = xv
    if cfg.regime == "split":
        ws = _states(xv, dim, mask, cfg, R, N, K, xv)
    elif cfg.regime == "resident":
        ws, cnt = _resident_workspace(cfg, R, x.device)
    reverse = _tuning.softmax_reverse(cfg, R, N, x.element_size(), x.device)
    args = (xv, m, yv, ws, gv, cnt, R, N, K, sx_p, sx_n, sx_k, sm_p, sm_n, sm_k, sy_p, sy_n, sy_k, sg_p, sg_k,
            cfg.segment, cfg.split)
    meta = dict(LOG=log, HAS_MASK=mask is not None, EXACT=x.dtype == torch.float32, ONE_TILE=cfg.regime == "row",
                FROM_WS=cfg.regime == "split", SCALE_G=g is not None, REVERSE=reverse,
                RESIDENT=cfg.regime == "resident", BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                BLOCK_S=triton.next_power_of_2(cfg.split), num_warps=cfg.num_warps, **FP_OPTIONS)
    if _arrive_first(cfg, x):
        _softmax_fwd_kernel[_grid(cfg, R)](*args, WAIT=False, **meta)
    _softmax_fwd_kernel[_grid(cfg, R)](*args, WAIT=True, **meta)
    return out


def softmax_fwd_out(x: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False, out: Tensor) -> Tensor:
    """softmax (``log=False``) or log_softmax of ``x`` along ``dim`` into ``out`` (x's shape and dtype)."""
    if out.numel() == 0 or x.shape[dim] == 0:
        return out
    if x.dtype == torch.float64:
        plain.normalize_fwd(x.movedim(dim, -1), None if mask is None else mask.movedim(dim, -1), log,
                            out.movedim(dim, -1))
        return out
    return _normalise_launch(x, dim, mask, log, out, None)


def softmax_fwd(x: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False) -> Tensor:
    return softmax_fwd_out(x, dim, mask=mask, log=log, out=torch.empty_like(x, memory_format=torch.contiguous_format))


def logsumexp_fwd(x: Tensor, dim: int, *, mask: Tensor | None = None) -> Tensor:
    """lse along ``dim`` in fp32 (fp64 for fp64 input), the dim kept with size 1."""
    wd = plain.working_dtype(x.dtype)
    shape = list(x.shape)
    shape[dim] = 1
    if x.shape[dim] == 0:
        return torch.full(shape, -math.inf, dtype=wd, device=x.device)
    if x.dtype == torch.float64:
        return plain.lse_fwd(x.movedim(dim, -1), None if mask is None else mask.movedim(dim, -1)).unsqueeze(dim)
    out = torch.empty(shape, dtype=wd, device=x.device)
    if x.numel() == 0:
        return out
    R, N, K = _geometry(x, dim)
    xv, sx_p, sx_n, sx_k = _pnk(x, dim)  # xv: x, or its one copy where the dims do not collapse
    cfg = _config(R, N, K, xv, sx_p, sx_n, sx_k)
    if cfg.regime == "row":  # one chunk covers the row: the state kernel reads it once
        cfg = cfg._replace(segment=N)
    ws = _states(xv, dim, mask, cfg, R, N, K, out)
    if cfg.split > 1:
        BLOCK_S = triton.next_power_of_2(cfg.split)
        BLOCK_M = max(1, min(128, 4096 // BLOCK_S))
        _lse_combine_kernel[(triton.cdiv(R, BLOCK_M),)](
            ws, out, R, cfg.split, EXACT=x.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S, num_warps=4,
            **FP_OPTIONS,
        )
    return out


def softmax_bwd_out(y: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False,
                    out: Tensor) -> Tensor:
    """Gradient of softmax (``log=False``) or log_softmax from its output ``y`` and upstream ``g``."""
    if out.numel() == 0:
        return out
    if y.dtype == torch.float64:
        yv, gv, dv = y.movedim(dim, -1), g.movedim(dim, -1), out.movedim(dim, -1)
        if log:
            plain.log_softmax_bwd(yv, gv, None if mask is None else mask.movedim(dim, -1), dv)
        else:
            plain.softmax_bwd(yv, gv, dv)
        return out
    R, N, K = _geometry(y, dim)
    yv, sy_p, sy_n, sy_k = _pnk(y, dim)
    gv, sg_p, sg_n, sg_k = _pnk(g, dim)
    m, sm_p, sm_n, sm_k = _mask_args(mask, y, dim)
    dv, sd_p, sd_n, sd_k = _pnk(out, dim)
    assert dv.data_ptr() == out.data_ptr() and dv.stride() == out.stride(), "out must be viewable as (P, N, K)"
    cfg = _config(R, N, K, yv, sy_p, sy_n, sy_k)
    args = (R, N, K, sy_p, sy_n, sy_k, sg_p, sg_n, sg_k, sm_p, sm_n, sm_k, sd_p, sd_n, sd_k, cfg.segment, cfg.split)
    reverse = _tuning.softmax_reverse(cfg, R, N, y.element_size() + g.element_size(), y.device)
    meta = dict(LOG=log, HAS_MASK=mask is not None, EXACT=y.dtype == torch.float32, ONE_TILE=cfg.regime == "row",
                REVERSE=reverse, RESIDENT=cfg.regime == "resident",
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_S=triton.next_power_of_2(cfg.split),
                num_warps=cfg.num_warps, **FP_OPTIONS)
    if cfg.regime == "split":
        ws = torch.empty((2, R, cfg.split), dtype=torch.float32, device=y.device)
        _softmax_bwd_kernel[_grid(cfg, R)](yv, gv, m, dv, ws, yv, *args, PHASE=1, WAIT=True, **meta)
        _softmax_bwd_kernel[_grid(cfg, R)](yv, gv, m, dv, ws, yv, *args, PHASE=2, WAIT=True, **meta)
    elif cfg.regime == "resident":
        ws, cnt = _resident_workspace(cfg, R, y.device)
        if _arrive_first(cfg, y):
            _softmax_bwd_kernel[_grid(cfg, R)](yv, gv, m, dv, ws, cnt, *args, PHASE=0, WAIT=False, **meta)
        _softmax_bwd_kernel[_grid(cfg, R)](yv, gv, m, dv, ws, cnt, *args, PHASE=0, WAIT=True, **meta)
    else:
        _softmax_bwd_kernel[_grid(cfg, R)](yv, gv, m, dv, yv, yv, *args, PHASE=0, WAIT=True, **meta)
    return out


def softmax_bwd(y: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False) -> Tensor:
    return softmax_bwd_out(y, g, dim, mask=mask, log=log,
                           out=torch.empty_like(y, memory_format=torch.contiguous_format))


def logsumexp_bwd_out(x: Tensor, lse: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None,
                      out: Tensor) -> Tensor:
    """dx = g softmax(x); ``g`` has ``dim`` kept with size 1.  ``lse`` (working precision, dim kept) is the
    forward's result; float64 uses it (reference path), the kernels recompute the row state instead."""
    if out.numel() == 0:
        return out
    if x.dtype == torch.float64:
        plain.lse_bwd(x.movedim(dim, -1), lse.squeeze(dim), g.squeeze(dim),
                      None if mask is None else mask.movedim(dim, -1), out.movedim(dim, -1))
        return out
    # softmax(x) * g, the softmax recomputed from x (as the reference path): exp(x - lse) with a rounded
    # fp32 lse carries |lse| u of error into every entry (2000 ulps at an offset of 1e4).
    return _normalise_launch(x, dim, mask, False, out, g)


def logsumexp_bwd(x: Tensor, lse: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None) -> Tensor:
    return logsumexp_bwd_out(x, lse, g, dim, mask=mask, out=torch.empty_like(x, memory_format=torch.contiguous_format))
