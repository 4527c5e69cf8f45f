"""autograd.Functions of the vocab-parallel ops: collectives inside forward only (backward of the losses
needs none; softmax / log_softmax need one M-sized all-reduce in backward, the row sum of g * y or g, which
no formulation avoids for an arbitrary upstream gradient).

Inputs arrive as the local shard with the class dimension last, ``xv`` of shape (*lead, V_local).
Reductions never go through autograd-aware collectives: every all-reduce runs on plain tensors inside a
Function, so autograd adds nothing.  Double backward is not supported (``once_differentiable``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _validate as check
from ..autograd.losses import loss_dtype
from ..reference.losses import cap_slope, capped, mean_denom
from ..reference.plain import as_rows, iter_row_blocks, working_dtype
from . import _comm
from ._stats import ACC, Block, full_d, global_max, global_stats, row_blocks, shifted


def _cap_fn(softcap: float | None):
    """The blocks' logit transform: ``reference.losses.capped`` at this softcap (None: no transform)."""
    return None if softcap is None else functools.partial(capped, softcap=softcap)


def _store(dst: Tensor, res: Tensor) -> None:
    dst.copy_(res.view(dst.shape))


def local_class_weight(w: Tensor | None, shard: _comm.Shard) -> Tensor | None:
    """This rank's slice of a class weight given in full (V,) or already sliced (V_local,); needs the start,
    so it runs once the layout is known (type, shape and device were checked before any collective)."""
    if w is None or w.shape[0] == shard.size:
        return w
    full = shard.V if shard.V is not None else max(w.shape[0], shard.start + shard.size)
    if w.shape[0] != full:
        local = f" or this rank's V_local = {shard.size}" if shard.size != full else ""
        raise ValueError(f"weight must have V = {full} elements (one per class){local}, got {w.shape[0]}")
    return w[shard.start : shard.start + shard.size]


def check_classes(target: Tensor | None, V: int, ignore_index: int = -100, name: str = "input") -> None:
    """Once V is known (the same on every rank, so every rank raises alike): V >= 1, class indices in range."""
    if V == 0:
        raise ValueError(f"{name} must have at least one class across the group (V >= 1)")
    if target is not None:
        check.target_range(target, V, ignore_index)


def global_view(x: Tensor, V: int) -> Tensor:
    """A stand-in of the global (*lead, V) input's shape, without memory (an expanded 0-stride view)."""
    return torch.zeros((), dtype=x.dtype, device=x.device).expand(*x.shape[:-1], V)


class VocabParallelSoftmaxFunction(torch.autograd.Function):
    """softmax / log_softmax of the local shard; 2 all-reduces forward, 1 (M values) backward."""

    @staticmethod
    def forward(ctx, xv: Tensor, mask: Tensor | None, log: bool, group) -> Tensor:
        s = global_stats(xv, mask, mask is not None, group)
        y = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        denom = torch.where(torch.isnan(s.L), s.L, 1.0 + s.r)
        for sl, xw in row_blocks(xv, mask):
            d_hi, d_lo, e = shifted(xw, s.a[sl].reshape(-1, 1))
            L = s.L[sl].reshape(-1, 1)
            if log:
                # d - L: both terms <= 0, so the subtraction never cancels.
                res = d_hi - L if d_lo is None else (d_hi - L).add_(d_lo)
            else:
                res = e.div_(denom[sl].reshape(-1, 1))  # a true division: one rounding per entry
            _store(y[sl], res)
        ctx.log, ctx.group = log, group
        ctx.save_for_backward(y, mask, torch.isneginf(s.a))  # rows with nothing left (global max -inf)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        y, mask, empty = ctx.saved_tensors
        lead, V = tuple(y.shape[:-1]), y.shape[-1]
        wd = working_dtype(y.dtype)
        # The row sum over the whole vocabulary: sum(g * y) (softmax) or sum(g) (log_softmax).
        part = torch.zeros(lead, dtype=ACC, device=y.device)
        blocks = list(iter_row_blocks(lead, V)) if V > 0 else []
        for sl in blocks:
            y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
            if mask is not None:  # masked-out outputs are constants: their upstream gradient is not summed
                g2 = g2.masked_fill(~as_rows(mask[sl]), 0.0)
            t = g2 if ctx.log else g2 * y2
            _store(part[sl], t.sum(dim=1, dtype=ACC))
        _comm.all_reduce(part, "sum", ctx.group)
        tot = part.to(wd)
        dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        for sl in blocks:
            y2, g2 = as_rows(y[sl]).to(wd), as_rows(g[sl]).to(wd)
            s2 = tot[sl].reshape(-1, 1)
            if ctx.log:
                res = g2 - torch.exp(y2) * s2
                if mask is not None:
                    res = res.masked_fill_(~as_rows(mask[sl]), 0.0)
                    res = res.masked_fill_(empty[sl].reshape(-1, 1), 0.0)
            else:
                res = y2 * (g2 - s2)
            _store(dx[sl], res)
        return dx, None, None, None


class VocabParallelLogsumexpFunction(torch.autograd.Function):
    """Replicated lse (shape lead, the input's dtype); backward g * softmax(x) is local."""

    @staticmethod
    def forward(ctx, xv: Tensor, mask: Tensor | None, group) -> Tensor:
        s = global_stats(xv, mask, True, group)
        ctx.save_for_backward(xv, s.a, s.r, s.lse, mask)
        return s.lse.to(xv.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        xv, a, r, lse, mask = ctx.saved_tensors
        wd = working_dtype(xv.dtype)
        dx = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        if xv.numel() == 0:
            return dx, None, None
        for sl in iter_row_blocks(tuple(xv.shape[:-1]), xv.shape[-1]):
            x2 = as_rows(xv[sl]).to(wd)
            if mask is not None:
                x2 = x2.masked_fill(~as_rows(mask[sl]), -math.inf)
            a2, r2, l2 = (t[sl].reshape(-1, 1) for t in (a, r, lse))
            # exp(d) / (1 + r) from the global (max, rest sum): not exp(x - lse) with a rounded lse, which
            # puts |lse| units of error into every entry.
            p = shifted(x2, a2)[2] / (1.0 + r2)
            # torch's conventions where lse is infinite: exp(x - lse) (NaN for an all -inf row, 0 / NaN with +inf)
            p = torch.where(torch.isinf(l2), torch.exp(x2 - l2), p)
            if mask is not None:  # nothing left in the row: no mass, gradient 0
                p = torch.where(torch.isneginf(l2), torch.zeros_like(p), p)
            _store(dx[sl], p.mul_(g[sl].reshape(-1, 1).to(wd)))
        return dx, None, None


def _local_target(t: Tensor, start: int, size: int, ignore_index: int | None):
    """(owned, local index made safe) for global class indices t."""
    li = t - start
    owned = (li >= 0) & (li < size)
    if ignore_index is not None:
        owned &= t != ignore_index
    return owned, torch.where(owned, li, torch.zeros_like(li))


def ce_block_grad(xw, a2, L, lse2, t, w_t, g2, wl, W, opts) -> Tensor:
    """d(sum_i g_i loss_i)/dx of one (R, V_local) working-precision block of logits, no collective.

    Row terms (a, L, lse, w_t: (R, 1)) are the global ones from forward; as reference/losses.ce_grad:
    c1 p_j - (eps / C) w_j off target, hard (p_t - 1) + (c1 - hard) p_t - (eps / C) w_t at the target.
    """
    ignore_index, eps, z_loss, start, size, C = opts
    valid = t != ignore_index
    owned, li = _local_target(t, start, size, ignore_index)
    d_hi, d_lo, _ = shifted(xw, a2)
    d = full_d(d_hi, d_lo)
    p = torch.exp(d - L)
    hard = (1.0 - eps) * w_t
    c1 = hard + (eps / C) * W if eps > 0.0 else hard  # a NaN weight of an untargeted class: not 0 * NaN
    if z_loss != 0.0:
        c1 = c1 + 2.0 * z_loss * lse2
    c1 = torch.where(valid, c1, torch.zeros_like(c1))
    # At the target: c1 p_t - hard = hard (p_t - 1) + (c1 - hard) p_t, with p_t - 1 = expm1(d_t - L),
    # never p_t - 1, which cancels for a confident row.
    d_t = d.gather(1, li)
    p_t = p.gather(1, li)
    at_t = hard * torch.expm1(d_t - L) + (c1 - hard) * p_t
    if eps > 0.0:
        at_t = at_t - (eps / C) * (wl[li] if wl is not None else 1.0)
    res = p.mul_(c1)
    if eps > 0.0:
        res = res - (eps / C) * (wl if wl is not None else 1.0) * valid.to(res.dtype)  # a bool would make it fp32
    res.scatter_(1, li, torch.where(owned, at_t, res.gather(1, li)))
    return res.mul_(g2)


def prob_block_grad(xw, a2, L, q, wl, c1, eps, C, g2) -> Tensor:
    """d(sum_i g_i loss_i)/dx of one (R, V_local) block for class-probability targets q (working precision),
    no collective: g (c1 p_j - w_j q'_j) with q' = (1 - eps) q + eps / C and c1 = S1 (+ the z-loss term)."""
    q = q * (1.0 - eps) + eps / C if eps > 0.0 else q
    wq = q * wl if wl is not None else q
    d_hi, d_lo, _ = shifted(xw, a2)
    p = torch.exp(full_d(d_hi, d_lo) - L)
    return (p * c1 - wq).mul_(g2)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Class-index targets; returns (loss reduced as asked, replicated per-row lse).

    Forward: all-reduce(max) of M values (+ the local sizes), then one packed all-reduce(sum) of [r, holds,
    nan, d_t, (w_t), (sum_j w_j d_j)] per row and [V_local, (W)]; backward: none.
    """

    @staticmethod
    def forward(ctx, xv, target, weight, ignore_index, reduction, eps, z_loss, softcap, shard, group):
        wd = working_dtype(xv.dtype)
        cap = _cap_fn(softcap)
        m = global_max(xv, None, group, cap, shard)
        shard = m.shard
        start, size = shard.start, shard.size
        if shard.V is not None:
            check_classes(target, shard.V, ignore_index)
        w_loc = local_class_weight(weight, shard)
        valid = target != ignore_index
        has_w = w_loc is not None
        wl = w_loc.to(wd) if has_w else None
        n_cols = 1 + int(has_w) + int(eps > 0.0)

        def hook(b: Block) -> Tensor:
            t = target[b.sl].reshape(-1, 1)
            owned, li = _local_target(t, start, size, ignore_index)
            cols = [torch.where(owned, full_d(b.d_hi.gather(1, li), None if b.d_lo is None else
                                              b.d_lo.gather(1, li)), 0.0).to(ACC)]
            if has_w:
                cols.append(torch.where(owned, wl[li], 0.0).to(ACC))
            if eps > 0.0:
                d = full_d(b.d_hi, b.d_lo)
                # sum_j w_j d_j over this shard (d <= 0), summed across ranks in float64.
                part = (d.to(ACC) @ wl.to(ACC)).unsqueeze(1) if has_w else d.sum(dim=1, keepdim=True, dtype=ACC)
                cols.append(part)
            return torch.cat(cols, dim=1)

        scal = torch.zeros(2, dtype=ACC, device=xv.device)
        scal[0] = size  # V = sum of the local sizes, for vocab_start= callers
        if has_w:
            scal[1] = wl.sum(dtype=ACC)  # W = sum of all class weights, for label smoothing
        s = global_stats(xv, None, False, group, hook, n_cols, scal, cap, m)
        C = shard.V if shard.V is not None else int(s.scalars[0])  # V travels in the sums with vocab_start=
        if shard.V is None:
            check.target_range(target, C, ignore_index)
        d_t = s.cols[..., 0].to(wd)
        if has_w:
            w_t = s.cols[..., 1].to(wd)
            W = s.scalars[1].to(wd)
        else:
            w_t = valid.to(wd)
            W = float(C)
        w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
        L = s.L
        nll = L - d_t  # L >= 0 and -d_t >= 0: no cancellation
        row = (1.0 - eps) * w_t * nll if eps != 1.0 else torch.zeros_like(nll)
        if eps > 0.0:
            # sum_j w_j (L - d_j) = L W - sum_j w_j d_j: both terms >= 0 for non-negative weights.
            smooth = L * W - s.cols[..., -1].to(wd)
            row = row + torch.where(valid, (eps / C) * smooth, torch.zeros_like(smooth))
        if z_loss != 0.0:
            row = row + torch.where(valid, z_loss * s.lse * s.lse, torch.zeros_like(s.lse))
        denom = mean_denom(w_t.sum(), eps) if reduction == "mean" else None
        if reduction == "none":
            loss = row
        else:
            loss = row.sum() if reduction == "sum" else row.sum() / denom
        ctx.opts = (ignore_index, reduction, eps, z_loss, softcap, start, size, C)
        W_t = W if isinstance(W, Tensor) else torch.tensor(W, dtype=wd, device=xv.device)
        ctx.save_for_backward(xv, target, w_loc, denom, s.a, L, s.lse, w_t, W_t)
        ctx.mark_non_differentiable(s.lse)
        out = loss_dtype(xv.dtype)
        return loss.to(out), s.lse.to(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_lse):
        xv, target, w_loc, denom, a, Ls, lse, w_ts, W = ctx.saved_tensors
        ignore_index, reduction, eps, z_loss, softcap, start, size, C = ctx.opts
        wd = working_dtype(xv.dtype)
        lead = tuple(xv.shape[:-1])
        dx = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        valid_all = target != ignore_index
        if reduction == "none":
            gr = g
        else:
            gr = g.expand(lead)
            if reduction == "mean":
                gr = torch.where(valid_all, gr / denom, torch.zeros_like(gr))
        wl = w_loc.to(wd) if w_loc is not None else None
        W = W if w_loc is not None else float(C)
        cap = _cap_fn(softcap)
        for sl, xw in row_blocks(xv, None, cap):
            res = ce_block_grad(
                xw, a[sl].reshape(-1, 1), Ls[sl].reshape(-1, 1), lse[sl].reshape(-1, 1),
                target[sl].reshape(-1, 1), w_ts[sl].reshape(-1, 1), gr[sl].reshape(-1, 1).to(wd),
                wl, W, (ignore_index, eps, z_loss, start, size, C),
            )
            if softcap is not None:
                res.mul_(cap_slope(as_rows(xv[sl]), softcap, res.dtype))  # d/dx c tanh(x / c), from raw x
            _store(dx[sl], res)
        return (dx,) + (None,) * 9


class VocabParallelCrossEntropyProbFunction(torch.autograd.Function):
    """Class-probability targets, each rank holding the (*lead, V_local) slice of its own classes.

    loss_i = L S1 - S2 with S1 = sum_j w_j q'_j, S2 = sum_j w_j q'_j d_j (q' = (1 - eps) q + eps / C, d = x - max):
    both sums travel in the packed all-reduce (as sum_j w q and sum_j w q d, plus sum_j w and sum_j w d for the
    smoothing term, combined once C is known); backward g (S1 p_j - w_j q'_j) (+ the z term) is local.
    """

    @staticmethod
    def forward(ctx, xv, q_loc, weight, reduction, eps, z_loss, softcap, shard, group):
        wd = working_dtype(xv.dtype)
        cap = _cap_fn(softcap)
        m = global_max(xv, None, group, cap, shard)
        shard = m.shard
        if shard.V is not None:
            check_classes(None, shard.V)
        w_loc = local_class_weight(weight, shard)
        wl = w_loc.to(wd) if w_loc is not None else None

        def hook(b: Block) -> Tensor:
            q = as_rows(q_loc[b.sl]).to(wd)
            wq = q * wl if wl is not None else q
            d = full_d(b.d_hi, b.d_lo)
            # 0 * -inf (a -inf logit with q = 0) is NaN, as torch's -(q * log_softmax).sum()
            cols = [wq.sum(dim=1, keepdim=True, dtype=ACC), (wq * d).sum(dim=1, keepdim=True, dtype=ACC)]
            if eps > 0.0:
                cols.append((d @ wl).unsqueeze(1).to(ACC) if wl is not None else d.sum(dim=1, keepdim=True, dtype=ACC))
            return torch.cat(cols, dim=1)

        scal = torch.zeros(2, dtype=ACC, device=xv.device)
        scal[0] = shard.size
        if wl is not None:
            scal[1] = wl.sum(dtype=ACC)
        s = global_stats(xv, None, False, group, hook, 2 + int(eps > 0.0), scal, cap, m)
        C = shard.V if shard.V is not None else int(s.scalars[0])
        W = s.scalars[1] if wl is not None else torch.tensor(float(C), dtype=ACC, device=xv.device)
        S1, S2 = (1.0 - eps) * s.cols[..., 0], (1.0 - eps) * s.cols[..., 1]
        if eps > 0.0:
            S1, S2 = S1 + (eps / C) * W, S2 + (eps / C) * s.cols[..., 2]
        L = s.L.to(ACC)
        row = L * S1 - S2  # both terms >= 0 for q, w >= 0
        if z_loss != 0.0:
            row = row + z_loss * s.lse.to(ACC) ** 2
        rows = row.numel()
        if reduction == "none":
            loss = row
        else:
            loss = row.sum() if reduction == "sum" else row.sum() / rows
        ctx.opts = (reduction, eps, z_loss, softcap, C, rows)
        ctx.save_for_backward(xv, q_loc, w_loc, s.a, s.L, s.lse, S1.to(wd))
        ctx.mark_non_differentiable(s.lse)
        out = loss_dtype(xv.dtype)
        return loss.to(out), s.lse.to(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_lse):
        xv, q_loc, w_loc, a, Ls, lse, S1 = ctx.saved_tensors
        reduction, eps, z_loss, softcap, C, rows = ctx.opts
        wd = working_dtype(xv.dtype)
        lead = tuple(xv.shape[:-1])
        gr = g if reduction == "none" else g.expand(lead) / (rows if reduction == "mean" else 1)
        wl = w_loc.to(wd) if w_loc is not None else None
        dx = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        for sl, xw in row_blocks(xv, None, _cap_fn(softcap)):
            c1 = S1[sl].reshape(-1, 1)
            if z_loss != 0.0:
                c1 = c1 + 2.0 * z_loss * lse[sl].reshape(-1, 1)
            res = prob_block_grad(
                xw, a[sl].reshape(-1, 1), Ls[sl].reshape(-1, 1), as_rows(q_loc[sl]).to(wd), wl, c1, eps, C,
                gr[sl].reshape(-1, 1).to(wd),
            )
            if softcap is not None:
                res.mul_(cap_slope(as_rows(xv[sl]), softcap, res.dtype))  # d/dx c tanh(x / c), from raw x
            _store(dx[sl], res)
        return (dx,) + (None,) * 8


class VocabParallelSelectiveLogSoftmaxFunction(torch.autograd.Function):
    """log_softmax(x).gather(-1, index) for global indices (*lead, K); replicated output; local backward."""

    @staticmethod
    def forward(ctx, xv, index, shard, group):
        K = index.shape[-1]
        m = global_max(xv, None, group, None, shard)
        shard = m.shard
        if shard.V is not None:
            check.index_tensor(global_view(xv, shard.V), index, xv.dim() - 1)  # global indices, the global V
        start, size = shard.start, shard.size
        two = xv.dtype == torch.float32

        def hook(b: Block) -> Tensor:
            i2 = index[b.sl].reshape(b.xw.shape[0], K)
            owned, li = _local_target(i2, start, size, None)
            cols = [torch.where(owned, b.d_hi.gather(1, li), 0.0)]
            if two:  # the TwoSum low part travels separately so the result rounds as on one process
                cols.append(torch.where(owned, b.d_lo.gather(1, li), 0.0))
            return torch.cat(cols, dim=1).to(ACC)

        scal = torch.tensor([float(size)], dtype=ACC, device=xv.device)
        s = global_stats(xv, None, False, group, hook, K * (1 + int(two)), scal, m=m)
        if shard.V is None:
            V = int(s.scalars[0])
            bad = (index < 0) | (index >= V)
            if index.numel() and bool(bad.any()):
                raise IndexError(f"index {int(index[bad][0])} is out of bounds for dimension -1 of size {V}")
        wd = working_dtype(xv.dtype)
        L = s.L.unsqueeze(-1)
        res = s.cols[..., :K].to(wd) - L
        if two:
            res = res + s.cols[..., K:].to(wd)
        ctx.start, ctx.size = start, size
        ctx.save_for_backward(xv, index, s.a, s.L)
        return res.to(xv.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xv, index, a, Ls = ctx.saved_tensors
        wd = working_dtype(xv.dtype)
        dx = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        K = index.shape[-1]
        for sl, xw in row_blocks(xv, None):
            i2 = index[sl].reshape(xw.shape[0], K)
            g2 = g[sl].reshape(xw.shape[0], K).to(wd)
            owned, li = _local_target(i2, ctx.start, ctx.size, None)
            d_hi, d_lo, _ = shifted(xw, a[sl].reshape(-1, 1))
            p = torch.exp(full_d(d_hi, d_lo) - Ls[sl].reshape(-1, 1))
            res = p.mul_(-g2.sum(dim=1, keepdim=True)).scatter_add_(1, li, torch.where(owned, g2, 0.0))
            _store(dx[sl], res)
        return dx, None, None, None


class VocabParallelEntropyFunction(torch.autograd.Function):
    """H = L - sum_j exp(d_j) d_j / (1 + r): the sum rides the packed all-reduce; backward is local."""

    @staticmethod
    def forward(ctx, xv, group):
        def hook(b: Block) -> Tensor:
            d = full_d(b.d_hi, b.d_lo)
            # exp(d) * d is 0 * -inf = NaN for -inf logits; their contribution is 0.
            ed = torch.where(b.e > 0, b.e * d, torch.zeros_like(d))
            return ed.sum(dim=1, keepdim=True, dtype=ACC)

        s = global_stats(xv, None, False, group, hook, 1)
        wd = working_dtype(xv.dtype)
        r64 = s.r.to(ACC)
        # -sum p d = -S / (1 + r) >= 0 and L >= 0: two non-negative terms, formed in float64, rounded once.
        h = (torch.log1p(r64) - s.cols[..., 0] / (1.0 + r64)).to(wd)
        h = torch.where(torch.isnan(s.L), s.L, h)
        ctx.save_for_backward(xv, s.a, s.L, h)
        return h.to(loss_dtype(xv.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        xv, a, Ls, H = ctx.saved_tensors
        wd = working_dtype(xv.dtype)
        dx = torch.empty(xv.shape, dtype=xv.dtype, device=xv.device)
        for sl, xw in row_blocks(xv, None):
            d_hi, d_lo, _ = shifted(xw, a[sl].reshape(-1, 1))
            logp = full_d(d_hi, d_lo) - Ls[sl].reshape(-1, 1)
            p = torch.exp(logp)
            plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
            res = (plogp + p * H[sl].reshape(-1, 1)).neg_().mul_(g[sl].reshape(-1, 1).to(wd))
            _store(dx[sl], res)
        return dx, None
