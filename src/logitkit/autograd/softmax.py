"""autograd.Functions for softmax, log_softmax and logsumexp, wiring the reference path and the kernels.

Each forward takes ``x`` with the reduced dimension ``dim`` anywhere, an optional boolean ``mask`` already
expanded to ``x.shape``, and ``use_triton``.  Backward formulas (NUMERICS.md), formed in fp32 or wider:
softmax dx = y (g - sum(g y)); log_softmax dx = g - exp(y) sum(g); lse dx = g exp(x - lse).
When autograd asks for a graph of the backward (double backward), the same formulas run as differentiable
torch ops on the saved tensors; otherwise the row-blocked reference code or the kernels run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..reference import plain


def _triton():
    # The launchers of triton/softmax.py behind their torch.library ops (one node each for torch.compile).
    from .._library import softmax_ops

    return softmax_ops


def _moved(t: Tensor | None, dim: int) -> Tensor | None:
    return None if t is None else t.movedim(dim, -1)


class SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, mask: Tensor | None, log: bool, use_triton: bool) -> Tensor:
        if use_triton:
            y = _triton().softmax_fwd(x, dim, mask=mask, log=log)
        else:
            y = torch.empty_like(x, memory_format=torch.contiguous_format)
            plain.normalize_fwd(x.movedim(dim, -1), _moved(mask, dim), log, y.movedim(dim, -1))
        ctx.dim, ctx.log, ctx.use_triton = dim, log, use_triton
        ctx.save_for_backward(y, mask)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        y, mask = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            wd = plain.working_dtype(y.dtype)
            yw, gw = y.to(wd), g.to(wd)
            if ctx.log:
                gin = gw if mask is None else gw.masked_fill(~mask, 0.0)  # masked outputs are constants
                dx = gw - torch.exp(yw) * gin.sum(dim, keepdim=True)
                if mask is not None:
                    empty = torch.isneginf(yw).all(dim, keepdim=True)  # nothing left in the row
                    dx = dx.masked_fill(~mask | empty, 0.0)
            else:
                dx = yw * (gw - (gw * yw).sum(dim, keepdim=True))
            return dx.to(y.dtype), None, None, None, None
        if ctx.use_triton:
            return _triton().softmax_bwd(y, g, dim, mask=mask, log=ctx.log), None, None, None, None
        dx = torch.empty_like(y, memory_format=torch.contiguous_format)
        yv, gv, dxv = y.movedim(dim, -1), g.movedim(dim, -1), dx.movedim(dim, -1)
        if ctx.log:
            plain.log_softmax_bwd(yv, gv, _moved(mask, dim), dxv)
        else:
            plain.softmax_bwd(yv, gv, dxv)
        return dx, None, None, None, None


class LogsumexpFunction(torch.autograd.Function):
    """lse over one dimension ``dim`` (callers flatten a tuple of dims into one first); output keeps dim.

    The working-precision lse (fp32 for half inputs) is what backward uses: a bf16-rounded lse would put a
    0.4% error into every exp(x - lse).
    """

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, mask: Tensor | None, use_triton: bool) -> Tensor:
        if use_triton:
            lse_w = _triton().logsumexp_fwd(x, dim, mask=mask)
        else:
            lse_w = plain.lse_fwd(x.movedim(dim, -1), _moved(mask, dim)).unsqueeze(dim)
        ctx.dim, ctx.use_triton = dim, use_triton
        ctx.save_for_backward(x, lse_w, mask)
        return lse_w.to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, lse_w, mask = ctx.saved_tensors
        dim = ctx.dim
        if torch.is_grad_enabled():
            # d lse / dx = softmax(x): differentiable again through SoftmaxFunction. Its special rows are the
            # first backward's: an all -inf row gives NaN without mask= (torch's exp(x - lse) = exp(-inf + inf)),
            # 0 with mask= (no mass), so create_graph=True does not change the gradient's value.
            p = SoftmaxFunction.apply(x, dim, mask, False, ctx.use_triton)
            # A +inf in the row (lse +inf): torch's exp(x - inf), 0 off the infinities, where softmax is a NaN row.
            xm = x if mask is None else x.masked_fill(~mask, -math.inf)
            p = torch.where(torch.isposinf(lse_w), torch.exp(xm.to(p.dtype) - math.inf), p)
            return (g * p).to(x.dtype), None, None, None
        if ctx.use_triton:
            return _triton().logsumexp_bwd(x, lse_w, g, dim, mask=mask), None, None, None
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        plain.lse_bwd(
            x.movedim(dim, -1), lse_w.squeeze(dim), g.squeeze(dim), _moved(mask, dim), dx.movedim(dim, -1)
        )
        return dx, None, None, None
