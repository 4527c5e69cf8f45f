"""Linear cross-entropy: loss from hidden states (M, D) and a classifier weight (V, D), two strategies.

Token chunks (``strategy='token_chunks'``):
Math:     logits_c = x_c W^T (+ b) for a chunk of T tokens; the loss rows and the gradient of the logits
          come from the cross-entropy rows of that chunk (reference path or fused kernel); then
          dx_c = dlogits_c W,  dW += dlogits_c^T x_c,  db += sum_rows dlogits_c.
Memory:   one (T, V) logits chunk and its gradient at a time, an fp32 dW accumulator (the gradient's own
          size) and per-token fp32 (loss, lse): O(T * V), never O(M * V).
One pass: for reduction 'mean'/'sum' with gradients wanted, the gradients are formed during forward (three
          matmuls per chunk, like the unfused graph) and backward only scales them by grad_output (and the
          mean's denominator, which stays on the device). reduction='none' (per-token upstream gradients),
          retain_graph and double backward recompute chunk by chunk in backward instead.

Vocab blocks (``strategy='vocab_blocks'``, cut-cross-entropy style, torch matmuls):
Math:     forward (pass 1) goes over blocks of Vb classes, all M tokens at once: logits_b = x W_b^T (+ b_b),
          merged online into per-token (a = max, r = rest sum) with r = r_hi + (r_lo + 1) exp(a_lo - a_hi),
          plus the target logit and the sums the loss needs (label smoothing, probability targets, entropy),
          each a sum of non-negative terms rescaled as the max grows.  L = log1p(r) and a are kept in
          float64, so y = (x - a) - L is accurate (a rounded fp32 lse would put |lse| 2**-24 into every y).
          Backward (pass 2) recomputes each logits_b, forms G_b = d loss / d logits_b from (a, L) with the
          upstream gradient known, then  dW[b] = G_b^T x  (one GEMM, rounded once to W's dtype),
          db[b] = sum_rows G_b,  dx += G_b W_b  (fp32 accumulator for half inputs).
Memory:   the gradients themselves, one (M, Vb) logits block (Vb = T * V / M: as many logits as a token
          chunk), an fp32 (M, D) dx accumulator for half inputs and O(M) float64 row statistics; no
          (V, D) fp32 buffer (for bf16 at V=128256, D=4096 that buffer alone is 2.1 GB).
Time:     4 GEMMs (8 M D V flops: logits twice, dW, dx) against token chunks' 3.  Both passes compute each
          block's logits with the identical call into the same buffer, so the recomputed logits are
          bitwise those the statistics came from (a one-ulp difference at a confident row's target would
          swamp its gradient expm1(y_t) = -r / (1 + r)).
Numerics: on the triton backend (CUDA tensors, class-index targets) each block's elementwise work is one
          kernel per pass (triton/linear_cross_entropy.py): pass 1 forms the block's (max, rest) and sums in
          fp32 as the CE kernel, rounded once per block, and merges them into the same float64 row state;
          pass 2 is the CE kernel's fp32 gradient from (a, r, L), rounded once to the input dtype.  Elsewhere
          (CPU, probability targets) torch ops: float64 in pass 1 (the loss) and in pass 2 for fp32/fp64
          inputs, float32 in pass 2 for half inputs (G is rounded to half once).  Both finish the loss, lse
          and entropy from the float64 state by the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import losses as ref
from ..reference.plain import working_dtype

# One (T, V) logits chunk (and one (M, Vb) vocab block, which holds as many logits): T = elements // V tokens,
# at least 1, at most the whole batch.  On the CPU, CHUNK_ELEMS elements: its float64 temporaries stay
# cache-sized.  Elsewhere (GPU) CHUNK_BYTES_GPU of logits in the input dtype: GEMMs of thousands of tokens
# (tiny chunks are what makes Liger's linear cross-entropy slow); 512 MiB is T = 2093 tokens of bf16 at
# V = 128256, 4 chunks at M = 8192, or vocab blocks of 32768 classes.  To be tuned on the GPU (not measured).
CHUNK_ELEMS = 1 << 22
CHUNK_BYTES_GPU = 1 << 29


# Rows of one elementwise sub-block inside a vocab block when its work is torch ops (the CPU; probability
# targets elsewhere): about this many elements, so its float64 temporaries stay cache-resident on the CPU (as
# the reference losses' row blocks); elsewhere larger (each sub-block costs a dozen kernel launches) but bounded:
# a whole (M, Vb) block in float64 would be 2 GiB per temporary at M = 8192, Vb = 32768.
ROW_BLOCK_ELEMS = 1 << 18
ROW_BLOCK_ELEMS_GPU = 1 << 24

_HALF = (torch.float16, torch.bfloat16)


def token_chunk(M: int, V: int, requested: int | None, device_type: str = "cpu", elem_size: int = 4) -> int:
    """Tokens per chunk: ``requested`` (options.batch_chunk_size) or the device's default budget."""
    if requested is not None:
        return max(1, min(M, requested))
    elems = CHUNK_ELEMS if device_type == "cpu" else CHUNK_BYTES_GPU // elem_size
    return max(1, min(M, elems // max(V, 1)))


def vocab_block(M: int, V: int, chunk: int) -> int:
    """Classes per vocab block: (M, Vb) holds about as many logits as one (chunk, V) token chunk."""
    return max(1, min(V, (chunk * V) // max(M, 1)))


def pick_strategy(requested: str, W: Tensor) -> str:
    """'auto': vocab blocks when W's gradient is wanted in fp16/bf16 (token chunks' fp32 (V, D) accumulator
    would double dW's memory); token chunks otherwise (fp32/fp64 weights accumulate in dW itself, and without
    dW there is no accumulator: the cheaper 3-GEMM path)."""
    if requested != "auto":
        return requested
    wants_dW = W.requires_grad and torch.is_grad_enabled()
    return "vocab_blocks" if wants_dW and W.dtype in _HALF else "token_chunks"


def _kernels():
    # The kernels behind their torch.library ops (one opaque node each for torch.compile).
    from .._library import linear_ce_ops

    return linear_ce_ops


def _logits(xc: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(xc, W, b)


class _Opts:
    __slots__ = ("weight", "ignore_index", "reduction", "eps", "z_loss", "softcap", "chunk", "prob", "entropy",
                 "use_triton", "strategy", "vblock")

    def __init__(self, weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy, use_triton,
                 strategy, vblock):
        self.weight, self.ignore_index, self.reduction = weight, ignore_index, reduction
        self.eps, self.z_loss, self.softcap, self.chunk, self.prob = eps, z_loss, softcap, chunk, prob
        self.entropy = entropy
        # The fused kernel serves class-index targets in fp16/bf16/fp32; the rest takes the reference rows.
        self.use_triton = use_triton and not prob
        self.strategy, self.vblock = strategy, vblock  # 'token_chunks' | 'vocab_blocks'; classes per block


def _chunk_rows(logits: Tensor, tc: Tensor, o: _Opts) -> tuple[Tensor, Tensor, Tensor]:
    """(loss rows, lse rows, counted weight per row) of one chunk, working precision."""
    if o.prob:
        rows, lse = ref.ce_prob_rows(logits, tc, o.weight, o.eps, o.z_loss, o.softcap)
        return rows, lse, torch.ones_like(rows)
    return ref.ce_rows(logits, tc, o.weight, o.ignore_index, o.eps, o.z_loss, o.softcap)


def _chunk_grad(logits: Tensor, tc: Tensor, g_rows: Tensor, o: _Opts) -> Tensor:
    """d(sum_i g_i loss_i)/d logits for one chunk, working precision."""
    wd = working_dtype(logits.dtype)
    if o.prob:
        dl, _ = ref.ce_prob_grad(logits, tc, o.weight, o.eps, o.z_loss, o.softcap, g_rows, wd, False)
        return dl
    return ref.ce_grad(logits, tc, o.weight, o.ignore_index, o.eps, o.z_loss, o.softcap, g_rows, wd)


def _acc_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc in float32 (or float64) and a, b possibly half: accumulate without rounding
    each chunk's product to half. CUDA's ``addmm(..., out_dtype=)`` does it inside the GEMM; elsewhere the
    chunk is widened first."""
    if a.dtype != acc.dtype and a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without the out_dtype overload
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_fused(logits: Tensor, tc: Tensor, g_c: Tensor | None, o: _Opts, loss: Tensor, lse: Tensor,
                 ent: Tensor | None, want_grad: bool) -> Tensor | None:
    """The fused kernel over one (T, V) chunk: loss/lse (and entropy) rows written in place, and, when asked,
    the gradient written over the logits themselves (read once, written once). Returns the gradient."""
    _kernels().ce_chunk(logits, tc, loss=loss, lse=lse, entropy=ent, weight=o.weight, ignore_index=o.ignore_index,
                        label_smoothing=o.eps, z_loss=o.z_loss, softcap=o.softcap, grad_scale=g_c,
                        write_grad=want_grad)
    return logits if want_grad else None


def _accumulate(x: Tensor, W: Tensor, b: Tensor | None, target: Tensor, g_rows: Tensor | None, o: _Opts,
                need: tuple[bool, bool, bool]):
    """One sweep over token chunks. Returns (loss rows, lse rows, wt rows, entropy rows, dx, dW, db); the
    gradients are None unless asked for in ``need`` (for x, W, b), formed with upstream ``g_rows`` (1 everywhere
    if None); entropy rows (of softmax of the capped logits) only when ``o.entropy``."""
    M, D = x.shape
    V = W.shape[0]
    wd = working_dtype(x.dtype)
    loss = torch.empty(M, dtype=wd, device=x.device)
    lse = torch.empty(M, dtype=wd, device=x.device)
    wt = torch.empty(M, dtype=wd, device=x.device)
    ent = torch.empty(M if o.entropy and g_rows is None else 0, dtype=wd, device=x.device)
    dx = torch.empty_like(x) if need[0] else None
    dW = torch.zeros(V, D, dtype=wd, device=x.device) if need[1] else None  # fp32 accumulator
    db = torch.zeros(V, dtype=wd, device=x.device) if need[2] else None
    any_grad = any(need)
    # The chunk count, not range(0, M, chunk): under torch.compile(dynamic=True) a symbolic M then guards only
    # on ceil(M / chunk), not on M itself.
    for i in range((M + o.chunk - 1) // o.chunk):
        s = i * o.chunk
        e = torch.sym_min(M, s + o.chunk)  # (not a clamped slice: that would guard on full / partial)
        xc, tc = x[s:e], target[s:e]
        logits = _logits(xc, W, b)
        if o.use_triton:
            dl = _chunk_fused(logits, tc, None if g_rows is None else g_rows[s:e], o, loss[s:e], lse[s:e],
                              ent[s:e] if ent.numel() else None, any_grad)
            valid = tc != o.ignore_index
            w_c = o.weight.to(wd)[torch.where(valid, tc, 0)] if o.weight is not None else torch.ones_like(lse[s:e])
            wt[s:e] = torch.where(valid, w_c, 0.0)
        elif any_grad and not o.prob:
            # class indices: loss rows and the logits' gradient in one pass over the chunk (ref.ce_fused),
            # rounded once to the input dtype for the matmuls, as the unfused graph does
            g_c = torch.ones(xc.shape[0], dtype=wd, device=x.device) if g_rows is None else g_rows[s:e]
            loss[s:e], lse[s:e], dl = ref.ce_fused(logits, tc, o.weight, o.ignore_index, o.eps, o.z_loss,
                                                   o.softcap, g_c, x.dtype)
            wt[s:e] = ref.target_weights(tc, o.weight, o.ignore_index, wd)
            if ent.numel():
                ent[s:e] = ref.entropy_rows(ref.capped(logits, o.softcap))
        else:
            rows, l_c, w_c = _chunk_rows(logits, tc, o)
            loss[s:e], lse[s:e], wt[s:e] = rows, l_c, w_c
            if ent.numel():
                ent[s:e] = ref.entropy_rows(ref.capped(logits, o.softcap))
            dl = None
            if any_grad:
                g_c = torch.ones(xc.shape[0], dtype=wd, device=x.device) if g_rows is None else g_rows[s:e]
                # rounded once to the input dtype for the matmuls, as the unfused graph does
                dl = _chunk_grad(logits, tc, g_c, o).to(x.dtype)
        del logits
        if dl is None:
            continue
        if dx is not None:
            torch.mm(dl, W, out=dx[s:e])
        if dW is not None:
            _acc_mm(dW, dl.t(), xc)
        if db is not None:
            db.add_(dl.sum(dim=0, dtype=wd))
    return loss, lse, wt, ent, dx, dW, db


# ---------------------------------------------------------------------------------------------------------
# Vocab blocks: pass 1 (forward) row statistics, pass 2 (backward) gradients, one (M, Vb) block at a time.
# ---------------------------------------------------------------------------------------------------------


def _vocab_blocks(x: Tensor, W: Tensor, b: Tensor | None, vblock: int):
    """(v0, v1, logits (M, v1 - v0)) per block of classes. Both passes compute a block's logits with the same
    call into the same buffer, so pass 2 sees bitwise the logits whose statistics pass 1 kept."""
    M, V = x.shape[0], W.shape[0]
    buf = torch.empty(M * min(vblock, V), dtype=x.dtype, device=x.device)
    # Block counts, not range(0, V, vblock) / min(): under torch.compile(dynamic=True) symbolic sizes then guard
    # only on the counts, not on M and V themselves (see _accumulate).
    for k in range((V + vblock - 1) // vblock):
        v0 = k * vblock
        v1 = torch.sym_min(V, v0 + vblock)
        out = buf[: M * (v1 - v0)].view(M, v1 - v0)
        if b is None:
            torch.mm(x, W[v0:v1].t(), out=out)
        else:
            torch.addmm(b[v0:v1], x, W[v0:v1].t(), out=out)
        yield v0, v1, out


def _row_slices(M: int, n: int, device: torch.device):
    """Row ranges of an (M, n) block: about ROW_BLOCK_ELEMS (CPU) or ROW_BLOCK_ELEMS_GPU elements each."""
    step = max(1, (ROW_BLOCK_ELEMS if device.type == "cpu" else ROW_BLOCK_ELEMS_GPU) // max(n, 1))
    for k in range((M + step - 1) // step):
        yield slice(k * step, torch.sym_min(M, (k + 1) * step))


def _block_state(xw: Tensor) -> tuple[Tensor, Tensor]:
    """(m, r) of a float64 (n, Vb) block: m = max, r = rest sum (exp(x_j - m) over all entries but one max).

    The maxima's exp(0) = 1 are left out of the sum (F.threshold keeps exp(d) < 1 only) and added back as
    an integer count minus one, so a confident row's tiny r keeps its digits (NUMERICS.md step 2).  A block
    all -inf is the empty state (-inf, 0); a NaN or +inf gives r NaN / inf (the row ends NaN)."""
    m = xw.amax(dim=1, keepdim=True)
    e = torch.sub(xw, torch.where(torch.isinf(m), 0.0, m)).exp_()
    s_all = e.sum(dim=1, keepdim=True)
    s_rest = torch.nn.functional.threshold(e.neg_(), -1.0, 0.0, inplace=True).sum(dim=1, keepdim=True).neg_()
    r = (s_all - s_rest).round_().sub_(1.0).add_(s_rest)
    return m, torch.where(torch.isneginf(m), 0.0, r)


def _class_rows(target: Tensor, o: _Opts) -> tuple[Tensor, Tensor]:
    t = target.reshape(-1, 1)
    valid = t != o.ignore_index
    return torch.where(valid, t, torch.zeros_like(t)), valid


def _smoothed_q(q: Tensor, o: _Opts, w: Tensor | None, C: int) -> Tensor:
    """w_j ((1 - eps) q_j + eps / C): the per-class weights of a probability target (a new tensor)."""
    u = q * (1.0 - o.eps) + o.eps / C if o.eps > 0.0 else q.clone()
    return u.mul_(w) if w is not None else u


@torch.no_grad()
def _vocab_stats(x: Tensor, W: Tensor, b: Tensor | None, target: Tensor, o: _Opts):
    """Pass 1 over vocab blocks. Returns (loss, lse, wt, entropy rows in working precision; a, L and, for
    label smoothing / probability targets, U = sum_j u_j, as float64 (M, 1) columns for pass 2)."""
    M, V = x.shape[0], W.shape[0]
    wd, f64 = working_dtype(x.dtype), torch.float64
    col = dict(dtype=f64, device=x.device)
    a = torch.full((M, 1), -math.inf, **col)  # running max
    r = torch.zeros((M, 1), **col)  # rest sum w.r.t. a: every exp(x_j - a) but one max's exp(0) = 1
    summed = o.prob or o.eps > 0.0
    # S = sum_j u_j (a - x_j) and U = sum_j u_j over the classes seen (u = class weights for label smoothing,
    # smoothed weighted probabilities for probability targets): terms >= 0, shifted by U (a_new - a_old).
    S = torch.zeros((M, 1), **col) if summed else None
    U = torch.zeros((M, 1), **col) if summed else None
    E = torch.zeros((M, 1), **col) if o.entropy else None  # sum_j exp(x_j - a) (a - x_j) >= 0
    w = o.weight.to(f64) if o.weight is not None else None
    if not o.prob:
        t_safe, valid = _class_rows(target, o)
        xt = torch.zeros((M, 1), **col)  # the target's logit (capped)
    for v0, v1, logits in _vocab_blocks(x, W, b, o.vblock):
        n = v1 - v0
        if o.use_triton:
            # the block kernel merges the block into the same float64 state (class indices only)
            _kernels().block_stats(logits, v0, target, a=a, r=r, s=S, u=U, e=E, xt=xt, weight=o.weight,
                                   ignore_index=o.ignore_index, softcap=o.softcap)
            continue
        for rs in _row_slices(M, n, x.device):
            x2 = ref.capped(logits[rs], o.softcap)
            xw = x2.to(torch.float64)  # x - m is exact in float64 for fp32/half logits
            m, rb = _block_state(xw)
            a0, r0 = a[rs], r[rs]
            a1 = torch.maximum(a0, m)  # NaN propagates
            # NUMERICS.md's merge: r = r_hi + (r_lo + 1) exp(a_lo - a_hi); two empty states give (-inf, 0)
            r1 = torch.where(a0 >= m, r0 + (rb + 1.0) * torch.exp(m - a0), rb + (r0 + 1.0) * torch.exp(a0 - m))
            r1 = torch.where(torch.isneginf(a1), 0.0, r1)
            if summed or E is not None:
                fin = torch.isfinite(a0) & torch.isfinite(a1)
                shift = torch.where(fin, a1 - a0, 0.0)  # >= 0: how far the max moved
                dn = torch.where(torch.isinf(a1), 0.0, a1) - xw  # a - x_j >= 0 for this block
            if summed:
                if o.prob:
                    u = _smoothed_q(target[rs, v0:v1].to(f64), o, None if w is None else w[v0:v1], V)
                    S[rs] += U[rs] * shift + (u * dn).sum(dim=1, keepdim=True)
                    U[rs] += u.sum(dim=1, keepdim=True)
                else:
                    wb = w[v0:v1] if w is not None else None
                    S[rs] += U[rs] * shift + (dn @ wb if wb is not None else dn.sum(dim=1)).unsqueeze(1)
                    U[rs] += wb.sum() if wb is not None else float(n)
            if E is not None:
                e = torch.exp(-dn)
                old = torch.where(fin, torch.exp(a0 - a1) * (E[rs] + shift * (r0 + 1.0)), torch.zeros_like(a0))
                # 0 * inf = 0 for -inf logits (no mass, no contribution)
                E[rs] = old + torch.where(e > 0, e * dn, 0.0).sum(dim=1, keepdim=True)
            if not o.prob:
                j = t_safe[rs] - v0
                inb = (j >= 0) & (j < n)
                xt[rs] = torch.where(inb, xw.gather(1, j.clamp(0, n - 1)), xt[rs])
            a[rs], r[rs] = a1, r1
    # An infinite max (+inf anywhere, or a row all -inf) makes the row NaN, lse the max: as ce_rows.
    L = torch.where(torch.isinf(a), math.nan, torch.log1p(r))
    lse = torch.where(torch.isinf(a), a, a + L)
    a_s = torch.where(torch.isinf(a), 0.0, a)
    if o.prob:
        row = L * U + S  # -sum_j u_j y_j = sum_j u_j (L + a - x_j): two sums of terms >= 0
        wt = torch.ones_like(row)
        if o.z_loss != 0.0:
            row = row + o.z_loss * lse * lse
    else:
        w_t = torch.where(valid, w[t_safe] if w is not None else torch.ones_like(L), 0.0)
        # -y_t = L - (x_t - a): two non-negative terms, the second exact in float64
        row = (1.0 - o.eps) * w_t * (L - (xt - a_s))
        if o.eps > 0.0:
            row = row + torch.where(valid, (o.eps / V) * (L * U + S), 0.0)
        if o.z_loss != 0.0:
            row = row + torch.where(valid, o.z_loss * lse * lse, 0.0)
        row = torch.where(valid, row, 0.0)  # 0 also where an ignored row's L is NaN (0 * NaN), as torch
        wt = w_t
    ent = (L + E / (1.0 + r)).view(M).to(wd) if E is not None else torch.empty(0, dtype=wd, device=x.device)
    return row.view(M).to(wd), lse.view(M).to(wd), wt.view(M).to(wd), ent, a, L, U


@torch.no_grad()
def _vocab_grads(x: Tensor, W: Tensor, b: Tensor | None, target: Tensor, a: Tensor, L: Tensor, U: Tensor | None,
                 g_rows: Tensor, o: _Opts, need: tuple[bool, bool, bool]):
    """Pass 2: (dx, dW, db) of sum_i g_i loss_i, each None unless asked for in ``need``.

    Elementwise precision: float64 for fp32/fp64 inputs; float32 for half inputs, whose G is rounded to half
    once (13+ bits of margin: x - a is exact in fp32 for half logits, rounded once for capped ones, and a
    confident row's target gradient expm1(-L) keeps its digits)."""
    M, D = x.shape
    V = W.shape[0]
    half = x.dtype in _HALF
    wk = torch.float32 if half else torch.float64  # the pass's working dtype (see above)
    g = g_rows.to(wk).reshape(M, 1)
    lse = torch.where(torch.isinf(a), a, a + L).to(wk)
    a_s = torch.where(torch.isinf(a), 0.0, a).to(wk)  # a is a logit (or capped fp32) value: exact in fp32
    L = L.to(wk)
    U = U.to(wk) if U is not None else None
    w = o.weight.to(wk) if o.weight is not None else None
    eps, C = o.eps, V
    if o.prob:
        c1 = U + 2.0 * o.z_loss * lse if o.z_loss != 0.0 else U
    else:
        t_safe, valid = _class_rows(target, o)
        w_tgt = w[t_safe] if w is not None else torch.ones_like(L)
        hard = torch.where(valid, (1.0 - eps) * w_tgt, 0.0)
        c1 = hard
        if eps > 0.0:  # only then: a NaN weight of an untargeted class stays out of the gradient (0 * NaN)
            c1 = c1 + (eps / C) * (w.sum() if w is not None else float(C))
        if o.z_loss != 0.0:
            c1 = c1 + 2.0 * o.z_loss * lse
        c1 = torch.where(valid, c1, 0.0)
        g_eps = torch.where(valid, (eps / C) * g, 0.0)
        # at the target: c1 p_t - hard - (eps / C) w_t = hard (p_t - 1) + (c1 - hard) p_t - (eps / C) w_t,
        # with p_t - 1 = expm1(y_t): never softmax_t - 1, which cancels
        at_c = (c1 - hard, (eps / C) * w_tgt)
    gc1 = g * c1
    if o.use_triton:
        kstats = _kernel_row_stats(a, L, g_rows, o)
    dx = torch.zeros(M, D, dtype=torch.float32 if half else x.dtype, device=x.device) if need[0] else None
    dW = torch.empty(W.shape, dtype=W.dtype, device=W.device) if need[1] else None
    db = torch.zeros(V, dtype=torch.float64, device=x.device) if need[2] else None
    for v0, v1, logits in _vocab_blocks(x, W, b, o.vblock):
        n = v1 - v0
        if o.use_triton:
            # G_b in fp32, rounded once to the logits' dtype, written over them (read once, written once)
            _kernels().block_grad(logits, v0, V, target, **kstats, ignore_index=o.ignore_index, label_smoothing=eps,
                                  z_loss=o.z_loss, softcap=o.softcap)
            if db is not None:
                db[v0:v1] += logits.sum(dim=0, dtype=torch.float64)
        else:
            for rs in _row_slices(M, n, x.device):
                lr = logits[rs]
                x2 = ref.capped(lr, o.softcap)
                # y = (x - a) - L: both terms <= 0, the first exact (a copy: x2 may be the logits themselves)
                y = x2.to(wk, copy=True).sub_(a_s[rs]).sub_(L[rs])
                res = torch.exp(y).mul_(gc1[rs])  # g c1 p_j
                if o.prob:
                    u = _smoothed_q(target[rs, v0:v1].to(wk), o, None if w is None else w[v0:v1], C)
                    res.sub_(u.mul_(g[rs]))  # g (c1 p_j - u_j)
                else:
                    if eps > 0.0:
                        res.sub_(g_eps[rs] * (w[v0:v1] if w is not None else 1.0))
                    j = t_safe[rs] - v0
                    inb = valid[rs] & (j >= 0) & (j < n)
                    j = j.clamp(0, n - 1)
                    y_t = y.gather(1, j)
                    at_t = (hard[rs] * torch.expm1(y_t) + at_c[0][rs] * torch.exp(y_t) - at_c[1][rs]) * g[rs]
                    res.scatter_(1, j, torch.where(inb, at_t, res.gather(1, j)))
                if o.softcap is not None:
                    res.mul_(ref.cap_slope(lr, o.softcap, wk))  # d/dx c tanh(x / c), from the raw logits
                if db is not None:
                    db[v0:v1] += res.sum(dim=0)
                lr.copy_(res)  # G_b rounded once to the input dtype, over the logits (read once, written once)
        if dW is not None:
            torch.mm(logits.t(), x, out=dW[v0:v1])  # fp32-accumulated GEMM over all M tokens, rounded once
        if dx is not None:
            _acc_mm(dx, logits, W[v0:v1])
    return (dx.to(x.dtype) if dx is not None else None), dW, db


def _kernel_row_stats(a: Tensor, L: Tensor, g_rows: Tensor, o: _Opts) -> dict:
    """Pass 2's per-row inputs for the kernel from pass 1's float64 (a, L): fp32 a (a logit value: exact),
    R = 2**64 r (r = expm1(L) in float64, rounded once), L, lse, and the upstream gradient per row."""
    f32 = torch.float32
    a_ref = torch.where(torch.isinf(a), 0.0, a).view(-1).to(f32)
    R = (torch.expm1(L) * 2.0**64).view(-1).to(f32)
    lse = torch.where(torch.isinf(a), a, a + L).view(-1).to(f32)
    wsum = o.weight.to(torch.float64).sum().to(f32).reshape(1) if o.weight is not None else None
    return dict(a=a_ref, R=R, L=L.view(-1).to(f32), lse=lse, grad_rows=g_rows.to(f32),
                weight=o.weight, weight_sum=wsum)


def _row_scale(reduction: str, g: Tensor, denom: Tensor, valid: Tensor | None, M: int) -> Tensor:
    if reduction == "none":
        return g
    s = g.expand(M) if reduction == "sum" else (g / denom).expand(M)
    if valid is not None and reduction == "mean":
        s = torch.where(valid, s, torch.zeros_like(s))
    return s


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Returns (loss reduced as asked, per-token lse, per-token entropy or an empty tensor), in fp32 for half
    inputs; only the loss is differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None, target: Tensor, o: _Opts):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        if o.strategy == "vocab_blocks":
            # Pass 2 recomputes the logits whenever it runs, so running it here would save no GEMM; in backward
            # it knows the upstream gradient (dW rounded once) and nothing of size V * D lives between the two.
            fused = False
            loss, lse, wt, ent, a, L, U = _vocab_stats(x, W, b, target, o)
            stats = (a, L, U)
        else:
            fused = any(need) and o.reduction in ("mean", "sum")
            loss, lse, wt, ent, dx, dW, db = _accumulate(x, W, b, target, None, o, need if fused else (False,) * 3)
            stats = ()
        w_sum = wt.sum() if o.reduction == "mean" and not o.prob else torch.tensor(
            float(x.shape[0]), dtype=wt.dtype, device=x.device
        )
        denom = ref.mean_denom(w_sum, o.eps) if o.reduction == "mean" and not o.prob else w_sum
        if o.reduction == "none":
            out = loss
        elif o.reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        ctx.o, ctx.need, ctx.fused = o, need, fused
        ctx.save_for_backward(x, W, b, target, denom, *stats)
        ctx.grads = (dx, dW, db, w_sum) if fused else None
        ctx.mark_non_differentiable(lse, ent)
        return out, lse, ent

    @staticmethod
    def backward(ctx, g: Tensor, _g_lse, _g_ent):
        x, W, b, target, denom, *stats = ctx.saved_tensors
        o = ctx.o
        if torch.is_grad_enabled():
            raise RuntimeError(
                "linear_cross_entropy does not support double backward (create_graph=True); "
                "use logitkit.cross_entropy(torch.nn.functional.linear(...), ...) for higher derivatives"
            )
        valid = None if o.prob else target != o.ignore_index
        if ctx.fused and ctx.grads is not None:
            # Gradients were formed in forward with unit upstream gradient; scale on the device.
            dx, dW, db, w_sum = ctx.grads
            scale = g
            if o.reduction != "sum":
                # An all-ignored batch has a total weight of 0 and all-zero gradients: keep them 0, not NaN (the
                # raw sum, not ref.mean_denom's NaN).  Only there: a NaN or inf upstream g (or weight) still
                # propagates, as torch.
                scale = torch.where(w_sum == 0, torch.zeros_like(g), g / w_sum)
            out = (
                dx.mul_(scale.to(dx.dtype)) if dx is not None else None,
                dW.mul_(scale).to(W.dtype) if dW is not None else None,
                db.mul_(scale).to(b.dtype) if db is not None else None,
            )
            ctx.grads = None  # consumed: a second backward (retain_graph) recomputes below
            return out[0], out[1], out[2], None, None
        g_rows = _row_scale(o.reduction, g.to(working_dtype(x.dtype)), denom, valid, x.shape[0])
        if o.strategy == "vocab_blocks":
            dx, dW, db = _vocab_grads(x, W, b, target, *stats, g_rows, o, ctx.need)
        else:
            _, _, _, _, dx, dW, db = _accumulate(x, W, b, target, g_rows, o, ctx.need)
        return (
            dx,
            dW.to(W.dtype) if dW is not None else None,
            db.to(b.dtype) if db is not None else None,
            None,
            None,
        )


def make_opts(weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy=False,
              use_triton=False, strategy="token_chunks", vblock=1) -> _Opts:
    return _Opts(weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy, use_triton,
                 strategy, vblock)
