"""Cross-entropy, selective log-softmax and entropy on the reference path (plain PyTorch, row blocks).

Math:     with y = log_softmax(x) of a block (``plain.block_logp``, float64 on the CPU):
          nll_i = -y[t_i]; label smoothing adds -(eps/C) sum_j w_j y_j; z_loss adds z * lse**2 with
          lse = max + L; softcap replaces x by c * tanh(x / c) first.  Gradient of one row:
          c1 * p_j - (1 - eps) w_t [j = t] - (eps / C) w_j with p = exp(y), c1 = (1 - eps) w_t + (eps / C) W
          + 2 z lse, and at the target p_t - 1 = expm1(y_t) (never softmax_t - 1, which cancels).
Traffic:  forward keeps per-row statistics only; backward recomputes y block by block (O(block)
          temporaries, never O(M * V)).
Numerics: y is accurate to the rounding of the output dtype (see plain.py); every sum below adds terms of
          one sign (y <= 0), so nothing cancels; losses and lse in working precision (fp32 for halves).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .plain import as_rows, block_logp, block_probs, iter_row_blocks, map_blocks, working_dtype

# Loss blocks are larger than plain.BLOCK_ELEMS: fewer, larger fused calls amortise the per-block overhead
# (measured on 2 cores at (4096, 32000) fp32: CE forward 271 ms at 2**18 elements, 225 ms at 2**19).
LOSS_BLOCK_ELEMS = 1 << 19


def capped(x2: Tensor, softcap: float | None) -> Tensor:
    """softcap * tanh(x / softcap) in working precision (x itself when softcap is None)."""
    if softcap is None:
        return x2
    wd = working_dtype(x2.dtype)
    return torch.tanh(x2.to(wd) / softcap).mul_(softcap)


def cap_slope(x2: Tensor, softcap: float, dtype: torch.dtype) -> Tensor:
    """d/dx [c tanh(x / c)] = sech^2(u), u = x / c, from the raw logits as 4 e / (1 + e)^2, e = exp(-2|u|).

    ``1 - (capped / c)^2`` cancels where tanh saturates: the rounded tanh has lost the bits of 1 - tanh
    (fp32: about 100 ulp at u = 3, 6000 at u = 5, 0 instead of 4e-8 past u = 9); this form has no subtraction.
    """
    e = x2.to(dtype).div(softcap).abs_().mul_(-2.0).exp_()
    return e.mul(4.0).div_((1.0 + e).square_())


def _cap_grad(dx: Tensor, xr: Tensor, softcap: float | None) -> Tensor:
    """dx times the softcap's slope at the raw logits ``xr`` (dx itself without a softcap)."""
    return dx if softcap is None else dx.mul_(cap_slope(xr, softcap, dx.dtype))


def _lse(x2: Tensor, L: Tensor) -> Tensor:
    """max + L per row; the max itself where it is infinite (lse -inf for all -inf rows, +inf with a +inf)."""
    a = x2.amax(dim=1, keepdim=True).to(L.dtype)
    return torch.where(torch.isinf(a), a, a + L)


def _store(dst: Tensor, res: Tensor) -> None:
    dst.copy_(res.view(dst.shape))


def _targets(target: Tensor, sl, ignore_index: int) -> tuple[Tensor, Tensor]:
    t = target[sl].reshape(-1, 1)
    valid = t != ignore_index
    return torch.where(valid, t, torch.zeros_like(t)), valid


def _target_weight(w: Tensor | None, t_safe: Tensor, valid: Tensor, like: Tensor) -> Tensor:
    w_t = w[t_safe] if w is not None else torch.ones_like(like)
    return torch.where(valid, w_t, torch.zeros_like(w_t))


def _wsum(y: Tensor, w: Tensor | None) -> Tensor:
    """sum_j w_j y_j per row (sum_j y_j without weights)."""
    return (y @ w).unsqueeze(1) if w is not None else y.sum(dim=1, keepdim=True)


@torch.no_grad()
def ce_rows(
    xv: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, w_t) for class-index targets; ``xv`` is (*lead, C), ``target`` has shape lead.

    ``w_t`` is the weight of the row's target (0 for ignored rows): the mean's denominator is its sum.
    """
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    loss = torch.empty(lead, dtype=wd, device=xv.device)
    lse = torch.empty(lead, dtype=wd, device=xv.device)
    wt = torch.empty(lead, dtype=wd, device=xv.device)
    eps = label_smoothing

    def block(sl, ws):
        x2 = capped(as_rows(xv[sl]), softcap)
        t_safe, valid = _targets(target, sl, ignore_index)
        # One fused log_softmax one precision up (cheaper than logsumexp's separate passes on the CPU).
        y, L = block_logp(x2, ws)
        w = weight.to(y.dtype) if weight is not None else None
        w_t = _target_weight(w, t_safe, valid, L)
        # ignored rows give 0 even when their placeholder class 0 holds -inf (0 * inf would be NaN)
        row = torch.where(valid, -(1.0 - eps) * w_t * y.gather(1, t_safe), 0.0)
        if eps > 0.0:
            # -(eps/C) sum_j w_j y_j: terms of one sign, nothing cancels.
            row = row - torch.where(valid, (eps / C) * _wsum(y, w), torch.zeros_like(row))
        l_row = _lse(x2, L)
        if z_loss != 0.0:
            row = row + torch.where(valid, z_loss * l_row * l_row, torch.zeros_like(l_row))
        _store(loss[sl], row)
        _store(lse[sl], l_row)
        _store(wt[sl], w_t)

    map_blocks(block, list(iter_row_blocks(lead, C, LOSS_BLOCK_ELEMS)), xv.device)
    return loss, lse, wt


def _grad_block(x2: Tensor, p: Tensor, L: Tensor, t_safe: Tensor, valid: Tensor, weight: Tensor | None,
                eps: float, z_loss: float, softcap: float | None, g2: Tensor, a: Tensor | None = None) -> Tensor:
    """The (R, C) gradient block of sum_i g_i loss_i from p = softmax(x2) and L (wide dtype), in place in p."""
    C = x2.shape[1]
    w = weight.to(p.dtype) if weight is not None else None
    w_t = _target_weight(w, t_safe, valid, L)
    hard = (1.0 - eps) * w_t
    c1 = hard
    if eps > 0.0:  # only then: a NaN weight of a class no row targets must not reach every gradient (0 * NaN)
        c1 = c1 + (eps / C) * (w.sum() if w is not None else float(C))
    if a is None:
        a = x2.amax(dim=1, keepdim=True).to(p.dtype)
    if z_loss != 0.0:
        c1 = c1 + 2.0 * z_loss * torch.where(torch.isinf(a), a, a + L)
    c1 = torch.where(valid, c1, torch.zeros_like(c1))
    res = p.mul_(g2 * c1)  # g c1 p_j
    if eps > 0.0:
        res.sub_((eps / C) * g2 * valid.to(p.dtype) * (w if w is not None else 1.0))
    # At the target: c1 p_t - hard = hard (p_t - 1) + (c1 - hard) p_t, with p_t - 1 = expm1(y_t) and
    # y_t = (x_t - max) - L: x_t - max is exact in the wide dtype, so a confident row keeps its -r.
    a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
    y_t = (x2.gather(1, t_safe).to(p.dtype) - a_safe) - L
    at_t = hard * torch.expm1(y_t) + (c1 - hard) * torch.exp(y_t)
    if eps > 0.0:
        at_t = at_t - (eps / C) * (w[t_safe] if w is not None else 1.0)
    res.scatter_(1, t_safe, torch.where(valid, at_t * g2, res.gather(1, t_safe)))
    return res


@torch.no_grad()
def ce_grad(
    xv: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    g: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """d(sum_i g_i loss_i)/dx for class-index targets; ``g`` has shape lead (already divided by the mean)."""
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx

    def block(sl, ws):
        x2 = capped(as_rows(xv[sl]), softcap)
        t_safe, valid = _targets(target, sl, ignore_index)
        p, L = block_probs(x2, ws)
        g2 = g[sl].reshape(-1, 1).to(p.dtype)
        res = _grad_block(x2, p, L, t_safe, valid, weight, label_smoothing, z_loss, softcap, g2)
        _store(dx[sl], _cap_grad(res, as_rows(xv[sl]), softcap))

    map_blocks(block, list(iter_row_blocks(lead, C, LOSS_BLOCK_ELEMS)), xv.device)
    return dx


def mean_denom(w_sum: Tensor, label_smoothing: float) -> Tensor:
    """The class-index mean's denominator (the counted targets' weight sum), NaN where it is 0 with smoothing.

    torch reduces the target and the smoothing terms apart, (1 - eps) A / W + eps B / W: with W = 0 (every
    counted target of weight 0, or all ignored) A is 0 and the loss NaN, while the fused per-row sum divided by
    W would be B / 0 = inf. A NaN denominator gives torch's NaN loss and NaN gradients on the counted rows
    (ignored rows still get 0: they are selected, never multiplied). Without smoothing W stays as it is:
    A / W is then what torch computes. (Weights of mixed sign summing to exactly 0 with smoothing: NaN here,
    where torch may give ±inf.)
    """
    if label_smoothing == 0.0:
        return w_sum
    return torch.where(w_sum == 0, torch.full_like(w_sum, math.nan), w_sum)


def target_weights(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """Per-row weight of the target class (0 for ignored rows), computed from the targets alone.

    Out-of-range targets are clamped for the lookup (no device-side indexing assert on CUDA); they are
    reported by the callers' own range checks.
    """
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    t_safe = torch.where(valid, target, torch.zeros_like(target)).clamp_(0, weight.shape[0] - 1)
    return torch.where(valid, weight.to(dtype)[t_safe], torch.zeros((), dtype=dtype, device=target.device))


@torch.no_grad()
def ce_fused(
    xv: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    scale: Tensor,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass for a loss that will be differentiated: per-row (loss, lse) and dx of sum_i s_i loss_i.

    ``scale`` has shape lead (1 / denominator for a mean, 1 for a sum; 0 on ignored rows). Each block is read
    once: one fused softmax one precision up gives both the loss (from L and x_t - max) and the gradient,
    which backward then only multiplies by grad_output (the CPU analogue of the fused kernels).
    """
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    loss = torch.empty(lead, dtype=wd, device=xv.device)
    lse = torch.empty(lead, dtype=wd, device=xv.device)
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    eps = label_smoothing

    def block(sl, ws):
        x2 = capped(as_rows(xv[sl]), softcap)
        t_safe, valid = _targets(target, sl, ignore_index)
        p, L = block_probs(x2, ws)
        w = weight.to(p.dtype) if weight is not None else None
        w_t = _target_weight(w, t_safe, valid, L)
        a = x2.amax(dim=1, keepdim=True).to(p.dtype)
        a_safe = torch.where(torch.isinf(a), torch.zeros_like(a), a)
        row = torch.where(valid, (1.0 - eps) * w_t * (L - (x2.gather(1, t_safe).to(p.dtype) - a_safe)), 0.0)
        if eps > 0.0:
            W = w.sum() if w is not None else float(C)
            # sum_j w_j (x_j - max) from the block; both terms of the smoothing term are >= 0
            smooth = L * W - _wsum(x2.to(p.dtype) - a_safe, w)
            row = row + torch.where(valid, (eps / C) * smooth, torch.zeros_like(row))
        l_row = torch.where(torch.isinf(a), a, a + L)
        if z_loss != 0.0:
            row = row + torch.where(valid, z_loss * l_row * l_row, torch.zeros_like(l_row))
        _store(loss[sl], row)
        _store(lse[sl], l_row)
        g2 = scale[sl].reshape(-1, 1).to(p.dtype)
        res = _grad_block(x2, p, L, t_safe, valid, weight, eps, z_loss, softcap, g2, a)
        _store(dx[sl], _cap_grad(res, as_rows(xv[sl]), softcap))

    map_blocks(block, list(iter_row_blocks(lead, C, LOSS_BLOCK_ELEMS)), xv.device)
    return loss, lse, dx


def _smoothed(y: Tensor, eps: float, C: int) -> Tensor:
    return y * (1.0 - eps) + eps / C if eps > 0.0 else y


@torch.no_grad()
def ce_prob_rows(
    xv: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Per-row (loss, lse) for class-probability targets (same shape as ``xv``)."""
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    loss = torch.empty(lead, dtype=wd, device=xv.device)
    lse = torch.empty(lead, dtype=wd, device=xv.device)

    def block(sl, ws):
        x2 = capped(as_rows(xv[sl]), softcap)
        y, L = block_logp(x2, ws)
        q = _smoothed(as_rows(target[sl]).to(y.dtype), label_smoothing, C)
        wq = q * weight.to(y.dtype) if weight is not None else q
        # -sum_j w_j q_j y_j: terms of one sign for q, w >= 0. A -inf logit with q = 0 gives NaN, as torch.
        row = -(wq * y).sum(dim=1, keepdim=True)
        l_row = _lse(x2, L)
        if z_loss != 0.0:
            row = row + z_loss * l_row * l_row
        _store(loss[sl], row)
        _store(lse[sl], l_row)

    map_blocks(block, list(iter_row_blocks(lead, C, LOSS_BLOCK_ELEMS)), xv.device)
    return loss, lse


@torch.no_grad()
def ce_prob_grad(
    xv: Tensor,
    target: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    g: Tensor,
    out_dtype: torch.dtype,
    need_target_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Gradients for class-probability targets: dx = g (sum(w q) p - w q) (+ z term), dq = -g (1-eps) w log p."""
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    dq = torch.empty(target.shape, dtype=target.dtype, device=xv.device) if need_target_grad else None
    if dx.numel() == 0:
        return dx, dq

    def block(sl, ws):
        x2 = capped(as_rows(xv[sl]), softcap)
        y, L = block_logp(x2, ws)
        g2 = g[sl].reshape(-1, 1).to(y.dtype)
        w = weight.to(y.dtype) if weight is not None else None
        q = _smoothed(as_rows(target[sl]).to(y.dtype), label_smoothing, C)
        wq = q * w if w is not None else q
        c1 = wq.sum(dim=1, keepdim=True)
        if z_loss != 0.0:
            c1 = c1 + 2.0 * z_loss * _lse(x2, L)
        res = (torch.exp(y).mul_(c1) - wq).mul_(g2)
        _store(dx[sl], _cap_grad(res, as_rows(xv[sl]), softcap))
        if dq is not None:
            gq = -y * g2 * (1.0 - label_smoothing)
            _store(dq[sl], gq * w if w is not None else gq)

    map_blocks(block, list(iter_row_blocks(lead, C, LOSS_BLOCK_ELEMS)), xv.device)
    return dx, dq


@torch.no_grad()
def selective_rows(xv: Tensor, index: Tensor) -> Tensor:
    """log_softmax(x).gather(-1, index) for (*lead, V) ``xv`` and (*lead, K) ``index``; working precision."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    out = torch.empty(index.shape, dtype=working_dtype(xv.dtype), device=xv.device)
    if out.numel() == 0:
        return out

    def block(sl, ws):
        x2 = as_rows(xv[sl])
        y, _ = block_logp(x2, ws)
        _store(out[sl], y.gather(1, index[sl].reshape(x2.shape[0], -1)))

    map_blocks(block, list(iter_row_blocks(lead, V, LOSS_BLOCK_ELEMS)), xv.device)
    return out


@torch.no_grad()
def selective_grad(xv: Tensor, index: Tensor, g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dx = scatter_add(g at index) - p * sum(g)."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx

    def block(sl, ws):
        x2 = as_rows(xv[sl])
        y, _ = block_logp(x2, ws)
        i2 = index[sl].reshape(x2.shape[0], -1)
        g2 = g[sl].reshape(x2.shape[0], -1).to(y.dtype)
        res = torch.exp(y).mul_(-g2.sum(dim=1, keepdim=True)).scatter_add_(1, i2, g2)
        _store(dx[sl], res)

    map_blocks(block, list(iter_row_blocks(lead, V, LOSS_BLOCK_ELEMS)), xv.device)
    return dx


def _plogp(y: Tensor) -> tuple[Tensor, Tensor]:
    """(p, p * log p) with 0 * -inf = 0 for -inf logits (they contribute nothing); a NaN (a row with NaN or +inf,
    NUMERICS.md) stays NaN."""
    p = torch.exp(y)
    return p, torch.where((p > 0) | (y != y), p * y, torch.zeros_like(p))


@torch.no_grad()
def entropy_rows(xv: Tensor) -> Tensor:
    """H = -sum p log p per row (terms of one sign), working precision."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    out = torch.empty(lead, dtype=wd, device=xv.device)
    if V == 0:
        return out.fill_(0.0)

    def block(sl, ws):
        y, _ = block_logp(as_rows(xv[sl]), ws)
        _store(out[sl], -_plogp(y)[1].sum(dim=1))

    map_blocks(block, list(iter_row_blocks(lead, V, LOSS_BLOCK_ELEMS)), xv.device)
    return out


@torch.no_grad()
def entropy_grad(xv: Tensor, g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dH/dx_j = -p_j (log p_j + H)."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx

    def block(sl, ws):
        y, _ = block_logp(as_rows(xv[sl]), ws)
        p, plogp = _plogp(y)
        H = -plogp.sum(dim=1, keepdim=True)
        _store(dx[sl], (plogp + p * H).neg_().mul_(g[sl].reshape(-1, 1).to(y.dtype)))

    map_blocks(block, list(iter_row_blocks(lead, V, LOSS_BLOCK_ELEMS)), xv.device)
    return dx
