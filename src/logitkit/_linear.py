"""Public linear_cross_entropy (torch 2.13's F.linear_cross_entropy signature) and its stats sibling.

Kept apart from functional.py so the two files stay small; functional re-exports both.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import _config
from . import _validate as check
from .autograd.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    make_opts,
    pick_strategy,
    token_chunk,
    vocab_block,
)
from .reference import composite
from .reference.plain import working_dtype


class LinearCrossEntropyStats(NamedTuple):
    """Loss (reduced as asked) with per-token fp32 log-sum-exp and entropy of the predicted distribution."""

    loss: Tensor
    lse: Tensor
    entropy: Tensor


def _run(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, options,
         z_loss, softcap, strategy, entropy):
    strategy = check.linear_ce_strategy(strategy)
    check.tensor("input", input)
    check.tensor("linear_weight", linear_weight)
    check.tensor("target", target)
    # under autocast, the classifier runs as autocast runs F.linear (torch's unfused graph does exactly that)
    input, linear_weight, linear_bias = _config.autocast_linear(input.device.type, input, linear_weight, linear_bias)
    x = check.float_input("input", input, None)
    if x.dim() < 1:
        raise ValueError("input must have shape (..., D) with at least one dimension, got a 0-d tensor")
    if linear_weight.dim() < 2:
        raise ValueError(f"linear_weight must have shape (V, D), got {tuple(linear_weight.shape)}")
    D = x.shape[-1]
    if linear_weight.shape[-1] != D:
        raise ValueError(
            f"linear_weight's last dimension ({linear_weight.shape[-1]}) must equal input's last dimension ({D})"
        )
    if linear_weight.dtype != x.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must match input dtype {x.dtype}")
    V = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None:
        check.tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (V, *out_features):
            raise ValueError(f"linear_bias must have shape {(V, *out_features)}, got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != x.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must match input dtype {x.dtype}")
    red = check.reduction(reduction, None, None)
    ignore_index = check.ignore_index(ignore_index, allow_none=True)
    eps = check.label_smoothing(label_smoothing)
    z = check.nonneg_float("z_loss", z_loss)
    cap = check.softcap(softcap)
    w = check.class_weight(weight, V, x)
    check.weight_without_grad(w, "linear_cross_entropy")
    lead = tuple(x.shape[:-1])
    logits_shape = (*lead, V, *out_features)
    prob = target.dtype.is_floating_point
    if prob and tuple(target.shape) != logits_shape:
        raise ValueError(
            f"a floating-point target holds class probabilities and must have shape {logits_shape}, "
            f"got {tuple(target.shape)}"
        )
    if prob and ignore_index is not None:
        raise ValueError("ignore_index cannot be specified when target contains class probabilities")
    ii = -100 if ignore_index is None else ignore_index
    if not prob and not lead and tuple(target.shape) == (1,):  # unbatched (D,) input: torch also takes a (1,) target
        target = target.reshape(())
    if out_features:
        # K-dimensional loss: (V, d1, ..., D) weights. As torch, this takes the unfused path.
        if not lead:
            raise ValueError("a K-dimensional linear_weight (V, d1, ..., D) needs batched input (N, D)")
        from .functional import cross_entropy

        b = None if linear_bias is None else linear_bias.reshape(-1)
        logits = torch.nn.functional.linear(x, linear_weight.reshape(-1, D), b).reshape(logits_shape)
        if entropy:
            raise ValueError("linear_cross_entropy_with_stats supports (V, D) weights only")
        return cross_entropy(logits, target, w, ignore_index=ii, reduction=red, label_smoothing=eps, z_loss=z,
                             softcap=cap), None, None
    if not prob:
        check.integer_target(target)
        if tuple(target.shape) != lead:
            raise ValueError(
                f"target of shape {tuple(target.shape)} must hold class indices of shape {lead} (input without D)"
            )
        check.target_range(target, V, ii)
    elif target.requires_grad:
        raise ValueError("linear_cross_entropy does not differentiate with respect to probability targets")
    for name, t in (("linear_weight", linear_weight), ("target", target), ("linear_bias", linear_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    requested = None
    if options is not None:
        requested = getattr(options, "batch_chunk_size", None)
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)
                                      or requested <= 0):
            raise ValueError(f"options.batch_chunk_size must be a positive int or None, got {requested!r}")
        if (getattr(options, "acc_policy", "auto") != "auto" or getattr(options, "acc_dtype", None) is not None
                or getattr(options, "chunking_method", "auto") not in ("auto", None)):
            warnings.warn(
                "logitkit.linear_cross_entropy accumulates in float32 (float64 for float64 inputs) and sizes its "
                "own chunks; options.acc_policy, options.acc_dtype and options.chunking_method do not apply "
                "(only options.batch_chunk_size is used)",
                stacklevel=3,
            )
    M = math.prod(x.shape[:-1])  # not numel // D: D may be 0
    x2 = x.reshape(M, D)
    t2 = target.reshape(M, V) if prob else target.reshape(M).long()
    out_dtype = working_dtype(x.dtype)
    # As torch: float64 probabilities make a float64 loss (computed in working precision, then widened).
    loss_out = torch.promote_types(out_dtype, t2.dtype) if prob else out_dtype
    # torch.func or forward AD: through the (M, V) logits, no chunks, no memory saving
    if _config.transforms_active(x2, linear_weight, linear_bias, t2):
        loss, lse, ent = composite.linear_ce(x2, linear_weight, linear_bias, t2, w, ii, red, eps, z, cap, prob,
                                             entropy)
        loss = loss.reshape(lead) if red == "none" else loss
        return (loss.to(loss_out), lse.reshape(lead).to(out_dtype),
                ent.reshape(lead).to(out_dtype) if entropy else None)
    use_triton = _config.wants_triton(x.device.type) and x.dtype != torch.float64
    chunk = token_chunk(M, V, requested, x.device.type, x.element_size())
    o = make_opts(w, ii, red, eps, z, cap, chunk, prob, entropy, use_triton,
                  strategy=pick_strategy(strategy, linear_weight), vblock=vocab_block(M, V, chunk))
    loss, lse, ent = LinearCrossEntropyFunction.apply(x2, linear_weight, linear_bias, t2, o)
    if red == "none":
        loss = loss.reshape(lead)
    return loss.to(loss_out), lse.reshape(lead).to(out_dtype), ent.reshape(lead).to(out_dtype) if entropy else None


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = None,
                         weight: Tensor | None = None, reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                         softcap: float | None = None, strategy: str = "auto") -> Tensor:
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the (M, V) logits.

    Signature, defaults and semantics of torch 2.13's ``torch.nn.functional.linear_cross_entropy``
    (``ignore_index=None`` means -100 for class indices); ``input`` may have any number of leading dims
    ``(..., D)``; ``linear_weight`` is ``(V, D)``. Peak extra memory is one block of logits, not M * V
    (``options.batch_chunk_size`` tokens' worth when given). ``reduction='none'`` gives per-token
    ``-log p(target)``. Returns float32 for half inputs. Extensions: ``z_loss``, ``softcap`` (as
    ``cross_entropy``) and ``strategy``:

    - ``'token_chunks'``: chunks of T tokens x all V classes; 3 GEMMs (6 M D V flops), gradients formed in
      forward for 'mean'/'sum'; dW accumulates in a float32 (V, D) buffer, for fp16/bf16 weights twice the
      weight gradient's own size (2.1 GB at V=128256, D=4096).
    - ``'vocab_blocks'``: forward keeps per-token (max, log1p(rest)) statistics; backward goes over blocks of
      classes with all tokens at once and writes each block of dW once, in the weight's dtype. Extra memory:
      the gradients, one (M, Vb) logits block and a float32 (M, D) dx accumulator for half inputs; 4 GEMMs
      (8 M D V flops). GPU timings of the two have not been measured yet.
    - ``'auto'`` (default): ``'vocab_blocks'`` when ``linear_weight`` is fp16/bf16 and its gradient is
      wanted, ``'token_chunks'`` otherwise (no extra buffer then, and one GEMM fewer).
    """
    loss, _, _ = _run(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                      options, z_loss, softcap, strategy, entropy=False)
    return loss


def linear_cross_entropy_with_stats(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                    linear_bias: Tensor | None = None, weight: Tensor | None = None,
                                    reduction: str = "mean", ignore_index: int | None = None,
                                    label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                                    softcap: float | None = None, strategy: str = "auto") -> LinearCrossEntropyStats:
    """As ``linear_cross_entropy`` (``strategy`` included), also returning per-token fp32 ``lse`` and
    ``entropy`` (not differentiable)."""
    loss, lse, ent = _run(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, options, z_loss, softcap, strategy, entropy=True)
    return LinearCrossEntropyStats(loss, lse, ent)
