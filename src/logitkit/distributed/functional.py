"""Vocab-parallel softmax family: the class dimension is sharded across the ranks of a process group.

Each rank holds a contiguous slice of the classes, in rank order, slices may be uneven (even empty). The
functions take the single-device signatures plus keyword-only ``group`` (default: the world) and
``vocab_start`` (this rank's first class; default: found in the call's own first all-reduce, where every
rank's local size rides along, so sizes may change on any rank between calls). A
``torch.distributed.tensor.DTensor`` sharded on the class dimension is accepted in place of the local slice
(its device mesh dimension gives the group).

Outputs: softmax / log_softmax return this rank's slice (a DTensor for DTensor input); logsumexp, the
losses, selective_log_softmax and entropy return the full result, identical on every rank. Backward gives
each rank the gradient of its own slice; every rank must call backward with the same upstream gradient
(the usual "loss replicated across the tensor-parallel group" contract).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import _config
from .. import _validate as check
from ..autograd.losses import loss_dtype
from ._comm import shard_of
from ._functions import (
    VocabParallelCrossEntropyFunction,
    VocabParallelCrossEntropyProbFunction,
    VocabParallelEntropyFunction,
    VocabParallelLogsumexpFunction,
    VocabParallelSelectiveLogSoftmaxFunction,
    VocabParallelSoftmaxFunction,
)

__all__ = ["softmax", "log_softmax", "logsumexp", "cross_entropy", "selective_log_softmax", "entropy"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def no_transforms(*tensors) -> None:
    """The vocab-parallel ops have no composite path: refuse torch.func transforms and forward-mode AD clearly
    (the autograd.Functions would fail inside torch with a setup_context / jvp message)."""
    if _config.transforms_active(*tensors):
        raise NotImplementedError(
            "logitkit.distributed ops do not support torch.func transforms (grad, vmap, ...) or forward-mode AD "
            "(forward_ad.make_dual): use reverse-mode autograd (loss.backward()), or the single-device logitkit ops"
        )


def unwrap(input, group, cdim_of: Callable[[int], int]):
    """(local tensor, group, rewrap) for a plain tensor or a DTensor sharded on its class dimension."""
    no_transforms(input)
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(input, DTensor):
        return input, group, None
    cdim = cdim_of(input.ndim)
    mesh, placements = input.device_mesh, input.placements
    sharded = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(sharded) != 1 or placements[sharded[0]].dim % input.ndim != cdim:
        raise ValueError(
            f"a DTensor input must be sharded on its class dimension ({cdim}) over exactly one mesh dimension "
            f"and replicated elsewhere, got placements {placements}"
        )
    if any(not (p.is_shard() or p.is_replicate()) for p in placements):
        raise ValueError(f"partial placements are not supported, got {placements}")
    mesh_group = mesh.get_group(sharded[0])
    if group is not None and group is not mesh_group:
        raise ValueError("group= differs from the process group of the DTensor's sharded mesh dimension")

    def rewrap(y: Tensor):
        return DTensor.from_local(y, mesh, placements, run_check=False, shape=input.shape, stride=input.stride())

    return input.to_local(), mesh_group, rewrap


def _replicated(t):
    DTensor = _dtensor_type()
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def _last(name: str, dim, ndim: int) -> None:
    if ndim == 0:
        raise ValueError(f"{name}: a vocab-parallel input needs a class dimension (got a 0-d tensor)")
    if dim != ndim - 1:
        raise ValueError(f"{name}: the sharded class dimension must be the last (dim=-1), got dim={dim}")


def _normalize(name, input, dim, stacklevel, dtype, mask, log, group, vocab_start):
    x, group, rewrap = unwrap(input, group, lambda n: n - 1)
    check.tensor("input", x)
    if dim is None:
        dim = check.implicit_softmax_dim(name, x.dim(), stacklevel + 1)
    if dtype is None and _config.autocast_fp32(x):  # as torch's autocast: dtype=float32 on a GPU
        dtype = torch.float32
    x = check.float_input("input", x, dtype)
    d = check.dim(dim, max(x.dim(), 1))
    _last(name, d, x.dim())
    shard_of(group, x.shape[-1], vocab_start)  # validates vocab_start
    m = check.mask(_replicated(mask), x)
    y = VocabParallelSoftmaxFunction.apply(x, m, log, group)
    return rewrap(y) if rewrap is not None else y


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None,
            *, mask: Tensor | None = None, group=None, vocab_start: int | None = None) -> Tensor:
    """This rank's slice of ``softmax(full_input, dim=-1)``; 2 all-reduces forward, 1 (M values) backward.

    ``mask`` is this rank's slice of the mask (``False`` excluded; an all-excluded row gives zeros).
    """
    return _normalize("softmax", input, dim, _stacklevel, dtype, mask, False, group, vocab_start)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None,
                *, mask: Tensor | None = None, group=None, vocab_start: int | None = None) -> Tensor:
    """This rank's slice of ``log_softmax(full_input, dim=-1)`` as ``x - max - log1p(rest)``; see ``softmax``."""
    return _normalize("log_softmax", input, dim, _stacklevel, dtype, mask, True, group, vocab_start)


def logsumexp(input: Tensor, dim, keepdim: bool = False, *, mask: Tensor | None = None, group=None,
              vocab_start: int | None = None) -> Tensor:
    """logsumexp over the sharded last dimension, replicated on every rank; 2 all-reduces, local backward."""
    x, group, _ = unwrap(input, group, lambda n: n - 1)
    check.tensor("input", x)
    x = x if x.dtype.is_floating_point else x.to(torch.get_default_dtype())
    if _config.autocast_fp32(x):  # as torch's autocast on a GPU: logsumexp of the float32 cast
        x = x.float()
    dims = check.dims(dim, max(x.dim(), 1))
    if len(dims) != 1:
        raise ValueError("logsumexp: only the sharded class dimension (the last) can be reduced")
    _last("logsumexp", dims[0], x.dim())
    shard_of(group, x.shape[-1], vocab_start)
    m = check.mask(_replicated(mask), x)
    out = VocabParallelLogsumexpFunction.apply(x, m, group)
    return out.unsqueeze(-1) if keepdim else out


def class_weight_arg(weight, size: int, x: Tensor) -> Tensor | None:
    """A class weight, full (V,) or this rank's (V_local,) slice: every check that needs no layout (type,
    rank, dtype, device) before any collective; its length is checked, and it is sliced, once V is known."""
    if weight is None:
        return None
    w = _replicated(weight)
    if isinstance(w, Tensor) and w.dim() != 1:
        raise ValueError(
            f"weight must be a 1-D tensor of V elements (one per class) or this rank's V_local = {size}, "
            f"got shape {tuple(w.shape)}"
        )
    return check.class_weight(w, w.shape[0] if isinstance(w, Tensor) else size, x)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean", label_smoothing: float = 0.0,
                  *, z_loss: float = 0.0, softcap: float | None = None, group=None,
                  vocab_start: int | None = None) -> Tensor:
    """Cross-entropy with the class dimension sharded; ``target`` holds global class indices (replicated) or
    class probabilities (this rank's slice, sharded like ``input``).

    ``weight`` is the full (V,) class weight or this rank's (V_local,) slice. Two all-reduces in forward
    (the max, then one packed sum of per-row terms), none in backward. The loss is replicated on every rank
    and equals the single-process ``logitkit.cross_entropy`` of the gathered logits.
    """
    x, group, _ = unwrap(input, group, lambda n: 1 if n >= 2 else 0)
    check.tensor("input", x)
    check.tensor("target", target)
    if not target.dtype.is_floating_point:
        target = _replicated(target)  # class indices are replicated; probabilities are sharded like the logits
    x = check.float_input("input", x, None)
    cdim = check.loss_input("input", x)
    red = check.reduction(reduction, size_average, reduce)
    ignore_index = check.ignore_index(ignore_index)
    eps = check.label_smoothing(label_smoothing)
    z = check.nonneg_float("z_loss", z_loss)
    cap = check.softcap(softcap)
    if target.dtype.is_floating_point:
        # class probabilities: this rank's (*, V_local) slice of them, like the logits
        q = target.to_local() if hasattr(target, "to_local") else target
        check.prob_target(x, q)
        wide = torch.promote_types(loss_dtype(x.dtype), q.dtype)
        if wide != loss_dtype(x.dtype):  # float64 probabilities: computed in float64, as the single-device op
            x = x.to(wide)
        if q.requires_grad:
            raise ValueError("vocab-parallel cross_entropy does not differentiate with respect to probability targets")
        shard = shard_of(group, x.shape[cdim], vocab_start)
        w = class_weight_arg(weight, shard.size, x)
        loss, _ = VocabParallelCrossEntropyProbFunction.apply(
            x.movedim(cdim, -1), q.movedim(cdim, -1), w, red, eps, z, cap, shard, group
        )
        return loss
    check.integer_target(target)
    target = check.class_target_shape(x, target, cdim)
    shard = shard_of(group, x.shape[cdim], vocab_start)
    w = class_weight_arg(weight, shard.size, x)
    loss, _ = VocabParallelCrossEntropyFunction.apply(
        x.movedim(cdim, -1), target.long(), w, ignore_index, red, eps, z, cap, shard, group
    )
    return loss


def selective_log_softmax(input: Tensor, index: Tensor, dim: int = -1, *, group=None,
                          vocab_start: int | None = None) -> Tensor:
    """``log_softmax(full_input, -1).gather(-1, index)`` for global ``index`` (replicated); local backward."""
    x, group, _ = unwrap(input, group, lambda n: n - 1)
    check.tensor("input", x)
    x = check.float_input("input", x, None)
    if x.dim() == 0:
        raise ValueError("input must have at least 1 dimension")
    d = check.dim(dim, x.dim())
    _last("selective_log_softmax", d, x.dim())
    idx = _replicated(index)
    shard = shard_of(group, x.shape[-1], vocab_start)
    if not isinstance(idx, Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {idx.dtype}")
    if idx.dim() != x.dim() or idx.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"index of shape {tuple(idx.shape)} must match input {tuple(x.shape)} in every dimension but the last"
        )
    if idx.device != x.device:
        raise ValueError(f"index is on {idx.device} but input is on {x.device}")
    # The range needs the global V, known after the first all-reduce: checked in forward.
    return VocabParallelSelectiveLogSoftmaxFunction.apply(x, idx.long(), shard, group)


def entropy(input: Tensor, dim: int = -1, *, group=None, vocab_start: int | None = None) -> Tensor:
    """Shannon entropy (nats) of ``softmax(full_input, -1)``, replicated; 2 all-reduces, local backward."""
    x, group, _ = unwrap(input, group, lambda n: n - 1)
    check.tensor("input", x)
    x = check.float_input("input", x, None)
    d = check.dim(dim, max(x.dim(), 1))
    _last("entropy", d, x.dim())
    shard_of(group, x.shape[-1], vocab_start)
    return VocabParallelEntropyFunction.apply(x, group)
