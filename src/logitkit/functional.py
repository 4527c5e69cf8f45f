"""The public API: torch.nn.functional's names, argument order and defaults; extensions keyword-only.

Each function validates (``_validate``), picks the backend (``_config``) and calls one autograd.Function;
while a torch.func transform is active it calls the composite path (``reference/composite.py``) instead,
which torch.func differentiates and vmaps natively (the Functions have no functorch rules).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import _config
from . import _validate as check
from .autograd.losses import (
    CrossEntropyFunction,
    CrossEntropyProbFunction,
    EntropyFunction,
    SelectiveLogSoftmaxFunction,
    loss_dtype,
)
from .autograd.softmax import LogsumexpFunction, SoftmaxFunction
from .reference import composite

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "cross_entropy_with_stats",
    "CrossEntropyStats",
    "nll_loss",
    "selective_log_softmax",
    "entropy",
]


def _normalize(name: str, input, dim, stacklevel: int, dtype, mask, log: bool) -> Tensor:
    check.tensor("input", input)
    if dim is None:
        dim = check.implicit_softmax_dim(name, input.dim(), stacklevel + 1)
    if dtype is None and _config.autocast_fp32(input):  # as torch's autocast: dtype=float32 on a GPU
        dtype = torch.float32
    x = check.float_input("input", input, dtype)
    d = check.dim(dim, x.dim())
    m = check.mask(mask, x)
    if _config.transforms_active(x):
        if x.dim() == 0:
            return composite.normalize(x.reshape(1), 0, None if m is None else m.reshape(1), log).reshape(())
        return composite.normalize(x, d, m, log)
    use_triton = _config.wants_triton(x.device.type)
    if x.dim() == 0:  # a single entry: softmax 1, log_softmax 0 (or NaN/-inf/... per the table)
        m1 = None if m is None else m.reshape(1)
        return SoftmaxFunction.apply(x.reshape(1), 0, m1, log, use_triton).reshape(())
    return SoftmaxFunction.apply(x, d, m, log, use_triton)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None,
            *, mask: Tensor | None = None) -> Tensor:
    """Softmax along ``dim``, as ``torch.nn.functional.softmax``.

    ``mask`` (keyword-only, boolean, broadcastable to ``input``): ``False`` entries are excluded; a row with
    nothing left gives zeros (and zero gradients) instead of NaN.
    """
    return _normalize("softmax", input, dim, _stacklevel, dtype, mask, log=False)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None,
                *, mask: Tensor | None = None) -> Tensor:
    """Log-softmax along ``dim`` as ``x - max - log1p(rest)``, exact for confident rows; see ``softmax``."""
    return _normalize("log_softmax", input, dim, _stacklevel, dtype, mask, log=True)


def logsumexp(input: Tensor, dim, keepdim: bool = False, *, out: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
    """``log(sum(exp(input)))`` over ``dim`` (an int or a tuple of ints), as ``torch.logsumexp``.

    Accumulates in float32 or wider (70,000 fp16 zeros give 11.16, not inf). Integer inputs are cast to the
    default float dtype, as torch does. ``out=`` as torch: a floating-point tensor on the input's device that
    receives the result (cast to its dtype, resized when its shape differs) and is returned; not
    differentiable, so neither ``input`` nor ``out`` may require grad while grad mode is on.
    """
    check.tensor("input", input)
    if out is None:
        return _logsumexp(input, dim, keepdim, mask)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"out must be a floating-point tensor, got {out.dtype}")
    if out.device != input.device:
        raise ValueError(f"out is on {out.device} but input is on {input.device}")
    if torch.is_grad_enabled() and (input.requires_grad or out.requires_grad):
        raise RuntimeError("logsumexp(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad.")
    res = _logsumexp(input, dim, keepdim, mask)
    if out.shape != res.shape:
        if out.numel() != 0:
            warnings.warn(f"out of shape {tuple(out.shape)} was resized to the result's shape "
                          f"{tuple(res.shape)}, as torch does (deprecated there for non-empty outputs)",
                          UserWarning, stacklevel=2)
        out.resize_(res.shape)
    return out.copy_(res)


def _logsumexp(input: Tensor, dim, keepdim: bool, mask: Tensor | None) -> Tensor:
    if input.is_complex():  # torch's complex logsumexp (the rest-sum scheme is for real logits)
        if mask is not None:
            raise TypeError("logsumexp with mask= needs a real floating-point input, got a complex one")
        return torch.logsumexp(input, dim, keepdim)
    x = input if input.dtype.is_floating_point else input.to(torch.get_default_dtype())
    if _config.autocast_fp32(x):  # as torch's autocast on a GPU: logsumexp of the float32 cast
        x = x.float()
    dims = check.dims(dim, x.dim()) if not (isinstance(dim, (tuple, list)) and len(dim) == 0) else tuple(
        range(x.dim())
    )
    m = check.mask(mask, x)
    transformed = _config.transforms_active(x)
    use_triton = not transformed and _config.wants_triton(x.device.type)

    def one_dim(x: Tensor, d: int, m: Tensor | None) -> Tensor:  # lse over one dim, kept as size 1
        return composite.lse(x, d, m) if transformed else LogsumexpFunction.apply(x, d, m, use_triton)

    if x.dim() == 0:
        m1 = None if m is None else m.reshape(1)
        return one_dim(x.reshape(1), 0, m1).reshape(())
    if len(dims) == 1:
        (d,) = dims
        out = one_dim(x, d, m)
        return out if keepdim else out.squeeze(d)
    # Several dims: move them last and flatten them into one reduced dimension.
    kept = [i for i in range(x.dim()) if i not in dims]
    perm = kept + list(dims)
    xr = x.permute(perm).reshape(*[x.shape[i] for i in kept], math.prod([x.shape[i] for i in dims]))
    mr = None if m is None else m.permute(perm).reshape(xr.shape)
    out = one_dim(xr, xr.dim() - 1, mr).squeeze(-1)
    if keepdim:
        for d in sorted(dims):
            out = out.unsqueeze(d)
    return out


def _loss_common(input: Tensor, target: Tensor, weight, size_average, reduce, reduction):
    check.tensor("input", input)
    check.tensor("target", target)
    x = check.float_input("input", input, None)
    cdim = check.loss_input("input", x)
    C = x.shape[cdim]
    w = check.class_weight(weight, C, x)
    red = check.reduction(reduction, size_average, reduce)
    return x, cdim, C, w, red


class CrossEntropyStats(NamedTuple):
    """``cross_entropy_with_stats``' result: the loss (reduced as asked, differentiable) and per-row fp32
    ``lse`` and ``entropy`` (nats) of the (softcapped) logits' distribution, shaped like the target rows
    and not differentiable (use :func:`entropy` for an entropy with a gradient)."""

    loss: Tensor
    lse: Tensor
    entropy: Tensor


def _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                   z_loss, softcap, inplace_backward, with_entropy):
    x, cdim, C, w, red = _loss_common(input, target, weight, size_average, reduce, reduction)
    ignore_index = check.ignore_index(ignore_index)
    eps = check.label_smoothing(label_smoothing)
    z = check.nonneg_float("z_loss", z_loss)
    cap = check.softcap(softcap)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if C == 0:
        raise ValueError("input must have at least one class (C >= 1)")
    check.weight_without_grad(w, "cross_entropy")
    prob = target.dtype.is_floating_point
    if prob:
        check.prob_target(x, target)
        check.no_ignore_index_for_probs(ignore_index)
        wide = torch.promote_types(loss_dtype(x.dtype), target.dtype)
        if wide != loss_dtype(x.dtype):  # float64 probabilities: a float64 loss, as torch (computed in float64)
            x = x.to(wide)
    else:
        check.integer_target(target)
        target = check.class_target_shape(x, target, cdim)
        check.target_range(target, C, ignore_index)
    xv = x.movedim(cdim, -1)
    if _config.transforms_active(x, target):  # inplace_backward has no effect here (nothing is formed in forward)
        if prob:
            return composite.ce_prob(xv, target.movedim(cdim, -1), w, red, eps, z, cap, with_entropy)
        return composite.ce_index(xv, target.long(), w, ignore_index, red, eps, z, cap, with_entropy)
    use_triton = _config.wants_triton(x.device.type)
    if prob:
        return CrossEntropyProbFunction.apply(xv, target.movedim(cdim, -1), w, red, eps, z, cap, use_triton,
                                              inplace_backward, with_entropy)
    return CrossEntropyFunction.apply(xv, target.long(), w, ignore_index, red, eps, z, cap, use_triton,
                                      inplace_backward, with_entropy)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: float | None = None, inplace_backward: bool = False) -> Tensor:
    """Cross-entropy from logits, as ``torch.nn.functional.cross_entropy``.

    ``input`` is (C,), (N, C) or (N, C, d1, ...); ``target`` holds class indices (shape without C) or class
    probabilities (the input's shape). Loss ``lse - x[target]`` with ``lse = max + log1p(rest)``: a
    confident row's loss is 2e-9, not 0, and its gradient sums to zero.

    Returns float32 for float16/bfloat16 inputs (the one documented deviation from torch); the gradient
    comes back in the input's dtype. Extensions: ``z_loss`` adds ``z_loss * lse**2`` per counted row
    (reduced like the loss); ``softcap`` maps logits to ``softcap * tanh(logits / softcap)`` first.

    On the Triton backend with reduction 'mean' or 'sum' and an input that requires grad, the gradient is
    formed in the forward pass (logits read once, gradient written once); backward only scales it by
    grad_output.  ``inplace_backward=True`` (Triton backend) writes that gradient over ``input``'s storage:
    the logits are *consumed* (their values are the gradient after the call) and the loss' gradient can be
    taken once, without ``create_graph``/``retain_graph`` (a second backward raises RuntimeError).
    On the reference backend, and with reduction 'none', it has no effect.  Out-of-range class indices raise
    ``IndexError`` on the CPU; on CUDA a device-side assert fires asynchronously (no host sync), so the error
    surfaces at the next synchronising call.
    """
    loss, _, _ = _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                label_smoothing, z_loss, softcap, inplace_backward, False)
    return loss


def cross_entropy_with_stats(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                             ignore_index: int = -100, reduce=None, reduction: str = "mean",
                             label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
                             inplace_backward: bool = False) -> CrossEntropyStats:
    """:func:`cross_entropy` plus per-row fp32 ``lse`` and ``entropy``, from the same pass over the logits.

    Arguments as :func:`cross_entropy`; ``lse`` and ``entropy`` have the target rows' shape ((N, d1, ...),
    or () for an unbatched input), are computed for ignored rows too, and are not differentiable.
    """
    loss, lse, ent = _cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                    label_smoothing, z_loss, softcap, inplace_backward, True)
    return CrossEntropyStats(loss, lse.float() if lse.dtype != torch.float64 else lse,
                             ent.float() if ent.dtype != torch.float64 else ent)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood on log-probabilities, as ``torch.nn.functional.nll_loss``.

    ``-weight[t] * input[t]`` per row; the mean divides by the sum of the counted rows' weights (NaN when
    every row is ignored, as torch). Returns float32 for float16/bfloat16 inputs.

    Every backend runs this as a gather of one entry per row plus per-row arithmetic: there is no pass over
    the rows for a kernel to fuse, and autograd's gather backward writes the (zero) gradient once.
    """
    x, cdim, C, w, red = _loss_common(input, target, weight, size_average, reduce, reduction)
    ignore_index = check.ignore_index(ignore_index)
    check.integer_target(target)
    target = check.class_target_shape(x, target, cdim)
    check.target_range(target, C, ignore_index)
    wd = loss_dtype(x.dtype)
    xv = x.movedim(cdim, -1)
    t = target.long()
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    if C == 0:  # no classes: target_range let only ignored targets through; each row gives 0, as torch
        picked = xv.sum(-1).to(wd)  # zeros, still connected to the (empty) input for autograd
        w_t = torch.zeros(t.shape, dtype=wd, device=x.device)
    else:
        picked = xv.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1).to(wd)
        w_t = w.to(wd)[t_safe] if w is not None else torch.ones(t.shape, dtype=wd, device=x.device)
    w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
    rows = torch.where(valid, -w_t * picked, torch.zeros_like(picked))
    if red == "none":
        return rows
    if red == "sum":
        return rows.sum()
    return rows.sum() / w_t.sum()


def selective_log_softmax(input: Tensor, index: Tensor, dim: int = -1) -> Tensor:
    """``log_softmax(input, dim).gather(dim, index)`` without materialising the full log-softmax.

    The RL "log-probability of the chosen tokens" op; differentiable in ``input``; same dtype as ``input``.
    """
    check.tensor("input", input)
    x = check.float_input("input", input, None)
    if x.dim() == 0:
        raise ValueError("input must have at least 1 dimension")
    d = check.dim(dim, x.dim())
    idx = check.index_tensor(x, index, d)
    if x.shape[d] == 0:
        return torch.empty(idx.shape, dtype=x.dtype, device=x.device)
    if _config.transforms_active(x):
        return composite.selective(x.movedim(d, -1), idx.long().movedim(d, -1)).movedim(-1, d)
    use_triton = _config.wants_triton(x.device.type)
    out = SelectiveLogSoftmaxFunction.apply(x.movedim(d, -1), idx.long().movedim(d, -1), use_triton)
    return out.movedim(-1, d)


def entropy(input: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(input, dim)``, from logits, as ``L + sum p |x - max|``.

    Both terms are non-negative, so nothing cancels. Returns float32 for float16/bfloat16 inputs.
    """
    check.tensor("input", input)
    x = check.float_input("input", input, None)
    if x.dim() == 0:
        return torch.zeros((), dtype=loss_dtype(x.dtype), device=x.device) + 0.0 * x
    d = check.dim(dim, x.dim())
    if _config.transforms_active(x):
        return composite.entropy(x.movedim(d, -1))
    return EntropyFunction.apply(x.movedim(d, -1), _config.wants_triton(x.device.type))



from ._linear import LinearCrossEntropyStats, linear_cross_entropy, linear_cross_entropy_with_stats  # noqa: E402

__all__ += ["linear_cross_entropy", "linear_cross_entropy_with_stats", "LinearCrossEntropyStats"]
