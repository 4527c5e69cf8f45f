"""Vocab-parallel linear cross-entropy: hidden states (M, D) replicated, classifier rows (V_local, D) sharded.

Math:     logits z = h W_loc^T (+ b_loc) are formed T tokens at a time (T = ``batch_chunk_size``, 1024 by
          default) and reduced at once to per-row (a_loc, r_loc, z_t, sum_j w_j (z_j - a_loc)), or for
          class probabilities q (sharded like the rows) (a_loc, r_loc, sum_j w_j q_j, sum_j w_j q_j (z_j -
          a_loc), ...), loss = L sum_j w_j q'_j - sum_j w_j q'_j (z_j - a), q' = (1 - eps) q + eps / V; the ranks
          merge them with the (max, rest-sum) rule: all-reduce(max) -> a, then a rank below the max sends
          (r_loc + 1) exp(a_loc - a), a rank at the max sends r_loc (ties add back their 1s), in one packed
          all-reduce(sum). Backward recomputes each chunk's logits, forms dz = dloss/dz in the working
          precision (float64 for fp32 inputs, as the single-process path) and accumulates dW_loc = dz^T h,
          db_loc = sum dz (float64), dh = dz W_loc.
Traffic:  forward 2 all-reduces: M (+ 2 per rank) values, then M * (4..6) + 2 float64 values; backward
          1 all-reduce of dh (M * D, the input gradient every vocab-parallel linear needs;
          ``reduce_input_grad=False`` leaves it to the caller). Memory: O(T * V_local) temporaries, never
          the (M, V_local) logits.
Numerics: one pass over the logits in forward; the merge runs in float64 (exp(a_loc - a) of float64
          operands), the per-row tail (log1p, loss) too, rounded once; dz as reference/losses.ce_grad.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _config
from .. import _validate as check
from ..autograd.losses import loss_dtype
from ..reference.losses import mean_denom
from ..reference.plain import working_dtype
from . import _comm
from ._functions import _local_target, ce_block_grad, check_classes, local_class_weight, prob_block_grad
from ._stats import ACC, full_d, rest_sum, shifted_parts
from .functional import _replicated, class_weight_arg, no_transforms, unwrap

DEFAULT_CHUNK = 1024  # tokens per chunk at most: T * V_local working-precision logits live at a time
CHUNK_ELEMS = 1 << 22  # ... and T * V_local at most this (16 MiB of fp32 per temporary; ~8 temporaries live)


def _logits(h: Tensor, w: Tensor, b: Tensor | None, wd: torch.dtype) -> Tensor:
    z = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    return z.to(wd)


def _weight_slice(cw: Tensor | None, shard: _comm.Shard, wd: torch.dtype) -> Tensor | None:
    """This rank's slice of the class weight (the layout known), in the working precision."""
    w = local_class_weight(cw, shard)
    return w.to(wd) if w is not None else None


def _local_terms(h, w_loc, b_loc, target, prob, has_w, cwl, start, ignore_index, eps, chunk, wd, k):
    """One pass over this rank's logits, T tokens at a time: (a_loc, cols), cols[:, 0] the local rest sum
    (this shard's max dropped), then for class indices 3: the raw target logit, (4: w_t); for probabilities
    q (this rank's (M, V_local) slice) 3: sum_j w_j q_j, 4: sum_j w_j q_j (z_j - a_loc); last, with smoothing,
    sum_j w_j (z_j - a_loc). ``start=None`` (offset not known) leaves the target's columns 0, ``cwl=None``
    (a full-V weight not sliced yet) the class-weighted ones."""
    M, size = h.shape[0], w_loc.shape[0]
    weighted = not has_w or cwl is not None
    a_loc = torch.full((M,), -math.inf, dtype=wd, device=h.device)
    cols = torch.zeros(M, k, dtype=ACC, device=h.device)
    for c0 in range(0, M if size > 0 else 0, chunk):
        sl = slice(c0, min(c0 + chunk, M))
        z = _logits(h[sl], w_loc, b_loc, wd)
        am, idx = z.max(dim=1, keepdim=True)
        a_loc[sl] = am.squeeze(1)
        d_hi, d_lo, e, es = shifted_parts(z, am)
        # The local rest sum: this shard's max is dropped here and added back by the merge below; terms below
        # exp(-80) are summed scaled by 2**64 (_stats.rest_sum).
        e.scatter_(1, idx, 0.0)
        cols[sl, 0] = rest_sum(e, es)
        if prob and weighted:
            q = target[sl].to(wd)
            wq = q * cwl if has_w else q
            # 0 * -inf (a -inf logit with q = 0) is NaN, as torch's -(q * log_softmax).sum()
            cols[sl, 3] = wq.sum(dim=1, dtype=ACC)
            cols[sl, 4] = (wq * full_d(d_hi, d_lo)).sum(dim=1, dtype=ACC)
        elif not prob and start is not None:
            owned, li = _local_target(target[sl].unsqueeze(1), start, size, ignore_index)
            cols[sl, 3] = torch.where(owned, z.gather(1, li), 0.0).squeeze(1).to(ACC)  # the raw target logit
            if has_w and cwl is not None:
                cols[sl, 4] = torch.where(owned, cwl[li], 0.0).squeeze(1).to(ACC)
        if eps > 0.0 and weighted:
            d = full_d(d_hi, d_lo)
            cols[sl, -1] = (d.to(ACC) @ cwl.to(ACC)) if has_w else d.sum(dim=1, dtype=ACC)
        del z, d_hi, d_lo, e
    return a_loc, cols


def _guess_weight(cw: Tensor | None, start: int, size: int) -> Tensor | None:
    """A class weight's slice under a guessed start, or None where the guess cannot hold a slice."""
    if cw is None or cw.shape[0] == size:
        return cw
    return cw[start : start + size] if start + size <= cw.shape[0] else None


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """Forward: one pass over the chunks of local logits, all-reduce(max) of M values (+ the local sizes),
    one packed all-reduce(sum); backward: the all-reduce of dh. ``target``: global class indices (M,), or
    with ``prob`` this rank's (M, V_local) slice of class probabilities.

    Without ``vocab_start=`` the pass picks the target's column (or slices a full (V,) class weight) at a
    guessed offset (the one seen last, _comm.start_guess); the all-reduce(max) gives the true one, and a
    wrong guess reruns the pass locally (the same chunks, so the same logits bit for bit): the collectives
    never depend on a guess."""

    @staticmethod
    def forward(ctx, h, w_loc, b_loc, target, prob, cw, ignore_index, reduction, eps, chunk, shard, group,
                reduce_input_grad):
        M = h.shape[0]
        wd = working_dtype(torch.promote_types(h.dtype, w_loc.dtype))
        dev = h.device
        size = shard.size
        valid = None if prob else target != ignore_index
        has_w = cw is not None
        # r_loc, holds, has_nan, then z_t, (w_t) or sum w q, sum w q d; (smoothing sum)
        k = 3 + (2 if prob else 1 + int(has_w)) + int(eps > 0.0)
        # Does this rank's pass depend on its offset? Class indices do; probabilities only through a full weight.
        needs_start = not prob or (has_w and cw.shape[0] != size)
        known = shard.start is not None
        if known:
            cwl = _weight_slice(cw, shard, wd)
            start = shard.start
        else:
            start = _comm.start_guess(group, size)
            cwl = _guess_weight(cw, start, size)
            cwl = cwl.to(wd) if cwl is not None else None
            if has_w and cwl is None:
                start = None  # the guess cannot even hold a slice of the weight: it is wrong, rerun below
        a_loc, cols = _local_terms(h, w_loc, b_loc, target, prob, has_w, cwl, start, ignore_index, eps, chunk, wd, k)
        has_nan = torch.isnan(a_loc)
        a = torch.where(has_nan, torch.full_like(a_loc, math.inf), a_loc)
        shard = _comm.max_and_layout(a, shard, group)
        if shard.V is not None:
            check_classes(None if prob else target, shard.V, ignore_index, "linear_weight")
        if not known:
            cwl = _weight_slice(cw, shard, wd)
            if needs_start and start != shard.start:  # a local rerun at the true offset; the collectives are
                _, cols = _local_terms(  # the same on every rank whatever the guesses were
                    h, w_loc, b_loc, target, prob, has_w, cwl, shard.start, ignore_index, eps, chunk, wd, k
                )
            _comm.remember_start(group, shard)

        a64, al64 = a.to(ACC), a_loc.to(ACC)
        holds = (a_loc == a) & torch.isfinite(a)
        # Below the global max: (r_loc + 1) exp(a_loc - a), the shard's own max now counted, in float64.
        scale = torch.exp(torch.where(holds, torch.zeros_like(al64), al64 - a64))
        scale = torch.where(torch.isneginf(al64), torch.zeros_like(scale), scale)  # empty / all -inf shard
        cols[:, 0] = torch.where(holds, cols[:, 0], (cols[:, 0] + 1.0) * scale)
        cols[:, 1] = holds.to(ACC)
        cols[:, 2] = has_nan.to(ACC)
        shift = torch.where(torch.isfinite(al64) & torch.isfinite(a64), al64 - a64, torch.zeros_like(al64))
        W_loc = cwl.sum(dtype=ACC) if has_w else torch.tensor(float(size), dtype=ACC, device=dev)
        # sum_j c_j (z_j - a) = sum_j c_j (z_j - a_loc) + (sum_j c_j) (a_loc - a), c >= 0: two terms <= 0, no
        # cancellation; for c = w q (probabilities) and c = w (smoothing).
        if prob:
            cols[:, 4] += cols[:, 3] * shift
        if eps > 0.0:
            cols[:, -1] += W_loc * shift
        scal = torch.stack([torch.tensor(float(size), dtype=ACC, device=dev), W_loc])
        buf = torch.cat([cols.reshape(-1), scal])
        _comm.all_reduce(buf, "sum", group)
        cols = buf[: M * k].view(M, k)
        C = shard.V if shard.V is not None else int(buf[M * k])  # V travels in the sums with vocab_start=
        if shard.V is None and not prob:
            check.target_range(target, C, ignore_index)
        W = buf[M * k + 1] if has_w else torch.tensor(float(C), dtype=ACC, device=dev)

        r = cols[:, 0] + (cols[:, 1] - 1.0).clamp(min=0.0)
        L = torch.log1p(r)
        L = torch.where(torch.isinf(a64), torch.full_like(L, math.nan), L)
        L = torch.where(cols[:, 2] > 0, torch.full_like(L, math.nan), L)
        a_safe = torch.where(torch.isinf(a64), torch.zeros_like(a64), a64)
        if prob:
            # loss = L S1 - S2, S1 = sum_j w_j q'_j, S2 = sum_j w_j q'_j d_j, q' = (1 - eps) q + eps / C: both >= 0.
            S1, S2 = (1.0 - eps) * cols[:, 3], (1.0 - eps) * cols[:, 4]
            if eps > 0.0:
                S1, S2 = S1 + (eps / C) * W, S2 + (eps / C) * cols[:, -1]
            row = L * S1 - S2
            w_t = S1  # what backward scales p by
        else:
            d_t = cols[:, 3] - a_safe
            w_t = torch.where(valid, cols[:, 4] if has_w else torch.ones_like(L), torch.zeros_like(L))
            row = (1.0 - eps) * w_t * (L - d_t)  # L >= 0 and -d_t >= 0: no cancellation
            if eps > 0.0:
                smooth = L * W - cols[:, -1]  # sum_j w_j (L - d_j): both terms >= 0
                row = row + torch.where(valid, (eps / C) * smooth, torch.zeros_like(smooth))
            row = torch.where(valid, row, torch.zeros_like(row))
        if reduction == "mean":
            # torch's mean: over the weights of the counted targets; over the rows for probabilities
            denom = torch.tensor(float(M), dtype=ACC, device=dev) if prob else mean_denom(w_t.sum(), eps)
        else:
            denom = None
        if reduction == "none":
            loss = row
        else:
            loss = row.sum() if reduction == "sum" else row.sum() / denom
        ctx.opts = (prob, ignore_index, reduction, eps, chunk, shard.start, size, C, group, reduce_input_grad, wd)
        ctx.save_for_backward(h, w_loc, b_loc, target, cwl, a, L, w_t, W, denom)  # row statistics in float64
        return loss.to(loss_dtype(wd))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, w_loc, b_loc, target, cw_loc, a, L, w_t, W, denom = ctx.saved_tensors
        prob, ignore_index, reduction, eps, chunk, start, size, C, group, reduce_input_grad, wd = ctx.opts
        M = h.shape[0]
        # dz in float64 for fp32 / fp64 inputs, float32 for half ones (rounded to half once): as the
        # single-process path's pass 2; fp32 dz put dW / db a few fp32 ulps beyond torch's own fp32 error
        wd = torch.float64 if h.dtype in (torch.float32, torch.float64) else wd
        a, L, w_t, W = a.to(wd), L.to(wd), w_t.to(wd), W.to(wd)
        if reduction == "none":
            gr = g.to(wd)
        else:
            gr = g.to(wd).expand(M)
            if reduction == "mean":
                gr = gr / denom.to(wd)
                if not prob:
                    gr = torch.where(target != ignore_index, gr, torch.zeros_like(gr))
        cwl = cw_loc.to(wd) if cw_loc is not None else None
        Wv = W if cw_loc is not None else float(C)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        out_dt = working_dtype(h.dtype)
        dh = torch.zeros(h.shape, dtype=out_dt, device=h.device) if need_h else None  # all-reduced: not float64
        dw = torch.zeros(w_loc.shape, dtype=wd, device=h.device) if need_w else None
        # db sums M rows of dz: float64 (a vector of V_local), so the chunks' partial sums add no fp32 roundings
        db = torch.zeros(size, dtype=torch.float64, device=h.device) if need_b and b_loc is not None else None
        zeros = torch.zeros(1, dtype=wd, device=h.device)
        for c0 in range(0, M if size > 0 else 0, chunk):
            sl = slice(c0, min(c0 + chunk, M))
            z = _logits(h[sl], w_loc, b_loc, wd)
            n = z.shape[0]
            a2, L2, g2 = a[sl].unsqueeze(1), L[sl].unsqueeze(1), gr[sl].unsqueeze(1)
            if prob:
                dz = prob_block_grad(z, a2, L2, target[sl].to(wd), cwl, w_t[sl].unsqueeze(1), eps, C, g2)
            else:
                dz = ce_block_grad(
                    z, a2, L2, zeros.expand(n, 1), target[sl].unsqueeze(1), w_t[sl].unsqueeze(1), g2, cwl, Wv,
                    (ignore_index, eps, 0.0, start, size, C),
                )
            del z
            dzc = dz.to(h.dtype)
            if dh is not None:
                dh[sl] = dzc @ w_loc.to(h.dtype)
            if dw is not None:
                dw.addmm_(dz.t(), h[sl].to(wd))
            if db is not None:
                db += dz.sum(dim=0, dtype=torch.float64)
        if dh is not None and reduce_input_grad:
            _comm.all_reduce(dh, "sum", group)  # dh = sum over shards of dz W_loc: the one backward collective
        return (
            dh.to(h.dtype) if dh is not None else None,
            dw.to(w_loc.dtype) if dw is not None else None,
            db.to(b_loc.dtype) if db is not None else None,
        ) + (None,) * 10


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0, options=None,
                         group=None, vocab_start: int | None = None, reduce_input_grad: bool = True) -> Tensor:
    """``cross_entropy(linear(input, full_weight, full_bias), target)`` with the classifier rows sharded.

    Mirrors ``torch.nn.functional.linear_cross_entropy``: ``input`` (D,) or (N, D), replicated on every
    rank; ``linear_weight`` this rank's (V_local, D) rows; ``linear_bias`` its (V_local,) slice; ``weight``
    the full (V,) class weight or its (V_local,) slice; ``target`` global class indices (replicated), or
    class probabilities sharded like the classifier rows: this rank's (V_local,) or (N, V_local) slice (a
    DTensor sharded on its last dimension is accepted); ``ignore_index`` None means -100 (and must stay None
    with probabilities). ``options`` (a ``torch.nn.LinearCrossEntropyOptions``): only ``batch_chunk_size`` is
    read (tokens per chunk; default min(1024, 2**22 // V_local)); accumulation is always the working
    precision with float64 partial sums, whatever ``acc_policy`` says. The local logits are never
    materialised: T x V_local at a time. ``reduce_input_grad=False`` skips the backward all-reduce of the
    input gradient, for callers whose tensor-parallel region reduces it already (each rank then holds its
    shard's partial gradient).
    """
    no_transforms(input)
    h = _replicated(input)
    wt, group, _ = unwrap(linear_weight, group, lambda n: 0)  # a DTensor weight is sharded on its rows
    check.tensor("input", h)
    check.tensor("linear_weight", wt)
    check.tensor("target", target)
    h, wt, linear_bias = _config.autocast_linear(h.device.type, h, wt, linear_bias)  # as F.linear under autocast
    if not h.dtype.is_floating_point or not wt.dtype.is_floating_point:
        raise TypeError("input and linear_weight must be floating-point tensors")
    if wt.dim() != 2:
        raise ValueError(f"linear_weight must be (V_local, D), got shape {tuple(wt.shape)}")
    if h.dim() not in (1, 2) or h.shape[-1] != wt.shape[1]:
        raise ValueError(f"input must be (D,) or (N, D) with D = {wt.shape[1]}, got shape {tuple(h.shape)}")
    ignore_index = check.ignore_index(ignore_index, allow_none=True)
    prob = target.dtype.is_floating_point
    if prob:
        # class probabilities: this rank's slice, sharded like the classifier rows
        target, group, _ = unwrap(target, group, lambda n: n - 1)
        want = (*h.shape[:-1], wt.shape[0])
        if tuple(target.shape) != want:
            raise ValueError(
                f"a floating-point target holds class probabilities and must be this rank's slice of shape {want} "
                f"(input's batch shape, then V_local), got {tuple(target.shape)}"
            )
        if ignore_index is not None:
            raise ValueError("ignore_index cannot be specified when target contains class probabilities")
        if target.requires_grad:
            raise ValueError("vocab-parallel linear_cross_entropy does not differentiate with respect to probability "
                             "targets")
    else:
        target = _replicated(target)
        check.integer_target(target)
        if h.dim() == 1 and tuple(target.shape) == (1,):  # unbatched (D,) input: a (1,) target too, as torch
            target = target.reshape(())
        if tuple(target.shape) != tuple(h.shape[:-1]):
            raise ValueError(f"target must have shape {tuple(h.shape[:-1])}, got {tuple(target.shape)}")
    if target.device != h.device:
        raise ValueError(f"target is on {target.device} but input is on {h.device}")
    red = check.reduction(reduction, None, None)
    eps = check.label_smoothing(label_smoothing)
    ii = -100 if ignore_index is None else ignore_index
    chunk = max(1, min(DEFAULT_CHUNK, CHUNK_ELEMS // max(1, wt.shape[0])))
    if options is not None:
        bcs = getattr(options, "batch_chunk_size", None)
        chunk = chunk if bcs is None else int(bcs)
    if chunk < 1:
        raise ValueError(f"batch_chunk_size must be >= 1, got {chunk}")
    b = _replicated(linear_bias)
    if b is not None and (b.dim() != 1 or b.shape[0] != wt.shape[0]):
        raise ValueError(f"linear_bias must be this rank's ({wt.shape[0]},) slice, got {tuple(b.shape)}")
    shard = _comm.shard_of(group, wt.shape[0], vocab_start)
    cw = class_weight_arg(weight, wt.shape[0], h)
    h2 = h.reshape(-1, h.shape[-1])
    t2 = target.reshape(h2.shape[0], wt.shape[0]) if prob else target.reshape(-1).long()
    loss = VocabParallelLinearCrossEntropyFunction.apply(
        h2, wt, b, t2, prob, cw, ii, red, eps, chunk, shard, group, bool(reduce_input_grad)
    )
    if prob:  # float64 probabilities: a float64 loss, as the single-device op (and torch)
        loss = loss.to(torch.promote_types(loss.dtype, t2.dtype))
    return loss.reshape(h.shape[:-1]) if red == "none" else loss
