"""User-facing checks and their messages, in one place. Imports nothing from logitkit.

Checks that need tensor values (target range) run on the host only for CPU tensors, where they are cheap;
on an accelerator, and while ``torch.compile`` traces, they become ``torch._assert_async``: no host sync,
and a bad target surfaces as a device-side error at the next synchronisation (documented in README).
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


def _values(t: Tensor) -> Tensor:
    """The plain tensor under torch.func's wrappers (vmap's BatchedTensor holds every batch entry), so value
    checks can read it on the host inside a transform; ``t`` itself otherwise."""
    if torch._C._are_functorch_transforms_active():
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            t = torch._C._functorch.get_unwrapped(t)
    return t


def tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}; call .to_dense() first")
    return x


def float_input(name: str, x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Apply ``dtype=`` (cast first, then compute) and require a floating result."""
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        x = x.to(dtype)
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor, got {x.dtype}; pass dtype=torch.float32 (or another "
            "float dtype) to cast it first"
        )
    return x


def int_like(name: str, v: object, expected: str = "an int") -> int:
    """An int as torch's argument parser takes one: anything with ``__index__`` (NumPy integers, a one-element
    integer tensor), but not bool."""
    if not isinstance(v, bool):
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{name} must be {expected}, got {type(v).__name__}")


def dim(d: object, ndim: int, name: str = "dim") -> int:
    """Normalise a dimension index like torch (0-d tensors accept 0 and -1); integers as ``int_like``."""
    d = int_like(name, d)
    n = max(ndim, 1)
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {d})")
    return d % n


def dims(d: object, ndim: int) -> tuple[int, ...]:
    """A dim or tuple/list of dims for logsumexp, normalised, no repeats."""
    if isinstance(d, (tuple, list)):
        out = tuple(dim(i, ndim) for i in d)
        if len(set(out)) != len(out):
            raise ValueError(f"dim contains a repeated dimension: {tuple(d)}")
        return out
    return (dim(d, ndim),)


def implicit_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's deprecated implicit dim choice, with its warning."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def mask(m: object, x: Tensor) -> Tensor | None:
    """A boolean mask broadcastable to ``x``, expanded (a view) to its shape."""
    if m is None:
        return None
    if not isinstance(m, Tensor):
        raise TypeError(f"mask must be a boolean torch.Tensor or None, got {type(m).__name__}")
    tensor("mask", m)
    if m.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {m.dtype}")
    if m.device != x.device:
        raise ValueError(f"mask is on {m.device} but input is on {x.device}")
    try:
        return m.expand(x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(m.shape)} is not broadcastable to input of shape {tuple(x.shape)}"
        ) from None


def reduction(reduction: object, size_average: object, reduce: object) -> str:
    """torch's legacy size_average/reduce mapping (with its warning), then a check of ``reduction``."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = ("mean" if size_average else "sum") if reduce else "none"
        warnings.warn(
            f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
            stacklevel=4,
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


LINEAR_CE_STRATEGIES = ("auto", "token_chunks", "vocab_blocks")


def linear_ce_strategy(strategy: object) -> str:
    if not isinstance(strategy, str) or strategy not in LINEAR_CE_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_CE_STRATEGIES}, got {strategy!r}")
    return strategy


def label_smoothing(eps: object) -> float:
    if isinstance(eps, Tensor) and eps.dim() == 0 and not eps.dtype.is_complex and eps.dtype != torch.bool:
        eps = eps.item()  # a 0-d tensor (a smoothing schedule's value), as torch takes it
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(eps).__name__}")
    if not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    return float(eps)


def nonneg_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not float(v) >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return float(v)


def softcap(v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"softcap must be a positive float or None, got {type(v).__name__}")
    if not float(v) > 0.0:
        raise ValueError(f"softcap must be a positive float or None, got {v}")
    return float(v)


def class_weight(weight: object, C: int, x: Tensor) -> Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    tensor("weight", weight)
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(
            f"weight must be a 1-D tensor of {C} elements (one per class), got shape {tuple(weight.shape)}"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but input is on {x.device}")
    return weight


def loss_input(name: str, x: Tensor) -> int:
    """(N, C, d1, ...) or unbatched (C,): returns the class dimension."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dimension (C,) or (N, C, ...), got a 0-d tensor")
    return 0 if x.dim() == 1 else 1


def class_target_shape(x: Tensor, target: Tensor, cdim: int) -> Tensor:
    """Checks the class-index target's shape and device; returns it, an unbatched (C,) input's (1,) target
    viewed as 0-d (torch accepts both for that input, and the loss is 0-d either way)."""
    expected = x.shape[:cdim] + x.shape[cdim + 1 :]
    if x.dim() == 1 and target.shape == (1,):
        target = target.reshape(())
    if target.shape != expected:
        if x.dim() >= 2 and target.dim() >= 1 and target.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({x.shape[0]}) to match target batch_size ({target.shape[0]})"
            )
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match input of shape {tuple(x.shape)}: "
            f"expected class indices of shape {tuple(expected)}"
        )
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but input is on {x.device}")
    return target


def target_range(target: Tensor, C: int, ignore_index: int) -> None:
    """Every target is in [0, C) or equal to ignore_index."""
    if target.numel() == 0:
        return
    if target.dtype != torch.int64:  # compared in its own dtype, ignore_index would wrap (uint8: -1 == 255)
        target = target.long()
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        target = _values(target)
        bad = ((target < 0) | (target >= C)) & (target != ignore_index)
        if bool(bad.any()):
            v = int(target[bad][0])
            raise IndexError(
                f"target {v} is out of bounds: expected class indices in [0, {C}) or ignore_index={ignore_index}"
            )
    else:
        bad = ((target < 0) | (target >= C)) & (target != ignore_index)
        # C stays out of the message: under torch.compile with dynamic shapes, formatting it would specialise
        # the graph to this C (a recompile for every vocabulary size).
        torch._assert_async(~bad.any(), "target out of bounds: expected class indices in [0, C) or ignore_index")


def ignore_index(v: object, allow_none: bool = False) -> int | None:
    """An int (as ``int_like``), or None where allowed."""
    if v is None and allow_none:
        return None
    return int_like("ignore_index", v, "an int or None" if allow_none else "an int")


def no_ignore_index_for_probs(ignore_index: int) -> None:
    """torch refuses a class to ignore (ignore_index >= 0) with class-probability targets."""
    if ignore_index >= 0:
        raise ValueError(f"ignore_index is not supported for class-probability (floating-point) targets, got "
                         f"ignore_index={ignore_index}; leave it negative (default -100)")


def weight_without_grad(weight: Tensor | None, fn: str) -> None:
    """torch's losses are not differentiable in ``weight``: refuse one that requires grad (where grad is on)
    rather than return no gradient for it."""
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn} is not differentiable with respect to weight (as torch): pass weight.detach(), or "
                         f"call it under torch.no_grad()")


def prob_target(x: Tensor, target: Tensor) -> None:
    if target.shape != x.shape:
        raise ValueError(
            f"a floating-point target holds class probabilities and must have the input's shape {tuple(x.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but input is on {x.device}")


def integer_target(target: Tensor) -> None:
    if target.dtype == torch.bool or target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(f"target must hold integer class indices (e.g. torch.int64), got {target.dtype}")


def index_tensor(x: Tensor, index: object, d: int) -> Tensor:
    """gather-style index for selective_log_softmax."""
    if not isinstance(index, Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    tensor("index", index)
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if index.dim() != x.dim():
        raise ValueError(f"index must have as many dimensions as input ({x.dim()}), got {index.dim()}")
    for i, (a, b) in enumerate(zip(index.shape, x.shape, strict=True)):
        if i != d and a != b:
            raise ValueError(
                f"index of shape {tuple(index.shape)} must match input {tuple(x.shape)} in every dimension but dim={d}"
            )
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but input is on {x.device}")
    V = x.shape[d] if x.dim() else 1
    if index.numel():
        if index.device.type == "cpu" and not torch.compiler.is_compiling():
            iv = _values(index)
            bad = (iv < 0) | (iv >= V)
            if bool(bad.any()):
                raise IndexError(f"index {int(iv[bad][0])} is out of bounds for dimension {d} of size {V}")
        else:
            torch._assert_async(~((index < 0) | (index >= V)).any(), "selective_log_softmax: index out of bounds")
    return index
