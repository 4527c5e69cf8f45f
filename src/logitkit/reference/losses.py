"""Cross-entropy, selective log-softmax and entropy on the reference path (plain PyTorch, row blocks).

Math:     with (a, L) from ``plain.row_stats``: nll_i = L - d[t_i]; label smoothing adds (eps/C) sum_j w_j (L - d_j);
          z_loss adds z * lse**2; softcap replaces x by c * tanh(x / c) first.
          Gradient of one row: c1 * p_j - (1 - eps) w_t [j = t] - (eps / C) w_j, with
          c1 = (1 - eps) w_t + (eps / C) W + 2 z lse, and at the target p_t - 1 = expm1(d_t - L).
Traffic:  forward reads the logits once per block and keeps per-row (max, L) only; backward recomputes
          p from the logits block by block (O(block) temporaries, never O(M * V)).
Numerics: losses and lse in working precision (fp32 for half inputs), rounded once; the target gradient
          is expm1(d_t - L), never softmax_t - 1, which cancels for a confident row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plain import as_rows, d_full, iter_row_blocks, lse_of, row_stats, working_dtype


def capped(x2: Tensor, softcap: float | None) -> Tensor:
    """softcap * tanh(x / softcap) in working precision (x itself when softcap is None)."""
    if softcap is None:
        return x2
    wd = working_dtype(x2.dtype)
    return torch.tanh(x2.to(wd) / softcap).mul_(softcap)


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
    w = weight.to(wd) if weight is not None else None
    W = w.sum() if w is not None else float(C)
    eps = label_smoothing
    for sl in iter_row_blocks(lead, C):
        x2 = capped(as_rows(xv[sl]), softcap)
        t = target[sl].reshape(-1, 1)
        valid = t != ignore_index
        t_safe = torch.where(valid, t, torch.zeros_like(t))
        s = row_stats(x2, None, False)
        d = d_full(s)
        d_t = d.gather(1, t_safe)
        nll = s.L - d_t  # L >= 0 and -d_t >= 0: no cancellation
        w_t = w[t_safe] if w is not None else torch.ones_like(nll)
        w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
        row = (1.0 - eps) * w_t * nll if eps != 1.0 else torch.zeros_like(nll)
        if eps > 0.0:
            # sum_j w_j (L - d_j) = L W - sum_j w_j d_j: both terms >= 0 for non-negative weights.
            wd_sum = (d @ w).unsqueeze(1) if w is not None else d.sum(dim=1, keepdim=True)
            smooth = s.L * W - wd_sum
            row = row + torch.where(valid, (eps / C) * smooth, torch.zeros_like(smooth))
        l_row = lse_of(s)
        if z_loss != 0.0:
            row = row + torch.where(valid, z_loss * l_row * l_row, torch.zeros_like(l_row))
        loss[sl] = row.view(loss[sl].shape)
        lse[sl] = l_row.view(lse[sl].shape)
        wt[sl] = w_t.view(wt[sl].shape)
    return loss, lse, wt


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
    wd = working_dtype(xv.dtype)
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx
    w = weight.to(wd) if weight is not None else None
    W = w.sum() if w is not None else float(C)
    eps = label_smoothing
    for sl in iter_row_blocks(lead, C):
        xr = as_rows(xv[sl])
        x2 = capped(xr, softcap)
        t = target[sl].reshape(-1, 1)
        g2 = g[sl].reshape(-1, 1).to(wd)
        valid = t != ignore_index
        t_safe = torch.where(valid, t, torch.zeros_like(t))
        s = row_stats(x2, None, False)
        d = d_full(s)
        L = s.L
        p = torch.exp(d - L)
        w_t = w[t_safe] if w is not None else torch.ones_like(L)
        w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
        hard = (1.0 - eps) * w_t
        c1 = hard + (eps / C) * W
        if z_loss != 0.0:
            c1 = c1 + 2.0 * z_loss * lse_of(s)
        c1 = torch.where(valid, c1, torch.zeros_like(c1))
        # At the target: c1 p_t - hard = hard (p_t - 1) + (c1 - hard) p_t, with p_t - 1 = expm1(d_t - L).
        d_t = d.gather(1, t_safe)
        p_t = p.gather(1, t_safe)
        at_t = hard * torch.expm1(d_t - L) + (c1 - hard) * p_t
        if eps > 0.0:
            at_t = at_t - (eps / C) * (w[t_safe] if w is not None else 1.0)
        res = p.mul_(c1)
        if eps > 0.0:
            res = res - (eps / C) * (w if w is not None else 1.0) * valid.to(wd)
        res.scatter_(1, t_safe, torch.where(valid, at_t, res.gather(1, t_safe)))
        res.mul_(g2)
        if softcap is not None:
            # d/dx [c tanh(x/c)] = 1 - tanh^2(x/c) = 1 - (capped/c)^2
            res.mul_(1.0 - (x2 / softcap) ** 2)
        dst = dx[sl]
        dst.copy_(res.view(dst.shape))
    return dx


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
    w = weight.to(wd) if weight is not None else None
    for sl in iter_row_blocks(lead, C):
        x2 = capped(as_rows(xv[sl]), softcap)
        y = _smoothed(as_rows(target[sl]).to(wd), label_smoothing, C)
        wy = y * w if w is not None else y
        s = row_stats(x2, None, False)
        d = d_full(s)
        # sum_j w_j y_j (L - d_j) = L sum(w y) - sum(w y d): both terms >= 0 for y, w >= 0.
        row = s.L * wy.sum(dim=1, keepdim=True) - (wy * d).sum(dim=1, keepdim=True)
        l_row = lse_of(s)
        if z_loss != 0.0:
            row = row + z_loss * l_row * l_row
        loss[sl] = row.view(loss[sl].shape)
        lse[sl] = l_row.view(lse[sl].shape)
    return loss, lse


def _smoothed(y: Tensor, eps: float, C: int) -> Tensor:
    return y * (1.0 - eps) + eps / C if eps > 0.0 else y


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
    """Gradients for class-probability targets: dx = g (sum(w y) p - w y) (+ z term), dy = -g (1-eps) w log p."""
    lead, C = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    dy = torch.empty(target.shape, dtype=target.dtype, device=xv.device) if need_target_grad else None
    if dx.numel() == 0:
        return dx, dy
    w = weight.to(wd) if weight is not None else None
    for sl in iter_row_blocks(lead, C):
        x2 = capped(as_rows(xv[sl]), softcap)
        g2 = g[sl].reshape(-1, 1).to(wd)
        y = _smoothed(as_rows(target[sl]).to(wd), label_smoothing, C)
        wy = y * w if w is not None else y
        s = row_stats(x2, None, False)
        logp = d_full(s) - s.L
        p = torch.exp(logp)
        c1 = wy.sum(dim=1, keepdim=True)
        if z_loss != 0.0:
            c1 = c1 + 2.0 * z_loss * lse_of(s)
        res = (p * c1 - wy).mul_(g2)
        if softcap is not None:
            res.mul_(1.0 - (x2 / softcap) ** 2)
        dst = dx[sl]
        dst.copy_(res.view(dst.shape))
        if dy is not None:
            gy = -logp * g2 * (1.0 - label_smoothing)
            if w is not None:
                gy = gy * w
            dyd = dy[sl]
            dyd.copy_(gy.view(dyd.shape))
    return dx, dy


def selective_rows(xv: Tensor, index: Tensor) -> Tensor:
    """log_softmax(x).gather(-1, index) for (*lead, V) ``xv`` and (*lead, K) ``index``; working precision."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    out = torch.empty(index.shape, dtype=wd, device=xv.device)
    if out.numel() == 0:
        return out
    for sl in iter_row_blocks(lead, V):
        x2 = as_rows(xv[sl])
        i2 = index[sl].reshape(x2.shape[0], -1)
        s = row_stats(x2, None, False)
        res = s.d_hi.gather(1, i2) - s.L
        if s.d_lo is not None:
            res = res + s.d_lo.gather(1, i2)
        dst = out[sl]
        dst.copy_(res.view(dst.shape))
    return out


def selective_grad(xv: Tensor, index: Tensor, g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dx = scatter_add(g at index) - p * sum(g)."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx
    for sl in iter_row_blocks(lead, V):
        x2 = as_rows(xv[sl])
        i2 = index[sl].reshape(x2.shape[0], -1)
        g2 = g[sl].reshape(x2.shape[0], -1).to(wd)
        s = row_stats(x2, None, False)
        p = torch.exp(d_full(s) - s.L)
        res = p.mul_(-g2.sum(dim=1, keepdim=True)).scatter_add_(1, i2, g2)
        dst = dx[sl]
        dst.copy_(res.view(dst.shape))
    return dx


def entropy_rows(xv: Tensor) -> Tensor:
    """H = -sum p log p = L + sum p |d| (two non-negative terms) per row, working precision."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    wd = working_dtype(xv.dtype)
    out = torch.empty(lead, dtype=wd, device=xv.device)
    if V == 0:
        return out.fill_(0.0)
    for sl in iter_row_blocks(lead, V):
        s = row_stats(as_rows(xv[sl]), None, False)
        d = d_full(s)
        p = torch.exp(d - s.L)
        # p * d is 0 * -inf = NaN for -inf logits; their contribution is 0.
        pd = torch.where(p > 0, p * d, torch.zeros_like(p))
        h = s.L - pd.sum(dim=1, keepdim=True)
        dst = out[sl]
        dst.copy_(h.view(dst.shape))
    return out


def entropy_grad(xv: Tensor, g: Tensor, out_dtype: torch.dtype) -> Tensor:
    """dH/dx_j = -p_j (log p_j + H)."""
    lead, V = tuple(xv.shape[:-1]), xv.shape[-1]
    dx = torch.empty(xv.shape, dtype=out_dtype, device=xv.device)
    if dx.numel() == 0:
        return dx
    wd = working_dtype(xv.dtype)
    for sl in iter_row_blocks(lead, V):
        s = row_stats(as_rows(xv[sl]), None, False)
        logp = d_full(s) - s.L
        p = torch.exp(logp)
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        H = -plogp.sum(dim=1, keepdim=True)
        res = (plogp + p * H).neg_().mul_(g[sl].reshape(-1, 1).to(wd))
        dst = dx[sl]
        dst.copy_(res.view(dst.shape))
    return dx

