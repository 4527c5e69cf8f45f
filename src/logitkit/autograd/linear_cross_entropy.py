"""Linear cross-entropy: loss from hidden states (M, D) and a classifier weight (V, D), chunked over tokens.

Math:     logits_c = x_c W^T (+ b) for a chunk of T tokens; the loss rows and the gradient of the logits
          come from the cross-entropy rows of that chunk (reference path or fused kernel); then
          dx_c = dlogits_c W,  dW += dlogits_c^T x_c,  db += sum_rows dlogits_c.
Memory:   one (T, V) logits chunk and its gradient at a time, an fp32 dW accumulator (the gradient's own
          size) and per-token fp32 (loss, lse): O(T * V), never O(M * V).
One pass: for reduction 'mean'/'sum' with gradients wanted, the gradients are formed during forward (three
          matmuls per chunk, like the unfused graph) and backward only scales them by grad_output (and the
          mean's denominator, which stays on the device). reduction='none' (per-token upstream gradients),
          retain_graph and double backward recompute chunk by chunk in backward instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import losses as ref
from ..reference.plain import working_dtype

# Elements of one (T, V) logits chunk; T = max(1, CHUNK_ELEMS // V) tokens, at least the whole batch if smaller.
CHUNK_ELEMS = 1 << 22


def token_chunk(M: int, V: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, min(M, requested))
    return max(1, min(M, CHUNK_ELEMS // max(V, 1)))


def _logits(xc: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(xc, W, b)


class _Opts:
    __slots__ = ("weight", "ignore_index", "reduction", "eps", "z_loss", "softcap", "chunk", "prob", "entropy",
                 "use_triton")

    def __init__(self, weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy, use_triton):
        self.weight, self.ignore_index, self.reduction = weight, ignore_index, reduction
        self.eps, self.z_loss, self.softcap, self.chunk, self.prob = eps, z_loss, softcap, chunk, prob
        self.entropy = entropy
        # The fused kernel serves class-index targets in fp16/bf16/fp32; the rest takes the reference rows.
        self.use_triton = use_triton and not prob


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
    from ..triton.cross_entropy import ce_fwd_out

    ce_fwd_out(logits, tc, loss=loss, lse=lse, entropy=ent, dx=logits if want_grad else None, weight=o.weight,
               ignore_index=o.ignore_index, label_smoothing=o.eps, z_loss=o.z_loss, softcap=o.softcap,
               grad_scale=g_c)
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
    for s in range(0, M, o.chunk):
        e = min(M, s + o.chunk)
        xc, tc = x[s:e], target[s:e]
        logits = _logits(xc, W, b)
        if o.use_triton:
            dl = _chunk_fused(logits, tc, None if g_rows is None else g_rows[s:e], o, loss[s:e], lse[s:e],
                              ent[s:e] if ent.numel() else None, any_grad)
            valid = tc != o.ignore_index
            w_c = o.weight.to(wd)[torch.where(valid, tc, 0)] if o.weight is not None else torch.ones_like(lse[s:e])
            wt[s:e] = torch.where(valid, w_c, 0.0)
        else:
            rows, l_c, w_c = _chunk_rows(logits, tc, o)
            loss[s:e], lse[s:e], wt[s:e] = rows, l_c, w_c
            if ent.numel():
                ent[s:e] = ref.entropy_rows(ref.capped(logits, o.softcap))
            dl = None
            if any_grad:
                g_c = torch.ones(e - s, dtype=wd, device=x.device) if g_rows is None else g_rows[s:e]
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
        fused = any(need) and o.reduction in ("mean", "sum")
        loss, lse, wt, ent, dx, dW, db = _accumulate(x, W, b, target, None, o, need if fused else (False,) * 3)
        denom = wt.sum() if o.reduction == "mean" and not o.prob else torch.tensor(
            float(x.shape[0]), dtype=wt.dtype, device=x.device
        )
        if o.reduction == "none":
            out = loss
        elif o.reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        ctx.o, ctx.need, ctx.fused = o, need, fused
        ctx.save_for_backward(x, W, b, target, denom)
        ctx.grads = (dx, dW, db) if fused else None
        ctx.mark_non_differentiable(lse, ent)
        return out, lse, ent

    @staticmethod
    def backward(ctx, g: Tensor, _g_lse, _g_ent):
        x, W, b, target, denom = ctx.saved_tensors
        o = ctx.o
        if torch.is_grad_enabled():
            raise RuntimeError(
                "linear_cross_entropy does not support double backward (create_graph=True); "
                "use logitkit.cross_entropy(torch.nn.functional.linear(...), ...) for higher derivatives"
            )
        valid = None if o.prob else target != o.ignore_index
        if ctx.fused and ctx.grads is not None:
            # Gradients were formed in forward with unit upstream gradient; scale on the device.
            dx, dW, db = ctx.grads
            scale = g if o.reduction == "sum" else g / denom
            # An all-ignored batch has denom 0 and all-zero gradients: keep them 0, not NaN.
            scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
            out = (
                dx.mul_(scale.to(dx.dtype)) if dx is not None else None,
                dW.mul_(scale).to(W.dtype) if dW is not None else None,
                db.mul_(scale).to(b.dtype) if db is not None else None,
            )
            ctx.grads = None  # consumed: a second backward (retain_graph) recomputes below
            return out[0], out[1], out[2], None, None
        g_rows = _row_scale(o.reduction, g.to(working_dtype(x.dtype)), denom, valid, x.shape[0])
        _, _, _, _, dx, dW, db = _accumulate(x, W, b, target, g_rows, o, ctx.need)
        return (
            dx,
            dW.to(W.dtype) if dW is not None else None,
            db.to(b.dtype) if db is not None else None,
            None,
            None,
        )


def make_opts(weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy=False,
              use_triton=False) -> _Opts:
    return _Opts(weight, ignore_index, reduction, eps, z_loss, softcap, chunk, prob, entropy, use_triton)
