"""torch.library registrations of the Triton launchers, so torch.compile sees each launch as one opaque node.

Each section registers a family's launchers as ``logitkit::<name>`` custom ops with a fake (meta) implementation
giving output shapes, dtypes and strides without running anything; autograd.Functions call the wrappers below
instead of the launchers, so ``torch.compile(fullgraph=True)`` captures them without a graph break and CUDA
graphs capture them like any other op.  The triton import happens on the first real call, never here.
"""

from __future__ import annotations

import torch
from torch import Tensor

# softmax ---------------------------------------------------------------------------------------------------


def _softmax_kernels():
    from .triton import softmax as kernels

    return kernels


def _kept(x: Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = 1
    return shape


def _working(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("logitkit::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: Tensor, dim: int, mask: Tensor | None, log: bool) -> Tensor:
    return _softmax_kernels().softmax_fwd(x, dim, mask=mask, log=log)


@_softmax_fwd_op.register_fake
def _(x, dim, mask, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("logitkit::softmax_bwd", mutates_args=())
def _softmax_bwd_op(y: Tensor, g: Tensor, dim: int, mask: Tensor | None, log: bool) -> Tensor:
    return _softmax_kernels().softmax_bwd(y, g, dim, mask=mask, log=log)


@_softmax_bwd_op.register_fake
def _(y, g, dim, mask, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.custom_op("logitkit::logsumexp_fwd", mutates_args=())
def _logsumexp_fwd_op(x: Tensor, dim: int, mask: Tensor | None) -> Tensor:
    return _softmax_kernels().logsumexp_fwd(x, dim, mask=mask)


@_logsumexp_fwd_op.register_fake
def _(x, dim, mask):
    return x.new_empty(_kept(x, dim), dtype=_working(x.dtype))


@torch.library.custom_op("logitkit::logsumexp_bwd", mutates_args=())
def _logsumexp_bwd_op(x: Tensor, lse: Tensor, g: Tensor, dim: int, mask: Tensor | None) -> Tensor:
    return _softmax_kernels().logsumexp_bwd(x, lse, g, dim, mask=mask)


@_logsumexp_bwd_op.register_fake
def _(x, lse, g, dim, mask):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class softmax_ops:
    """The launcher API of triton/softmax.py, dispatched through the registered ops (what autograd calls)."""

    @staticmethod
    def softmax_fwd(x: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False) -> Tensor:
        return torch.ops.logitkit.softmax_fwd(x, dim, mask, log)

    @staticmethod
    def softmax_bwd(y: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None, log: bool = False) -> Tensor:
        return torch.ops.logitkit.softmax_bwd(y, g, dim, mask, log)

    @staticmethod
    def logsumexp_fwd(x: Tensor, dim: int, *, mask: Tensor | None = None) -> Tensor:
        return torch.ops.logitkit.logsumexp_fwd(x, dim, mask)

    @staticmethod
    def logsumexp_bwd(x: Tensor, lse: Tensor, g: Tensor, dim: int, *, mask: Tensor | None = None) -> Tensor:
        return torch.ops.logitkit.logsumexp_bwd(x, lse, g, dim, mask)
