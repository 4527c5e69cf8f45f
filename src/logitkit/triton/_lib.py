"""Shared @triton.jit helpers for the softmax family and cross-entropy (stable names: other kernels import them).

A row's state is (a, r): its max ``a`` and its rest sum ``r = sum over all entries but one argmax of
exp(x - a)`` (ties count 1 each), so ``sum exp(x) = exp(a) * (1 + r)`` and ``lse = a + log1p(r)``
(NUMERICS.md).  The empty state is (-inf, 0); NaN in a row makes ``r`` NaN and it stays NaN through merges.

Names (keep stable):
  exp_fast(x)                     exp for fp32 working values of half inputs (hardware approx is plenty)
  exp_acc(x)                      accurate exp (libdevice expf, <= 2 ulp) for float32 inputs
  two_diff(x, a)                  (hi, lo) with hi + lo == x - a exactly, lo = 0 where hi is not finite
  log1p_acc(r)                    accurate log1p (libdevice)
  finish_lse(a, r)                a + log1p(r) with the special rows: -inf, +inf, NaN
  The kernels carry the rest sum scaled (R = 2**64 r, so subnormal terms keep their bits): tile_state_scaled,
  merge_state_scaled, merge_state_comp, combine_states_scaled, finish_lse_scaled, exp_scaled* (below).
  FP_OPTIONS                      launch options every kernel using these helpers passes (``**FP_OPTIONS``)
  chunk_start(start, end, n0, B, R) start column of a second pass's chunk at step n0, last first when R
  program_index(REV)              tl.program_id(0), counted from the last program when REV
  group_barrier(cnt, n, WAIT)     arrive at a group counter and (WAIT) spin until n programs have arrived
"""

import triton
import triton.language as tl

from .._config import interpreter_enabled

# libdevice calls do not run in Triton's interpreter, where tl.exp / tl.log are numpy's (accurate) functions.
# triton.jit itself decides interpreter or compiler when it decorates, so this module decides with it.
_INTERPRETED = interpreter_enabled()
if not _INTERPRETED:
    from triton.language.extra import libdevice

# Compile options for every launch (the interpreter ignores them), so the GPU rounds as the interpreter does:
# - enable_fp_fusion=False: each + - * rounded on its own.  Triton 3.6-3.9 contract a * b + c into one fma by
#   default (3.9 warns that 3.10 turns it off), which breaks the error-free transformations below: two_prod's
#   split collapses (ah = a) and two_sum(s, a * b) takes the unrounded product, 1/4 ulp per compensated merge.
# - enable_reflect_ftz=False: libdevice's non-flushing paths (Triton's default is the FTZ variant), else
#   log1p_acc(r) is 0 for subnormal r, the loss / -log_softmax of a confident row at its maximum.
# libdevice's own fma calls are explicit and stay fused.  Both are CUDA options in Triton 3.6-3.9 (a backend
# drops the options it does not know: HIP has no enable_reflect_ftz).
FP_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


@triton.jit
def exp_fast(x):
    return tl.exp(x)


if _INTERPRETED:

    @triton.jit
    def exp_acc(x):
        # NumPy's float32 exp is 2.3 ulp off at worst; in float64 it stands in for an accurate exp.
        return tl.exp(x.to(tl.float64)).to(x.dtype)

    @triton.jit
    def log1p_acc(r):
        # Goldberg's log1p from an accurate log (float64): the rounding of 1 + r compensated by r / (u - 1).
        r64 = r.to(tl.float64)
        u = 1.0 + r64
        return tl.where(u == 1.0, r64, tl.log(u) * (r64 / (u - 1.0))).to(r.dtype)

else:

    @triton.jit
    def exp_acc(x):
        # tl.exp lowers to ex2.approx(x * log2 e): |x| * 2**-24 relative error from the product alone.
        return libdevice.exp(x)

    @triton.jit
    def log1p_acc(r):
        return libdevice.log1p(r)


@triton.jit
def two_diff(x, a):
    # Knuth's TwoSum of x + (-a): hi + lo == x - a exactly (no fast-math reassociation in Triton).
    hi = x - a
    bp = hi - x
    lo = (x - (hi - bp)) - (bp + a)
    lo = tl.where(tl.abs(hi) < float("inf"), lo, 0.0)  # inf - inf would make lo NaN
    return hi, lo


@triton.jit
def finish_lse(a, r):
    """lse = a + log1p(r); an empty row gives -inf, a +inf entry +inf, NaN NaN."""
    lse = a + log1p_acc(r)
    lse = tl.where(a == float("-inf"), float("-inf"), lse)
    lse = tl.where(a == float("inf"), float("inf"), lse)
    return tl.where(r != r, float("nan"), lse)


if _INTERPRETED:

    @triton.jit
    def round_to(y, dtype: tl.constexpr):
        """y (fp32) rounded to ``dtype`` to nearest even; the interpreter's own bf16 cast truncates."""
        if dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(dtype)

else:

    @triton.jit
    def round_to(y, dtype: tl.constexpr):
        """y (fp32) rounded to ``dtype`` to nearest even (cvt.rn)."""
        return y.to(dtype)


if _INTERPRETED:

    @triton.jit
    def to_f32(v):
        """v widened to fp32 exactly; the interpreter's own bf16 cast flushes subnormals to zero."""
        if v.dtype == tl.bfloat16:
            return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            return v.to(tl.float32)

else:

    @triton.jit
    def to_f32(v):
        """v widened to fp32 (exact)."""
        return v.to(tl.float32)


# Appended for the cross-entropy kernels (generic: any kernel may use them) ---------------------------------
#   exp_scaled(hi, lo)    2**64 exp(hi + lo), full fp32 precision also where exp(hi + lo) is subnormal
#   div_rn(a, b)          a / b correctly rounded ('/' is div.full.f32, 2 ulp, on CUDA)
#   tanh_acc(x)           accurate tanh (libdevice; float64 in the interpreter)

TWO_64 = tl.constexpr(18446744073709551616.0)  # 2**64: the scale of exp_scaled (exact in fp32)
TWO_M64 = tl.constexpr(5.421010862427522e-20)  # 2**-64


@triton.jit
def exp_scaled(hi, lo):
    """2**64 exp(hi + lo) (hi + lo = a shift x - a, lo the TwoSum part): a rest sum of such terms keeps the
    bits of terms whose exp is subnormal in fp32 (below e**-87), which exp(hi) would round to 2**-149 steps.

    For hi < -80 it is exp(hi + C_HI) (1 + lo + C_LO) with C_HI + C_LO = 64 ln 2: hi + C_HI is exact there
    (|hi| >= 64 has an ulp >= 2**-17 and C_HI is a multiple of 2**-15, and results below -128 underflow anyway),
    and |lo + C_LO| < 2**-22 keeps the first-order correction exact to fp32.  Otherwise exp(hi) (1 + lo) 2**64,
    a power of two (exact).
    """
    deep = hi < -80.0
    z = tl.where(deep, hi + 44.361419677734375, hi)
    c = tl.where(deep, lo + -1.2189787668148710e-07, lo)
    e = exp_acc(z)
    e = e + e * c
    return tl.where(deep, e, e * TWO_64)


if _INTERPRETED:

    @triton.jit
    def div_rn(a, b):
        return a / b  # NumPy's float32 division is correctly rounded

    @triton.jit
    def tanh_acc(x):
        # NumPy's float32 tanh is not correctly rounded: tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)) in
        # float64, expm1 by Goldberg's trick, stands in for libdevice's.
        z = -2.0 * tl.abs(x.to(tl.float64))
        u = tl.exp(z)
        em1 = tl.where(u == 1.0, z, (u - 1.0) * (z / tl.where(u == 1.0, 1.0, tl.log(u))))
        em1 = tl.where(u == 0.0, -1.0, em1)
        t = (-em1 / (2.0 + em1)).to(tl.float32)
        return tl.where(x < 0, -t, t)

else:

    @triton.jit
    def div_rn(a, b):
        return tl.math.div_rn(a, b)

    @triton.jit
    def tanh_acc(x):
        return libdevice.tanh(x)


# Appended for the softmax kernels (generic: any kernel may use them) --------------------------------------
# The row state carried scaled, (a, R) with R = 2**64 r exact: terms from exp_scaled keep their bits where
# exp(x - a) is subnormal in fp32 (the NUMERICS.md underflow family), which the unscaled state rounds to
# multiples of 2**-149 before the sum.  R <= 2**64 (V - 1) cannot overflow; the empty state is (-inf, 0).
#   exp_scaled_fast(hi)                   2**64 exp(hi) with exp_fast (half inputs: hi = x - a is exact)
#   exp_scaled_diff(x, a, EXACT)          2**64 exp(x - a); EXACT: TwoSum-carried, exp_scaled
#   exp_scaled_parts(hi, lo)              (e, de): exp_scaled(hi, lo) = e + de before its last rounding
#   sum_rows_acc(t, dt)                   per-row sum of t + dt (t >= 0), sum(t) exact up to its small tails
#   tile_state_scaled(x, EXACT)           tile_state with R = 2**64 r
#   merge_state_scaled(a1, R1, a2, R2, EXACT)   merge_state with R = 2**64 r
#   combine_states_scaled(a, R, EXACT)    combine_states with R = 2**64 r, the sum rounded once
#   two_sum(a, b) / two_prod(a, b)        (s, e) / (p, e): the exact result as a rounded value plus its error
#   merge_state_comp(a1, R1, C1, a2, R2, C2, EXACT)   merge_state_scaled on compensated states (a, R + C)
#   finish_lse_scaled(a, R)               finish_lse with R = 2**64 r (r = R 2**-64 rounded once)


@triton.jit
def exp_scaled_fast(hi):
    """2**64 exp(hi) for hi <= 0 with exp_fast: hi < -80 is shifted by C_HI exactly (see exp_scaled)."""
    deep = hi < -80.0
    e = exp_fast(tl.where(deep, hi + 44.361419677734375, hi))
    return tl.where(deep, e + e * -1.2189787668148710e-07, e * TWO_64)


@triton.jit
def exp_scaled_diff(x, a, EXACT: tl.constexpr):
    if EXACT:
        hi, lo = two_diff(x, a)
        return exp_scaled(hi, lo)
    else:
        return exp_scaled_fast(x - a)


@triton.jit
def exp_scaled_parts(hi, lo):
    """(e, de) with e + de = exp_scaled(hi, lo) unrounded: e the scaled exp(hi), de its first-order TwoSum
    correction, kept apart so that a sum adds the corrections without rounding each term twice."""
    deep = hi < -80.0
    e = exp_acc(tl.where(deep, hi + 44.361419677734375, hi))
    e = tl.where(deep, e, e * TWO_64)
    return e, e * tl.where(deep, lo + -1.2189787668148710e-07, lo)


@triton.jit
def sum_rows_acc(t, dt):
    """sum over axis 1 of t + dt, for finite t >= 0 below 2**100 and |dt| << t (a (BLOCK_M, BLOCK_N) tile).

    Rump's ExtractVector: with sigma = 2**(e + 1) BLOCK_N >= BLOCK_N max(t) a power of two, t_hi = (sigma + t)
    - sigma are multiples of ulp(sigma) whose partial sums stay below 2 sigma, so sum(t_hi) is exact in any
    order; only the tails t - t_hi (exact, each <= ulp(sigma) / 2) and dt are summed with rounding errors, and
    those are small beside the total: about one rounding overall instead of one per term.
    """
    m = tl.max(t, axis=1)
    e = m.to(tl.int32, bitcast=True) >> 23  # biased exponent of m (m >= 0): 2**(e - 126) > m
    p2 = (tl.minimum(e + 1, 254) << 23).to(tl.float32, bitcast=True)
    sigma = (p2 * t.shape[1])[:, None]
    t_hi = (sigma + t) - sigma  # no reassociation in Triton (as two_diff)
    t_lo = (t - t_hi) + dt
    return tl.sum(t_hi, axis=1) + tl.sum(t_lo, axis=1)


@triton.jit
def tile_state_scaled(x, EXACT: tl.constexpr):
    """(a, R = 2**64 r) per row of a fp32 tile; padding and masked-out entries must be -inf, NaN is kept."""
    isnan = x != x
    xs = tl.where(isnan, float("-inf"), x)  # max ignores NaN the same way on the GPU and in the interpreter
    a = tl.max(xs, axis=1)
    a_safe = tl.where(a == float("-inf"), 0.0, a)
    top = xs == a[:, None]
    # The max's own exp(0) = 1 is never added (rest sum); other ties add exactly 2**64 each via the count.
    cnt = tl.sum(top.to(tl.float32), axis=1)
    if EXACT:
        # float32: one rounding for the whole sum (V roundings cost 3 ulps of r at V = 33 already)
        hi, lo = two_diff(xs, a_safe[:, None])
        e, de = exp_scaled_parts(hi, lo)
        R = sum_rows_acc(tl.where(top, 0.0, e), tl.where(top, 0.0, de))
    else:
        R = tl.sum(tl.where(top, 0.0, exp_scaled_fast(xs - a_safe[:, None])), axis=1)
    R = R + (cnt - 1.0) * TWO_64
    R = tl.where(a == float("-inf"), 0.0, R)  # an empty (all -inf / masked) row: the state (-inf, 0)
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    return a, tl.where(has_nan, float("nan"), R)


@triton.jit
def _scale_scaled(a_lo, a_hi, EXACT: tl.constexpr):
    # 2**64 exp(a_lo - a_hi) with a_lo <= a_hi; equal maxima (also both +inf) scale by exactly 2**64.
    same = a_lo == a_hi
    a_hi_safe = tl.where(same | (a_hi == float("-inf")) | (a_hi == float("inf")), a_lo, a_hi)
    s = exp_scaled_diff(a_lo, a_hi_safe, EXACT)
    s = tl.where(same, TWO_64, s)
    s = tl.where((a_hi == float("inf")) & (a_lo < a_hi), 0.0, s)
    return s


@triton.jit
def merge_state_scaled(a1, R1, a2, R2, EXACT: tl.constexpr):
    """The online merge on scaled states: R = R_hi + (R_lo 2**-64 + 1) 2**64 exp(a_lo - a_hi)."""
    first = a1 >= a2
    a_hi = tl.where(first, a1, a2)
    a_lo = tl.where(first, a2, a1)
    R_hi = tl.where(first, R1, R2)
    R_lo = tl.where(first, R2, R1)
    s = _scale_scaled(a_lo, a_hi, EXACT)
    # R_lo 2**-64 may underflow only where it is negligible beside 1
    R = tl.where(a_hi == float("-inf"), R_hi + R_lo, R_hi + (R_lo * TWO_M64 + 1.0) * s)
    return a_hi, R


@triton.jit
def combine_states_scaled(a, R, EXACT: tl.constexpr):
    """Combine a row's partial scaled states (unused slots: (-inf, 0)): the max's slot keeps its R, every other
    slot adds (R_s 2**-64 + 1) 2**64 exp(a_s - a)."""
    A = tl.max(a, axis=1)
    idx = tl.arange(0, a.shape[1])[None, :]
    first = tl.min(tl.where(a == A[:, None], idx, a.shape[1]), axis=1)
    s = _scale_scaled(a, A[:, None] + tl.zeros_like(a), EXACT)
    # (1 + r_s) s as t + dt exactly (but for s's own rounding): the sum is rounded once (sum_rows_acc)
    p, pe = two_prod(R * TWO_M64, s)
    t, te = two_sum(s, p)
    keep = (idx == first[:, None]) | (A[:, None] == float("-inf"))
    return A, sum_rows_acc(tl.where(keep, R, t), tl.where(keep, 0.0, te + pe))


@triton.jit
def finish_lse_scaled(a, R):
    """lse = a + log1p(R 2**-64); an empty row gives -inf, a +inf entry +inf, NaN NaN."""
    return finish_lse(a, R * TWO_M64)  # r rounded once, also where it is subnormal (log1p(r) = r there)


@triton.jit
def two_sum(a, b):
    """(s, e) with s + e == a + b exactly (Knuth's TwoSum; no reassociation in Triton)."""
    s = a + b
    bp = s - a
    return s, (a - (s - bp)) + (b - bp)


@triton.jit
def two_prod(a, b):
    """(p, e) with p + e == a b exactly unless a product half under/overflows (Dekker; without FMA, which the
    interpreter does not round once).  Needs FP_OPTIONS: contracted, ca - (ca - a) becomes a and the split is gone."""
    p = a * b
    ca = a * 4097.0
    ah = ca - (ca - a)
    al = a - ah
    cb = b * 4097.0
    bh = cb - (cb - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@triton.jit
def merge_state_comp(a1, R1, C1, a2, R2, C2, EXACT: tl.constexpr):
    """merge_state_scaled on compensated states (a, R + C), C the rounding errors of R so far: the merge's own
    roundings go into C, so an online loop over many chunks rounds its rest sum once (R + C) instead of once
    per chunk (65 chunks: 3 ulps of log_softmax, 7 of softmax).  Only the scale exp(a_lo - a_hi) stays rounded."""
    first = a1 >= a2
    a_hi = tl.where(first, a1, a2)
    a_lo = tl.where(first, a2, a1)
    R_hi = tl.where(first, R1, R2)
    R_lo = tl.where(first, R2, R1)
    C_hi = tl.where(first, C1, C2)
    C_lo = tl.where(first, C2, C1)
    s = _scale_scaled(a_lo, a_hi, EXACT)
    p, pe = two_prod(R_lo * TWO_M64, s)  # r_lo s; R_lo 2**-64 may underflow only where negligible beside 1
    t, te = two_sum(s, p)  # (1 + r_lo) s
    R, e = two_sum(R_hi, t)
    C = C_hi + (e + (te + (pe + C_lo * TWO_M64 * s)))
    empty = a_hi == float("-inf")  # two empty states: (-inf, 0, 0); NaN stays NaN through R or C
    return a_hi, tl.where(empty, R_hi + R_lo, R), tl.where(empty, C_hi + C_lo, C)


@triton.jit
def chunk_start(start, end, n0, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """Start column of the chunk a second pass reads at the step whose forward start is ``n0`` (a loop ``for n0 in
    range(start, end, BLOCK)``): ``n0`` itself, or, when REVERSE, the chunk as far from the last one as ``n0`` is
    from ``start`` (the last chunk first: the pass re-reads the most recently read lines first; _tuning.py
    "second-pass order").  The forward loop stays the plain range loop: its code is the same as without this."""
    if REVERSE:
        return start + ((end - start - 1) // BLOCK) * BLOCK - (n0 - start)
    else:
        return n0


@triton.jit
def program_index(REVERSE: tl.constexpr):
    """``tl.program_id(0)``, counted from the last program when REVERSE (a second launch walking the first one's
    order backwards)."""
    if REVERSE:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        return tl.program_id(0)


# Polls of a group counter before group_barrier gives up (about 10 s of L2 round trips): a group that cannot
# complete (programs that never become resident) then yields NaN outputs instead of hanging the device.
GROUP_BARRIER_MAX_POLLS = tl.constexpr(1 << 24)


@triton.jit
def group_barrier(cnt_ptr, arrivals, WAIT: tl.constexpr):
    """Arrive at ``cnt_ptr`` (an int32 counter of one group of programs, zero before the launch) and, when WAIT,
    spin until ``arrivals`` programs have arrived; returns whether they did (False only after
    GROUP_BARRIER_MAX_POLLS polls: the caller writes NaN rather than hang).  The resident regime's barrier
    between the programs of one row group (_tuning.py "resident").  The CTA barrier orders every thread's earlier
    stores before the arrival; the scalar atomics are one thread's (Triton predicates them on one lane and
    broadcasts the result), release on arrival and acquire while polling, at GPU scope; the data written before
    the arrival must be read back with ``cache_modifier=".cg"`` (from L2: L1 is not coherent across SMs).
    Forward progress needs every program of a group resident at once: a group is consecutive program ids
    (dispatched in order) and at most _tuning.resident_group_limit programs.  The interpreter runs programs one
    after another: its launcher first runs the grid with WAIT=False (every program arrives), so the waiting
    launch finds its counters complete."""
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")
    seen = arrivals
    if WAIT:
        seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        polls = 1
        while (seen < arrivals) & (polls < GROUP_BARRIER_MAX_POLLS):
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
            polls += 1
        tl.debug_barrier()
    return seen >= arrivals
