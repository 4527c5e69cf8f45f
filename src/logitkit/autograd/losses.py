"""autograd.Functions for cross-entropy, selective log-softmax and entropy.

Inputs arrive with the class dimension last (``xv``, a view); gradients are returned in that shape.
Reference path: forward keeps per-row fp32 statistics only; backward recomputes p block by block.
Triton path (``use_triton``, fp16/bf16/fp32 inputs; float64 stays on the reference path):
  * reduction mean/sum with an input that requires grad: the kernel forms the gradient during the forward
    (logits read once, gradient written once; the mean's denominator is a device tensor read by the kernel);
    backward hands that buffer over and scales it in place by grad_output on the device (free at 1.0).
    ``inplace_backward=True`` writes the gradient over the logits' storage (they are consumed).
  * reduction 'none', a second backward (retain_graph) and no fused buffer: recompute from the saved logits.
Double backward (autograd asks for a graph of the backward) re-derives the gradient from a
differentiable composite of the same math, so second derivatives are exact, never silently zero.
A backward that would need logits consumed by ``inplace_backward=True`` raises instead of returning garbage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import losses as ref
from ..reference.composite import capped as capped_diff
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


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton():
    # The launchers of triton/cross_entropy.py behind their torch.library ops (one node each for torch.compile).
    from .._library import cross_entropy_ops

    return cross_entropy_ops


def _kernel_ok(use_triton: bool, xv: Tensor) -> bool:
    """Whether the kernels take this call: asked for, a kernel dtype, and not empty (an empty input has nothing
    to launch over, and the reference path already gives NUMERICS.md's empty-tensor results)."""
    return bool(use_triton) and xv.dtype in _KERNEL_DTYPES and xv.numel() > 0


def _as_rows(xv: Tensor) -> Tensor:
    """(M, V) view of (*lead, V) with unit column stride (a copy only when the layout needs one)."""
    x2 = xv.reshape(-1, xv.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


_CONSUMED = (
    "cross_entropy(..., inplace_backward=True) wrote the gradient over the logits: it can be taken once, "
    "without create_graph; call it with inplace_backward=False for retain_graph or double backward"
)


def _log_softmax(xv: Tensor, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Differentiable (log_softmax, capped logits) of the last dim, for the double-backward composite."""
    xc = capped_diff(xv, softcap)
    return SoftmaxFunction.apply(xc, -1, None, True, False).to(working_dtype(xv.dtype)), xc


def _kernel_forward_tail(ctx, xv, target, weight, denom, fused, dx, inplace_backward, loss_rows, lse, ent, lead,
                         reduction, with_entropy):
    """Shared end of the kernel forwards: keep the fused gradient, save for backward, reduce the rows."""
    if fused:
        ctx.fused_dx = dx
        ctx.consumed = bool(inplace_backward)
    ctx.save_for_backward(None if ctx.consumed else xv, target, weight, denom)
    ctx.shape = xv.shape
    ctx.mark_non_differentiable(lse, ent)
    if reduction == "none":
        loss = loss_rows.view(lead)
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = (loss_rows.sum() / denom).reshape(())
    return loss, lse.view(lead), ent.view(lead) if with_entropy else ent


class CrossEntropyFunction(torch.autograd.Function):
    """Class-index targets. Returns (loss reduced as asked, per-row lse, per-row entropy or an empty tensor);
    lse and entropy are not differentiable."""

    @staticmethod
    def forward(ctx, xv, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                use_triton=False, inplace_backward=False, with_entropy=False):
        ctx.opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        ctx.kernel = _kernel_ok(use_triton, xv)
        ctx.fused_dx, ctx.consumed = None, False
        out_dtype = loss_dtype(xv.dtype)
        if not ctx.kernel:
            if _ref_fused_ok(ctx, xv, reduction):
                # CPU: form the gradient in the same pass (logits read once); backward scales it by g.
                wt = ref.target_weights(target, weight, ignore_index, out_dtype)
                denom = ref.mean_denom(wt.sum(), label_smoothing) if reduction == "mean" else None
                scale = _row_grad(torch.ones((), dtype=out_dtype), target.shape, denom, reduction,
                                  target != ignore_index)
                loss_rows, lse, dx = ref.ce_fused(xv, target, weight, ignore_index, label_smoothing, z_loss,
                                                  softcap, scale, xv.dtype)
                ctx.fused_dx = dx
            else:
                loss_rows, lse, wt = ref.ce_rows(xv, target, weight, ignore_index, label_smoothing, z_loss,
                                                 softcap)
                denom = ref.mean_denom(wt.sum(), label_smoothing) if reduction == "mean" else None
            ent = ref.entropy_rows(ref.capped(xv, softcap)) if with_entropy else xv.new_empty(0, dtype=out_dtype)
            ctx.save_for_backward(xv, target, weight, denom)
            ctx.mark_non_differentiable(lse, ent)
            return _reduce(loss_rows, denom, reduction).to(out_dtype), lse.to(out_dtype), ent.to(out_dtype)
        lead = xv.shape[:-1]
        k = _triton()
        x2, t2 = _as_rows(xv), target.reshape(-1).contiguous()
        M = x2.shape[0]
        denom = None
        if reduction == "mean":  # sum of the counted rows' weights, on the device (no .item())
            denom = ref.mean_denom(ref.target_weights(t2, weight, ignore_index, torch.float32).sum().reshape(1),
                                   label_smoothing)
        fused = reduction != "none" and ctx.needs_input_grad[0] and M > 0
        loss_rows, lse, ent, dx = k.ce_fwd(x2, t2, weight=weight, denom=denom, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                           with_grad=fused, with_entropy=with_entropy, inplace=inplace_backward)
        # Logits overwritten by the gradient are not saved (nothing to recompute from).  The input itself is
        # saved (not the (M, V) view) so that double backward can differentiate through it.
        return _kernel_forward_tail(ctx, xv, t2, weight, denom, fused, dx, inplace_backward, loss_rows, lse, ent,
                                    lead, reduction, with_entropy)

    @staticmethod
    def backward(ctx, g, _g_lse, _g_ent):
        nones = (None,) * 10
        if ctx.kernel:
            return (_ce_kernel_backward(ctx, g),) + nones
        # the forward-formed gradient first, without unpacking the saved logits: as torch (whose log_softmax
        # saves its output), the logits may be changed in place after the loss when only this backward needs them
        if not torch.is_grad_enabled():
            dx = _take_ref_fused(ctx, g)
            if dx is not None:
                return (dx,) + nones
        xv, target, weight, denom = ctx.saved_tensors
        ignore_index, reduction, eps, z_loss, softcap = ctx.opts
        valid = target != ignore_index
        if torch.is_grad_enabled():
            return (_ce_double_backward(xv, target, weight, denom, ctx.opts, g, valid),) + nones
        gr = _row_grad(g, target.shape, denom, reduction, valid)
        dx = ref.ce_grad(xv, target, weight, ignore_index, eps, z_loss, softcap, gr, xv.dtype)
        return (dx,) + nones


def _ref_fused_ok(ctx, xv: Tensor, reduction: str) -> bool:
    """Reference path: form the gradient in forward for a reduced loss of CPU logits that require grad."""
    return reduction != "none" and ctx.needs_input_grad[0] and xv.device.type == "cpu" and xv.numel() > 0


def _take_ref_fused(ctx, g: Tensor) -> Tensor | None:
    """The reference path's forward-formed gradient scaled by g (a 0-d tensor), once; None: recompute."""
    dx, ctx.fused_dx = ctx.fused_dx, None
    if dx is None:
        return None
    if torch.compiler.is_compiling():
        return dx.mul_(g.to(dx.dtype))
    gv = float(g)  # a CPU scalar: reading it is no device sync; as a Python float it scales in fp32 opmath
    return dx if gv == 1.0 else dx.mul_(gv)


def _take_fused(ctx, g: Tensor, k) -> Tensor | None:
    """The gradient formed in forward, scaled by g on the device, or None when backward must recompute.

    Handed over without a copy (autograd may keep it as .grad); a second backward (retain_graph) finds None
    and recomputes, unless the logits were consumed by ``inplace_backward``.
    """
    if ctx.fused_dx is not None and not torch.is_grad_enabled():
        dx, ctx.fused_dx = ctx.fused_dx, None
        k.grad_scale_(dx, g.reshape(1).float())
        return dx.view(ctx.shape)
    if ctx.consumed:
        raise RuntimeError(_CONSUMED)
    return None


def _ce_kernel_backward(ctx, g: Tensor) -> Tensor:
    k = _triton()
    dx = _take_fused(ctx, g, k)  # before unpacking the saved logits (see CrossEntropyFunction.backward)
    if dx is not None:
        return dx
    xv, t2, weight, denom = ctx.saved_tensors
    ignore_index, reduction, eps, z_loss, softcap = ctx.opts
    if torch.is_grad_enabled():
        t = t2.view(ctx.shape[:-1])
        return _ce_double_backward(xv, t, weight, None if denom is None else denom.reshape(()), ctx.opts, g,
                                   t != ignore_index)
    gs = g.reshape(-1).float().contiguous() if reduction == "none" else g.reshape(1).float()
    dx = k.ce_bwd(_as_rows(xv), t2, gs, weight=weight, ignore_index=ignore_index, label_smoothing=eps, z_loss=z_loss,
                  softcap=softcap, denom=denom)
    return dx.view(ctx.shape)


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
            xc = capped_diff(xv, softcap)
            lse_row = torch.logsumexp(xc.to(logp.dtype), -1)
            rows = rows + torch.where(valid, z_loss * lse_row * lse_row, torch.zeros_like(rows))
        gr = _row_grad(g, target.shape, denom, reduction, valid)
        (dx,) = torch.autograd.grad(rows, xv, gr.to(rows.dtype), create_graph=True)
    return dx


class CrossEntropyProbFunction(torch.autograd.Function):
    """Class-probability targets (same shape as ``xv``); differentiable in ``xv`` and ``target``.

    Returns (loss, per-row lse, per-row entropy or an empty tensor).  A target that requires grad keeps the
    reference path (its gradient -(1 - eps) w log p is another (M, V) tensor; rare in practice).
    """

    @staticmethod
    def forward(ctx, xv, target, weight, reduction, label_smoothing, z_loss, softcap,
                use_triton=False, inplace_backward=False, with_entropy=False):
        rows = xv.shape[:-1].numel()
        ctx.opts = (reduction, label_smoothing, z_loss, softcap, rows)
        ctx.kernel = _kernel_ok(use_triton, xv) and not ctx.needs_input_grad[1]
        ctx.fused_dx, ctx.consumed = None, False
        out_dtype = loss_dtype(xv.dtype)
        if not ctx.kernel:
            loss_rows, lse = ref.ce_prob_rows(xv, target, weight, label_smoothing, z_loss, softcap)
            if _ref_fused_ok(ctx, xv, reduction) and not ctx.needs_input_grad[1]:
                # CPU: the gradient now, so backward only scales it (as the class-index path; one more pass
                # here, one fewer there, and the logits may change in place before backward, as with torch)
                one = torch.ones((), dtype=loss_rows.dtype, device=xv.device)
                scale = _row_grad(one, xv.shape[:-1], float(rows), reduction, None)
                ctx.fused_dx, _ = ref.ce_prob_grad(xv, target, weight, label_smoothing, z_loss, softcap, scale,
                                                   xv.dtype, False)
            ctx.save_for_backward(xv, target, weight)
            ent = ref.entropy_rows(ref.capped(xv, softcap)) if with_entropy else xv.new_empty(0, dtype=out_dtype)
            ctx.mark_non_differentiable(lse, ent)
            denom = torch.tensor(float(rows), dtype=loss_rows.dtype, device=xv.device)
            return _reduce(loss_rows, denom, reduction).to(out_dtype), lse.to(out_dtype), ent.to(out_dtype)
        lead = xv.shape[:-1]
        k = _triton()
        x2, y2 = _as_rows(xv), _as_rows(target)
        M = x2.shape[0]
        f32 = dict(dtype=torch.float32, device=xv.device)
        denom = torch.full((1,), float(M), **f32) if reduction == "mean" else None
        fused = reduction != "none" and ctx.needs_input_grad[0] and M > 0
        loss_rows, lse, ent, dx = k.ce_prob_fwd(x2, y2, weight=weight, denom=denom, label_smoothing=label_smoothing,
                                                z_loss=z_loss, softcap=softcap, with_grad=fused,
                                                with_entropy=with_entropy, inplace=inplace_backward)
        return _kernel_forward_tail(ctx, xv, target, weight, denom, fused, dx, inplace_backward, loss_rows, lse, ent,
                                    lead, reduction, with_entropy)

    @staticmethod
    def backward(ctx, g, _g_lse, _g_ent):
        nones = (None,) * 8
        if ctx.kernel:
            return (_ce_prob_kernel_backward(ctx, g), None) + nones
        if not torch.is_grad_enabled():  # the forward-formed gradient, without unpacking the saved logits
            dx = _take_ref_fused(ctx, g)
            if dx is not None:
                return (dx, None) + nones
        xv, target, weight = ctx.saved_tensors
        return _ce_prob_ref_backward(ctx, xv, target, weight, g) + nones


def _ce_prob_kernel_backward(ctx, g: Tensor) -> Tensor:
    k = _triton()
    dx = _take_fused(ctx, g, k)  # before unpacking the saved logits (see CrossEntropyFunction.backward)
    if dx is not None:
        return dx
    xv, target, weight, denom = ctx.saved_tensors
    reduction, eps, z_loss, softcap, rows = ctx.opts
    if torch.is_grad_enabled():
        dx, _ = _ce_prob_ref_backward(ctx, xv, target, weight, g)
        return dx
    gs = g.reshape(-1).float().contiguous() if reduction == "none" else g.reshape(1).float()
    dx = k.ce_prob_bwd(_as_rows(xv), _as_rows(target), gs, weight=weight, label_smoothing=eps, z_loss=z_loss,
                       softcap=softcap, denom=denom)
    return dx.view(ctx.shape)


def _ce_prob_ref_backward(ctx, xv, target, weight, g):
    reduction, eps, z_loss, softcap, rows = ctx.opts
    need_dx = ctx.needs_input_grad[0]
    need_dy = ctx.needs_input_grad[1]
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
            wrt = [t for t, need in ((xv, need_dx), (target, need_dy)) if need and t.requires_grad]
            grads = torch.autograd.grad(per, wrt, gr.to(per.dtype), create_graph=True, allow_unused=True)
        it = iter(grads)
        dx = next(it) if need_dx and xv.requires_grad else None
        dy = next(it) if need_dy and target.requires_grad else None
        return dx, dy
    gr = _row_grad(g, xv.shape[:-1], float(rows), reduction, None)
    dx, dy = ref.ce_prob_grad(xv, target, weight, eps, z_loss, softcap, gr, xv.dtype, need_dy)
    return dx, dy


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """log_softmax(x, -1).gather(-1, index) without the full log-softmax; output in the input dtype.

    Triton path: forward saves the per-row (max, rest) in fp32; backward reads the logits once and writes
    dx once (its gradient depends on grad_output, so it cannot be formed in the forward).
    """

    @staticmethod
    def forward(ctx, xv, index, use_triton=False):
        ctx.kernel = _kernel_ok(use_triton, xv)
        if not ctx.kernel:
            out = ref.selective_rows(xv, index)
            ctx.save_for_backward(xv, index)
            return out.to(xv.dtype)
        x2 = _as_rows(xv)
        i2 = index.reshape(x2.shape[0], -1)
        out, a, r = _triton().selective_fwd(x2, i2)
        ctx.save_for_backward(xv, index, a, r)
        ctx.shape, ctx.ishape = xv.shape, index.shape
        return out.view(index.shape).to(xv.dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.kernel:
            xv, index, a, r = ctx.saved_tensors
            if not torch.is_grad_enabled():
                x2 = _as_rows(xv)
                i2 = index.reshape(x2.shape[0], -1)
                dx = _triton().selective_bwd(x2, i2, g.reshape(i2.shape), a, r)
                return dx.view(ctx.shape), None, None
        else:
            xv, index = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                logp, _ = _log_softmax(xv, None)
                (dx,) = torch.autograd.grad(logp.gather(-1, index), xv, g.to(logp.dtype), create_graph=True)
            return dx, None, None
        return ref.selective_grad(xv, index, g, xv.dtype), None, None


class EntropyFunction(torch.autograd.Function):
    """Shannon entropy of softmax(x) along the last dim; fp32 for half inputs.

    Triton path: forward saves per-row (max, rest, H) in fp32; backward reads the logits once, writes dx once.
    """

    @staticmethod
    def forward(ctx, xv, use_triton=False):
        ctx.kernel = _kernel_ok(use_triton, xv)
        if not ctx.kernel:
            h = ref.entropy_rows(xv)
            ctx.save_for_backward(xv)
            return h.to(loss_dtype(xv.dtype))
        x2 = _as_rows(xv)
        h, a, r = _triton().entropy_fwd(x2)
        ctx.save_for_backward(xv, h, a, r)
        ctx.shape = xv.shape
        return h.view(xv.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        if ctx.kernel:
            xv, h, a, r = ctx.saved_tensors
            if not torch.is_grad_enabled():
                x2 = _as_rows(xv)
                dx = _triton().entropy_bwd(x2, g.reshape(-1).float(), h, a, r)
                return dx.view(ctx.shape), None
        else:
            (xv,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                logp, _ = _log_softmax(xv, None)
                p = torch.exp(logp)
                # 0 log 0 = 0 with a finite factor on both sides: where(p > 0, p * logp, 0) would send 0 * -inf
                # = NaN back through the product at -inf logits. A NaN row keeps p NaN, so h stays NaN.
                h = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
                (dx,) = torch.autograd.grad(h, xv, g.to(h.dtype), create_graph=True)
            return dx, None
        return ref.entropy_grad(xv, g, xv.dtype), None
