"""Modules holding configuration and calling ``logitkit.functional`` (torch.nn's constructor arguments)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss", "NLLLoss", "LinearCrossEntropyLoss"]


class Softmax(torch.nn.Module):
    """As ``torch.nn.Softmax(dim)``."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def __setstate__(self, state) -> None:  # as torch: a pickle from before ``dim`` existed means the implicit dim
        super().__setstate__(state)
        if not hasattr(self, "dim"):
            self.dim = None

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(torch.nn.Module):
    """As ``torch.nn.LogSoftmax(dim)``."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def __setstate__(self, state) -> None:  # as torch: a pickle from before ``dim`` existed means the implicit dim
        super().__setstate__(state)
        if not hasattr(self, "dim"):
            self.dim = None

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class _WeightedLoss(torch.nn.modules.loss._WeightedLoss):
    """torch's loss base (``isinstance(m, torch.nn.modules.loss._Loss)`` holds, as for torch's losses), with
    logitkit's check of the legacy ``size_average`` / ``reduce`` arguments."""

    def __init__(self, weight: Tensor | None, size_average, reduce, reduction: str) -> None:
        if size_average is not None or reduce is not None:
            from ._validate import reduction as legacy

            reduction = legacy(reduction, size_average, reduce)
        super().__init__(weight, None, None, reduction)
        self.weight: Tensor | None


class CrossEntropyLoss(_WeightedLoss):
    """As ``torch.nn.CrossEntropyLoss``; keyword-only extensions ``z_loss`` and ``softcap``."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: float | None = None) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap)


class NLLLoss(_WeightedLoss):
    """As ``torch.nn.NLLLoss``."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean") -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class LinearCrossEntropyLoss(_WeightedLoss):
    """As torch 2.13's ``torch.nn.LinearCrossEntropyLoss``: owns ``self.linear`` (no bias by default) and
    computes ``cross_entropy(self.linear(input), target)`` without materialising the logits.

    Keyword-only extensions ``z_loss`` and ``softcap`` as ``logitkit.cross_entropy``, and ``strategy``
    ('auto', 'token_chunks', 'vocab_blocks': the memory / GEMM-count trade-off of
    ``logitkit.linear_cross_entropy``).
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None, label_smoothing: float = 0.0,
                 options=None, z_loss: float = 0.0, softcap: float | None = None, strategy: str = "auto") -> None:
        # As torch's constructor checks (ValueError here, as logitkit.linear_cross_entropy raises at call time).
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape {(num_classes,)}, got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        super().__init__(weight, None, None, reduction)
        self.in_features, self.num_classes = in_features, num_classes
        self.out_features = tuple(out_features)
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.strategy = strategy

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        shape = (self.num_classes, *self.out_features)
        w = self.linear.weight.reshape(*shape, self.in_features)
        b = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return F.linear_cross_entropy(input, w, target, linear_bias=b, weight=self.weight,
                                      reduction=self.reduction, ignore_index=self.ignore_index,
                                      label_smoothing=self.label_smoothing, options=self.options,
                                      z_loss=self.z_loss, softcap=self.softcap, strategy=self.strategy)

    def extra_repr(self) -> str:
        # torch's fields, then the extensions
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, strategy={self.strategy}")
