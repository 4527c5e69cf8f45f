"""autograd.Functions for cross-entropy, selective log-softmax and entropy.

Inputs arrive with the class dimension last (``xv``, a view); gradients are returned in that shape.
Forward keeps per-row fp32 statistics only; backward recomputes p block by block (reference path).
Double backward (autograd asks for a graph of the backward) re-derives the gradient from a
differentiable composite of the same math, so second derivatives are exact, never silently zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import losses as ref
from ..reference.plain import working_dtype
from .softmax import SoftmaxFunction

_REDUCTIONS = ("none", "mean", "sum")


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are fp32 for half inputs (NUMERICS.md), the input dtype otherwise."""
    return working_dtype(dtype)


def _reduce(per_row: Tensor, denom: Tensor | None, reduction: str) -> Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / denom


def _row_grad(g: Tensor, lead: torch.Size, denom: Tensor | None, reduction: str, valid: Tensor | None):
    """Upstream gradient per row: g itself ('none'), broadcast ('sum'), g / denom on counted rows ('mean')."""
    if reduction == "none":
        return g
    g = g.expand(lead)
    if reduction == "mean":
        g = g / denom
        if valid is not None:  # an all-ignored batch has denom 0: its rows get 0, not NaN
            g = torch.where(valid, g, torch.zeros_like(g))
    return g


def _log_softmax(xv: Tensor, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Differentiable (log_softmax, capped logits) of the last dim, for the double-backward composite."""
    xc = xv if softcap is None else torch.tanh(xv.to(working_dtype(xv.dtype)) / softcap) * softcap
    return SoftmaxFunction.apply(xc, -1, None, True, False).to(working_dtype(xv.dtype)), xc


class CrossEntropyFunction(torch.autograd.Function):
    """Class-index targets. Returns (loss reduced as asked, per-row lse); lse is not differentiable."""

    @staticmethod
    def forward(ctx, xv, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
        loss_rows, lse, wt = ref.ce_rows(xv, target, weight, ignore_index, label_smoothing, z_loss, softcap)
        denom = wt.sum() if reduction == "mean" else None
        ctx.opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        ctx.save_for_backward(xv, target, weight, denom)
        ctx.mark_non_differentiable(lse)
        out_dtype = loss_dtype(xv.dtype)
        return _reduce(loss_rows, denom, reduction).to(out_dtype), lse.to(out_dtype)

    @staticmethod
    def backward(ctx, g, _g_lse):
        xv, target, weight, denom = ctx.saved_tensors
        ignore_index, reduction, eps, z_loss, softcap = ctx.opts
        valid = target != ignore_index
        if torch.is_grad_enabled():
            return (_ce_double_backward(xv, target, weight, denom, ctx.opts, g, valid),) + (None,) * 7
        gr = _row_grad(g, target.shape, denom, reduction, valid)
        dx = ref.ce_grad(xv, target, weight, ignore_index, eps, z_loss, softcap, gr, xv.dtype)
        return (dx,) + (None,) * 7


def _ce_double_backward(xv, target, weight, denom, opts, g, valid):
    ignore_index, reduction, eps, z_loss, softcap = opts
    with torch.enable_grad():
        logp, _ = _log_softmax(xv, softcap)
        C = xv.shape[-1]
        t_safe = torch.where(valid, target, torch.zeros_like(target))
        w = weight.to(logp.dtype) if weight is not None else torch.ones(C, dtype=logp.dtype, device=xv.device)
        w_t = torch.where(valid, w[t_safe], torch.zeros_like(w[t_safe]))
        rows = -(1.0 - eps) * w_t * logp.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
        if eps > 0.0:
            rows = rows - torch.where(valid, (eps / C) * (logp * w).sum(-1), torch.zeros_like(rows))
        if z_loss != 0.0:
            xc = xv if softcap is None else torch.tanh(xv.to(logp.dtype) / softcap) * softcap
            lse_row = torch.logsumexp(xc.to(logp.dtype), -1)
            rows = rows + torch.where(valid, z_loss * lse_row * lse_row, torch.zeros_like(rows))
        gr = _row_grad(g, target.shape, denom, reduction, valid)
        (dx,) = torch.autograd.grad(rows, xv, gr.to(rows.dtype), create_graph=True)
    return dx


class CrossEntropyProbFunction(torch.autograd.Function):
    """Class-probability targets (same shape as ``xv``); differentiable in ``xv`` and ``target``."""

    @staticmethod
    def forward(ctx, xv, target, weight, reduction, label_smoothing, z_loss, softcap):
        loss_rows, lse = ref.ce_prob_rows(xv, target, weight, label_smoothing, z_loss, softcap)
        rows = loss_rows.numel()
        ctx.opts = (reduction, label_smoothing, z_loss, softcap, rows)
        ctx.save_for_backward(xv, target, weight)
        ctx.mark_non_differentiable(lse)
        out_dtype = loss_dtype(xv.dtype)
        denom = torch.tensor(float(rows), dtype=loss_rows.dtype, device=xv.device)
        return _reduce(loss_rows, denom, reduction).to(out_dtype), lse.to(out_dtype)

    @staticmethod
    def backward(ctx, g, _g_lse):
        xv, target, weight = ctx.saved_tensors
        reduction, eps, z_loss, softcap, rows = ctx.opts
        if torch.is_grad_enabled():
            with torch.enable_grad():
                logp, xc = _log_softmax(xv, softcap)
                C = xv.shape[-1]
                y = target.to(logp.dtype)
                y = y * (1.0 - eps) + eps / C if eps > 0.0 else y
                wy = y * weight.to(logp.dtype) if weight is not None else y
                per = -(wy * logp).sum(-1)
                if z_loss != 0.0:
                    lse_row = torch.logsumexp(xc.to(logp.dtype), -1)
                    per = per + z_loss * lse_row * lse_row
                gr = _row_grad(g, per.shape, float(rows), reduction, None)
                wrt = [t for t in (xv, target) if t.requires_grad]
                grads = torch.autograd.grad(per, wrt, gr.to(per.dtype), create_graph=True)
            it = iter(grads)
            dx = next(it) if xv.requires_grad else None
            dy = next(it) if target.requires_grad else None
            return dx, dy, None, None, None, None, None
        gr = _row_grad(g, xv.shape[:-1], float(rows), reduction, None)
        dx, dy = ref.ce_prob_grad(
            xv, target, weight, eps, z_loss, softcap, gr, xv.dtype, ctx.needs_input_grad[1]
        )
        return dx, dy, None, None, None, None, None


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """log_softmax(x, -1).gather(-1, index) without the full log-softmax; output in the input dtype."""

    @staticmethod
    def forward(ctx, xv, index):
        out = ref.selective_rows(xv, index)
        ctx.save_for_backward(xv, index)
        return out.to(xv.dtype)

    @staticmethod
    def backward(ctx, g):
        xv, index = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                logp, _ = _log_softmax(xv, None)
                (dx,) = torch.autograd.grad(logp.gather(-1, index), xv, g.to(logp.dtype), create_graph=True)
            return dx, None
        return ref.selective_grad(xv, index, g, xv.dtype), None


class EntropyFunction(torch.autograd.Function):
    """Shannon entropy of softmax(x) along the last dim; fp32 for half inputs."""

    @staticmethod
    def forward(ctx, xv):
        h = ref.entropy_rows(xv)
        ctx.save_for_backward(xv)
        return h.to(loss_dtype(xv.dtype))

    @staticmethod
    def backward(ctx, g):
        (xv,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                logp, _ = _log_softmax(xv, None)
                p = torch.exp(logp)
                h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
                (dx,) = torch.autograd.grad(h, xv, g.to(h.dtype), create_graph=True)
            return dx
        return ref.entropy_grad(xv, g, xv.dtype)
