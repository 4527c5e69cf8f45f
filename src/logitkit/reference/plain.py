"""The reference path: the NUMERICS.md algorithm in plain PyTorch, for the CPU and as the fallback anywhere.

Math:     per row a = max(x); d = x - a; r = sum of exp(d) over all entries but one argmax (the "rest" sum,
          ties count 1 each); L = log1p(r).  lse = a + L;  log_softmax = d - L;  softmax = exp(d) / (1 + r).
Traffic:  rows are processed in blocks of about BLOCK_ELEMS elements, so temporaries are O(block), never
          O(input); a non-last ``dim`` is handled by copying one block at a time into a (rows, V) buffer.
Numerics: two routes to the same accuracy.
          Fast (CPU, no mask, fp32/fp16/bf16): each block goes through torch's fused kernel in float64: there
          d = x - a is exact and exp/sum carry 29+ extra bits, so one final rounding is all that remains,
          except that log(1 + r) loses r when r is tiny. Those rows (L below ``_tiny``, the confident ones)
          are recomputed with the rest sum and log1p.
          General (mask=, accelerator fallback, float64): the rest-sum algorithm itself, in float32 for
          fp16/bf16 and fp32 (then d = x - a is carried as TwoSum hi + lo, because a rounded d costs |d| * u
          of relative accuracy in exp(d): 16 ulps at d = -50), float64 for float64.  The float32 work sums
          its terms in float64 where the device has it (not MPS), and forms the terms below exp(-80) scaled
          by 2**64 (the underflow edge: unscaled they keep a few bits), as the kernels do; measured on the
          CPU with the fast path switched off, float32, NUMERICS.md families, V up to 32768: log_softmax
          1.2 ulps, logsumexp 1.0, softmax 3.3 (before: 2608 for both at the underflow edge, log_softmax
          2.3 on N(0, 10)).
          Every block is computed on a contiguous (rows, V) copy, so results do not depend on layout.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements per block: large enough that the per-op overhead is amortised, small enough that the block's
# few temporaries stay in a core's L2 (each element pass over an L2-resident block is several times faster).
BLOCK_ELEMS = 1 << 16
# The fused fast path keeps one wide (R, V) block live between three ops: larger blocks amortise the
# per-block Python and dispatch overhead (about 40 us a block).
FAST_BLOCK_ELEMS = 1 << 18


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


class Workspace:
    """Reusable (R, V) buffers for the blocks of one call: fresh multi-MB allocations per block cost page faults."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
        key = (name, dtype, like.device)
        buf = self._bufs.get(key)
        n = like.numel()
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=like.device)
            self._bufs[key] = buf
        return buf[:n].view(like.shape)


# Blocks of one CPU call run on a pool of single-threaded workers (as many as torch's intra-op threads) rather
# than one after another, each op parallelised by torch: a block's few ops then run serially on one core, with
# no OpenMP fork/join per op (thousands per call), and a core taken by another process delays only the blocks
# its worker holds instead of every barrier.  Measured (4096 x 32000 fp32, 2 cores): alone, softmax 315 ms
# serial / 314 ms pooled (torch 180: most of the gap is the float64 work); beside one busy process, softmax
# 1050 -> 526 ms, log_softmax 1023 -> 484 ms (torch 261).  Every block computes exactly what it computed
# before: the results are bitwise those of the serial loop.
_POOL: tuple | None = None  # (pid, workers, executor), made on first use; a forked child makes its own
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _worker_init() -> None:
    torch.set_num_threads(1)  # this worker thread's own OpenMP setting: the caller's is untouched
    _LOCAL.worker = True


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != n:
            if _POOL is not None and _POOL[0] == os.getpid():
                _POOL[2].shutdown(wait=False)  # the thread count changed: let the old workers exit
            _POOL = (os.getpid(), n, ThreadPoolExecutor(n, "logitkit-cpu", _worker_init))
        return _POOL[2]


def map_blocks(fn: Callable, items: list, device: torch.device) -> list:
    """``[fn(item, ws) for item in items]``, with a Workspace per thread; on the CPU pool (above) when there are
    two or more blocks and more than one intra-op thread, and not under torch.compile or inside a worker."""
    serial = (torch.compiler.is_compiling() or device.type != "cpu" or len(items) < 2
              or getattr(_LOCAL, "worker", False))
    n = 1 if serial else torch.get_num_threads()  # (not asked while tracing: dynamo cannot trace it)
    if n < 2:
        ws = Workspace()
        return [fn(item, ws) for item in items]
    spaces: dict[int, Workspace] = {}

    def run(item):
        ws = spaces.setdefault(threading.get_ident(), Workspace())
        with torch.no_grad():  # grad mode is per thread; the callers run under no_grad
            return fn(item, ws)

    return list(_pool(n).map(run, items))


def _two_diff(x: Tensor, a: Tensor, ws: Workspace, finite: bool) -> tuple[Tensor, Tensor]:
    """x - a = hi + lo exactly (Knuth's TwoSum); entries with non-finite hi get lo = 0."""
    hi = torch.sub(x, a, out=ws.get("hi", x, x.dtype))
    bp = torch.sub(hi, x, out=ws.get("bp", x, x.dtype))  # the part of hi that came from -a
    lo = torch.sub(hi, bp, out=ws.get("lo", x, x.dtype))  # x', the part that came from x
    torch.sub(x, lo, out=lo)  # x - x'
    lo.sub_(bp.add_(a))  # ... + (-a - b')
    if not finite:
        lo.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return hi, lo


def two_diff(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """x - a = hi + lo exactly (TwoSum), fresh tensors; lo = 0 where hi is not finite."""
    return _two_diff(x, a, Workspace(), False)


# 64 ln 2 as an fp32 head (a multiple of 2**-18, so hi + head is exact for fp32 |hi| >= 64) and its remainder.
LN2_64_HI = 44.361419677734375
LN2_64_LO = -1.2189787668148710e-07


def deep_terms(d_hi: Tensor, d_lo: Tensor | None) -> tuple[Tensor, Tensor]:
    """(deep, 2**64 exp(d) on the deep entries and 0 elsewhere) of a float32 shift d = d_hi (+ d_lo).

    The underflow edge: exp(d) for d < -80 is near or below fp32's normal range, where it keeps few bits
    (exp(-104) has one). Formed scaled, 2**64 exp(d) = exp(d + 64 ln 2) (hi + LN2_64_HI is exact for
    |hi| >= 64, the constant's low part joins the first-order correction), such terms are summed apart and
    scaled back once; an entry's own exp(d) is then rounded once from the scaled value.
    """
    deep = d_hi < -80.0
    lo = LN2_64_LO if d_lo is None else d_lo + LN2_64_LO
    es = torch.exp(torch.where(deep, d_hi + LN2_64_HI, -math.inf))
    return deep, es + es * lo


def exp_and_deep(d_hi: Tensor, d_lo: Tensor | None) -> tuple[Tensor, Tensor]:
    """One exp pass for a float32 shift: (exp(d), ``deep_terms``' 2**64 exp(d) on the deep entries, 0 elsewhere).

    exp(d) is exp(hi) (1 + lo) to first order (just exp(hi) without ``d_lo``), and on the deep entries the
    scaled value times 2**-64, rounded once.
    """
    deep = d_hi < -80.0
    ez = torch.exp(torch.where(deep, d_hi + LN2_64_HI, d_hi))
    if d_lo is None:
        ez = torch.where(deep, ez + ez * LN2_64_LO, ez)
    else:
        ez = ez + ez * torch.where(deep, d_lo + LN2_64_LO, d_lo)
    return torch.where(deep, ez * 2.0**-64, ez), torch.where(deep, ez, 0.0)


def rest_sum_dtype(wd: torch.dtype, device: torch.device) -> torch.dtype:
    """Accumulation dtype of float32 rest sums: float64 where the device has it (not MPS), so that the terms'
    own roundings are all that remain."""
    return torch.float64 if wd == torch.float32 and device.type != "mps" else wd


@torch.no_grad()
def row_stats(x2: Tensor, mask2: Tensor | None, masked: bool, ws: Workspace | None = None) -> Stats:
    """(max, rest-sum) statistics of each row of a contiguous (R, V) block, V >= 1.

    ``masked`` selects the safe behaviour for rows whose max is -inf (all -inf or all masked out):
    softmax 0 / log_softmax -inf instead of torch's NaN.  The returned tensors may live in ``ws``'s buffers,
    valid until the next call with the same workspace.
    """
    ws = Workspace() if ws is None else ws
    wd = working_dtype(x2.dtype)
    xw = x2 if x2.dtype == wd else torch.empty(x2.shape, dtype=wd, device=x2.device).copy_(x2)
    if mask2 is not None:
        xw = xw.masked_fill(~mask2, -math.inf)  # masked entries (NaN included) leave the row
    a = xw.amax(dim=1, keepdim=True)
    # Every max and min finite (a NaN or inf anywhere makes the spread non-finite): no guard is needed below.
    finite = (
        mask2 is None
        and xw.device.type == "cpu"  # elsewhere the check would be a host sync: keep the guards instead
        and not torch.compiler.is_compiling()
        and bool(torch.isfinite((a - xw.amin(dim=1, keepdim=True)).sum()))
    )
    # A ±inf max would turn d into NaN; shift by 0 instead and repair those rows below.
    a_safe = a if finite else torch.where(torch.isinf(a), torch.zeros_like(a), a)
    if x2.dtype == torch.float32:
        d_hi, d_lo = _two_diff(xw, a_safe, ws, finite)  # exp(hi + lo) = exp(hi) (1 + lo); |lo| <= u |hi|
    else:
        d_hi, d_lo = torch.sub(xw, a_safe, out=ws.get("hi", xw, wd)), None
    es = None  # 2**64 exp(d) of the deep entries (float32 work: the underflow edge, see deep_terms)
    if wd == torch.float32:
        e, es = exp_and_deep(d_hi, d_lo)
        e_norm = torch.where(es > 0, 0.0, e)
    else:
        e = e_norm = torch.exp(d_hi, out=ws.get("e", xw, wd))
    # The rest sum leaves out one max's exp(0) = 1, so nothing small is lost against it: sum the entries
    # below 1, then add back the k - 1 other maxima (k = number of exact 1s, recovered as an integer).
    acc = rest_sum_dtype(wd, x2.device)
    s_all = e_norm.sum(dim=1, keepdim=True, dtype=acc)
    below = F.threshold(torch.neg(e_norm, out=ws.get("t", xw, wd)), -1.0, 0.0, inplace=True)  # -e where e < 1
    s_rest = below.sum(dim=1, keepdim=True, dtype=acc).neg_()
    r = (s_all - s_rest).round_().sub_(1.0).add_(s_rest)
    if es is not None:
        r = r.add_(es.sum(dim=1, keepdim=True, dtype=acc).mul_(2.0**-64))
    if not finite:
        r = torch.where(torch.isneginf(a), torch.zeros_like(r), r)  # no entries: r = 0 (lse -inf, softmax 0)
    L = torch.log1p(r).to(wd)
    r = r.to(wd)
    if not finite:
        # +inf anywhere -> NaN row (as torch); a -inf max -> NaN row unless mask= semantics were asked for.
        bad = torch.isposinf(a) if masked else torch.isinf(a)
        L = torch.where(bad, torch.full_like(L, math.nan), L)
    return Stats(d_hi, d_lo, e, a, L, r)


def lse_of(s: Stats) -> Tensor:
    """a + L, with lse = a for infinite a (−inf for empty/all −inf rows, +inf when +inf is present)."""
    a_safe = torch.where(torch.isinf(s.a), torch.zeros_like(s.a), s.a)
    return torch.where(torch.isinf(s.a), s.a, a_safe + s.L)


def log_softmax_from(s: Stats, out: Tensor | None = None) -> Tensor:
    # d - L: both terms <= 0, so the subtraction never cancels.
    res = torch.sub(s.d_hi, s.L, out=out) if out is not None else s.d_hi - s.L
    return res if s.d_lo is None else res.add_(s.d_lo)


def softmax_from(s: Stats, out: Tensor | None = None) -> Tensor:
    denom = torch.where(torch.isnan(s.L), s.L, 1.0 + s.r)
    # A true division, not a multiply by the reciprocal: one rounding per entry.
    return torch.div(s.e, denom, out=out) if out is not None else s.e / denom


def d_full(s: Stats) -> Tensor:
    return s.d_hi if s.d_lo is None else s.d_hi + s.d_lo


# ---------------------------------------------------------------------------------------------------------
# The fast CPU path: torch's fused kernel one precision up, with the rest sum where log(1 + r) loses digits.
# ---------------------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fast path's compute dtype: float64 (the fused kernel's float32 sums lose too much for halves:
    torch adds each exp into a lane that already holds the max's 1, so every addition may round)."""
    return torch.float64


def _tiny(V: int, a: Tensor | float) -> Tensor | float:
    """Rows with L = log1p(r) below this get the rest sum.

    The fused kernel's L carries an absolute error of about (V / lanes + 1) * 2**-53 from summing next to
    the max's 1, plus |max| * 2**-53 where L is recovered as lse - max; that must stay under a quarter ulp
    of a float32 output relative to L (2**-26), so L must exceed 2**-26 (1 + V / 4 + |max|) (x 2 margin).
    """
    if not isinstance(a, Tensor):
        return (abs(a) + (1 + V / 4)) * 2.0**-25
    return (a.abs().nan_to_num(0.0, 0.0, 0.0) + (1 + V / 4)) * 2.0**-25


def fast_path(x: Tensor) -> bool:
    """CPU tensors of a dtype with a wider one: served by torch's fused kernels in float64 (+ repair)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, *_HALF)


def _masked(x2: Tensor, m2: Tensor | None) -> Tensor:
    """Masked-out entries (NaN and +inf included) set to -inf: they leave the row."""
    return x2 if m2 is None else x2.masked_fill(~m2, -math.inf)


def _repair(fix: Tensor, xw: Tensor, dst: Tensor, exact) -> None:
    """dst[i] = exact(xw[rows])[...] for the rows with ``fix`` (R, 1) set, ``exact`` mapping (n, V) -> (n, k).

    Eagerly only the flagged rows are recomputed (a host sync, fine on the CPU); under torch.compile, which
    cannot trace data-dependent row lists, every row is recomputed and selected, giving the same values.
    """
    if torch.compiler.is_compiling():
        dst.copy_(torch.where(fix, exact(xw), dst))
        return
    rows = fix.view(-1).nonzero().view(-1)
    if rows.numel():
        dst.index_copy_(0, rows, exact(xw.index_select(0, rows)))


def wide_fused(x2: Tensor, log: bool, ws: Workspace | None) -> Tensor:
    """torch's fused log_softmax / softmax of a contiguous (R, V) block, one precision up (``wide_dtype``).

    With a workspace the widened input and the result live in its reusable buffers: a fresh multi-MB tensor
    per block costs page faults on every block (glibc returns large freed blocks to the OS), which made the
    timings bimodal. The result is valid until the workspace's next use.
    """
    wide = wide_dtype(x2.dtype)
    if ws is None:
        return torch.log_softmax(x2, 1, dtype=wide) if log else torch.softmax(x2, 1, dtype=wide)
    xw = ws.get("fused_in", x2, wide).copy_(x2)
    out = ws.get("fused_out", x2, wide)
    return torch._log_softmax(xw, 1, False, out=out) if log else torch._softmax(xw, 1, False, out=out)


@torch.no_grad()
def block_logp(x2: Tensor, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """(log_softmax, L) of a contiguous (R, V) block in ``wide_dtype``, accurate to the output's rounding.

    Off the fast path (accelerator tensors, float64) the rows come from ``row_stats``; with torch's edge
    behaviour (NaN rows for all -inf or any +inf) in both cases.
    """
    wide = wide_dtype(x2.dtype)
    if not fast_path(x2):
        s = row_stats(x2.to(wide), None, False, ws)
        y = s.d_hi.to(wide) - s.L.to(wide)
        return (y if s.d_lo is None else y.add_(s.d_lo.to(wide))), s.L.to(wide)
    # The shifted formula in the wide dtype: d = x - max is exact there, exp and the sum carry 29 (or 13)
    # extra bits, so every entry is right after one rounding, except through log(1 + r) for tiny r.
    y = wide_fused(x2, True, ws)
    L = y.amax(dim=1, keepdim=True).neg_()  # the max's log-probability is 0 - L
    # y at the argmax is exactly -log(S) (x - max = 0 there): no |max| term in the threshold. NaN rows
    # compare False and keep torch's NaN.
    fix = L < _tiny(x2.shape[1], torch.zeros_like(L))

    def exact(rows: Tensor) -> Tensor:
        s = row_stats(rows.to(wide), None, False, ws)
        return log_softmax_from(s)

    _repair(fix, x2, y, exact)
    _repair(fix, y, L, lambda rows: rows.amax(dim=1, keepdim=True).neg())  # L of the repaired rows
    return y, L


@torch.no_grad()
def block_probs(x2: Tensor, ws: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """(softmax, L) of a contiguous (R, V) block in ``wide_dtype``: what a gradient needs, without log p.

    On the fast path one fused softmax one precision up gives p (no repair needed: 1 + r is formed in the
    wide dtype); L = -log(max p) holds to the output's rounding except for tiny L (max p = 1/(1 + r) rounds
    r away), and those rows take the rest sum, as in ``block_logp``.
    """
    wide = wide_dtype(x2.dtype)
    if not fast_path(x2):
        s = row_stats(x2.to(wide), None, False, ws)
        return softmax_from(s).to(wide), s.L.to(wide)
    p = wide_fused(x2, False, ws)
    L = p.amax(dim=1, keepdim=True).log_().neg_()
    fix = L < _tiny(x2.shape[1], torch.zeros_like(L))
    _repair(fix, x2, L, lambda rows: row_stats(rows.to(wide), None, False, ws).L)
    return p, L


# ---------------------------------------------------------------------------------------------------------
# Whole-tensor drivers over a (*lead, V) view (the softmax dim already moved last).
# ---------------------------------------------------------------------------------------------------------


def _blocks(xv: Tensor, mv: Tensor | None, budget: int = BLOCK_ELEMS):
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    for sl in iter_row_blocks(lead, V, budget):
        yield sl, as_rows(xv[sl]), (as_rows(mv[sl]) if mv is not None else None)


def _store(dst: Tensor, res: Tensor) -> None:
    dst.copy_(res.view(dst.shape))


def _direct_out(dst: Tensor) -> Tensor | None:
    """A (rows, V) view of an output block when it can be written in place."""
    if dst.is_contiguous():
        return dst.view(-1, dst.shape[-1])
    return None


def _fix_pending(pending: list, xv: Tensor, mv: Tensor | None, repair) -> None:
    """Run ``repair(sl, x2, fix)`` for the blocks whose rows need the rest sum, after one host sync.

    ``pending`` holds (block index, (R, 1) bool flags) pairs collected during the block loop.

    Eagerly only blocks with flagged rows are revisited (their (R, V) input is re-read, a few rows at most);
    under torch.compile every block is repaired through ``torch.where``-style selection inside ``repair``.
    """
    if not pending:
        return
    if torch.compiler.is_compiling():
        for sl, fix in pending:
            repair(sl, _masked(as_rows(xv[sl]), None if mv is None else as_rows(mv[sl])), fix)
        return
    flags = torch.cat([f.view(-1) for _, f in pending])
    if not bool(flags.any()):
        return
    for sl, fix in pending:
        if bool(fix.any()):
            repair(sl, _masked(as_rows(xv[sl]), None if mv is None else as_rows(mv[sl])), fix)


@torch.no_grad()
def normalize_fwd(xv: Tensor, mv: Tensor | None, log: bool, out: Tensor) -> Tensor:
    """softmax / log_softmax of every row of ``xv`` (*lead, V), written into ``out`` (same shape, any strides)."""
    if xv.shape[-1] == 0 or out.numel() == 0:
        return out
    masked = mv is not None
    ws = Workspace()
    if fast_path(xv):
        wide = wide_dtype(xv.dtype)
        V = xv.shape[-1]

        def block(item, ws):
            sl, x2, m2 = item
            x2 = _masked(x2, m2)
            # softmax needs no repair: 1 + r is formed in the wide dtype, and nothing is subtracted from it.
            y = wide_fused(x2, log, ws)
            flag = None
            if log:
                # y at the argmax is exactly -log(S) (x - max = 0 there): L = -max y, no |max| term in the
                # threshold. NaN rows compare False and keep torch's NaN.
                flag = (sl, y.amax(dim=1, keepdim=True) > -_tiny(V, 0.0))
            if masked:  # a row with nothing left: softmax 0, log_softmax -inf (not torch's NaN)
                empty = torch.isneginf(x2.amax(dim=1, keepdim=True))
                y = torch.where(empty, -math.inf if log else 0.0, y)
            _store(out[sl], y)
            return flag

        flags = map_blocks(block, list(_blocks(xv, mv, FAST_BLOCK_ELEMS)), xv.device)
        pending = [f for f in flags if f is not None]

        def repair(sl, x2, fix):
            dst = out[sl].reshape(-1, V)  # a view for the blocks _blocks makes of a (*lead, V) view
            y = dst.to(wide)
            _repair(fix, x2, y, lambda rows: log_softmax_from(row_stats(rows.to(wide), None, masked, ws)))
            if masked:
                y = torch.where(torch.isneginf(x2.amax(dim=1, keepdim=True)), -math.inf, y)
            _store(out[sl], y)

        _fix_pending(pending, xv, mv, repair)
        return out
    for sl, x2, m2 in _blocks(xv, mv):
        s = row_stats(x2, m2, masked, ws)
        dst = out[sl]
        direct = _direct_out(dst) if dst.dtype == working_dtype(x2.dtype) else None
        res = log_softmax_from(s, direct) if log else softmax_from(s, direct)
        if direct is None:
            _store(dst, res)
    return out


@torch.no_grad()
def lse_fwd(xv: Tensor, mv: Tensor | None) -> Tensor:
    """logsumexp of every row of ``xv`` in working precision, shape ``lead``."""
    lead = xv.shape[:-1]
    wd = working_dtype(xv.dtype)
    if xv.shape[-1] == 0:
        return torch.full(lead, -math.inf, dtype=wd, device=xv.device)
    out = torch.empty(lead, dtype=wd, device=xv.device)
    ws = Workspace()
    if fast_path(xv):
        wide = wide_dtype(xv.dtype)
        V = xv.shape[-1]

        def block(item, ws):
            sl, x2, m2 = item
            x2 = _masked(x2, m2)
            # One fused log_softmax one precision up (cheaper than torch.logsumexp's separate passes):
            # L = -max y, then lse = max + L with L right to the output's rounding unless L is tiny.
            negL = wide_fused(x2, True, ws).amax(dim=1, keepdim=True)
            a = x2.amax(dim=1, keepdim=True).to(wide)
            lse = torch.where(torch.isinf(a), a, a - negL)
            _store(out[sl], lse)
            return sl, negL > -_tiny(V, 0.0)  # L = -max y: exact at the argmax, as above

        pending = map_blocks(block, list(_blocks(xv, mv, FAST_BLOCK_ELEMS)), xv.device)

        def repair(sl, x2, fix):
            lse1 = out[sl].reshape(-1, 1).to(wide)
            _repair(fix, x2, lse1, lambda rows: lse_of(row_stats(rows.to(wide), None, True, ws)))
            _store(out[sl], lse1)

        _fix_pending(pending, xv, mv, repair)
        return out
    for sl, x2, m2 in _blocks(xv, mv):
        s = row_stats(x2, m2, True, ws)
        _store(out[sl], lse_of(s))
    return out


@torch.no_grad()
def softmax_bwd(y: Tensor, g: Tensor, dx: Tensor) -> Tensor:
    """dx = y * (g - sum(g * y)), formed in working precision, for (*lead, V) views."""
    if y.numel() == 0:
        return dx
    wd = working_dtype(y.dtype)

    def block(sl, ws):
        y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
        s = (g2 * y2).sum(dim=1, keepdim=True)
        dst = dx[sl]
        direct = _direct_out(dst) if dst.dtype == wd else None
        res = torch.mul(y2, g2 - s, out=direct)
        if direct is None:
            _store(dst, res)

    map_blocks(block, list(iter_row_blocks(tuple(y.shape[:-1]), y.shape[-1], FAST_BLOCK_ELEMS)), y.device)
    return dx


@torch.no_grad()
def log_softmax_bwd(y: Tensor, g: Tensor, mv: Tensor | None, dx: Tensor) -> Tensor:
    """dx = g - exp(y) * sum(g); with a mask, masked-out entries and rows with nothing left get 0."""
    if y.numel() == 0:
        return dx
    wd = working_dtype(y.dtype)

    def block(sl, ws):
        y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
        m2 = None if mv is None else as_rows(mv[sl])
        # masked-out outputs are constants (-inf): their upstream gradient does not enter the sum
        gsum = (g2 if m2 is None else g2.masked_fill(~m2, 0.0)).sum(dim=1, keepdim=True)
        dst = dx[sl]
        direct = _direct_out(dst) if dst.dtype == wd else None
        res = torch.sub(g2, torch.exp(y2).mul_(gsum), out=direct)
        if m2 is not None:
            res.masked_fill_(~m2, 0.0)
            res.masked_fill_(torch.isneginf(y2).all(dim=1, keepdim=True), 0.0)
        if direct is None:
            _store(dst, res)

    map_blocks(block, list(iter_row_blocks(tuple(y.shape[:-1]), y.shape[-1], FAST_BLOCK_ELEMS)), y.device)
    return dx


@torch.no_grad()
def lse_bwd(xv: Tensor, lse: Tensor, g: Tensor, mv: Tensor | None, dx: Tensor) -> Tensor:
    """dx = g * softmax(x), with ``lse`` and ``g`` of shape lead.

    The softmax is recomputed from x (one precision up on the fast path) rather than as exp(x - lse): a
    rounded lse puts |lse| units of error into every exp (2000 ulps at an offset of 1e4). Without a mask an
    all -inf row gives NaN, as torch; with one, masked entries and empty rows get 0.
    """
    if xv.numel() == 0:
        return dx
    if fast_path(xv):
        wide = wide_dtype(xv.dtype)

        def block(item, ws):
            sl, x2, m2 = item
            x2 = _masked(x2, m2)
            p = wide_fused(x2, False, ws)
            # A +inf in the row: torch's exp(x - inf) is 0 off the infinities and NaN on them.
            l2 = lse[sl].reshape(-1, 1)
            _repair(torch.isposinf(l2), x2, p, lambda rows: torch.exp(rows.to(wide) - math.inf))
            if m2 is not None:  # nothing left in the row: no mass, gradient 0
                p = torch.where(torch.isneginf(l2), 0.0, p)
            _store(dx[sl], p.mul_(g[sl].reshape(-1, 1).to(p.dtype)))

        map_blocks(block, list(_blocks(xv, mv, FAST_BLOCK_ELEMS)), xv.device)
        return dx
    masked = mv is not None
    ws = Workspace()
    for sl, x2, m2 in _blocks(xv, mv):
        s = row_stats(x2, m2, masked, ws)
        p = softmax_from(s)
        # As the fast path: a +inf in the row gives torch's exp(x - inf), NaN on the infinities and 0 off them,
        # not a NaN row. A select, not _repair: this path also serves CUDA tensors, where nonzero() would sync.
        inf_row = torch.isposinf(lse[sl].reshape(-1, 1))
        p = torch.where(inf_row, torch.where(torch.isposinf(_masked(x2, m2)), math.nan, 0.0).to(p.dtype), p)
        _store(dx[sl], p.mul_(g[sl].reshape(-1, 1).to(p.dtype)))
    return dx
