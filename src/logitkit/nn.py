"""Modules holding configuration and calling ``logitkit.functional`` (torch.nn's constructor arguments)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss", "NLLLoss"]


class Softmax(torch.nn.Module):
    """As ``torch.nn.Softmax(dim)``."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(torch.nn.Module):
    """As ``torch.nn.LogSoftmax(dim)``."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class _WeightedLoss(torch.nn.Module):
    def __init__(self, weight: Tensor | None, size_average, reduce, reduction: str) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            from ._validate import reduction as legacy

            reduction = legacy(reduction, size_average, reduce)
        self.reduction = reduction
        self.register_buffer("weight", weight)
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
