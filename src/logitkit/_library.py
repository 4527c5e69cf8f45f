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


# cross-entropy ---------------------------------------------------------------------------------------------
# The launchers of triton/cross_entropy.py.  Functional forms allocate their outputs; the in-place forms
# declare what they write: ``ce_fwd_inplace`` / ``ce_prob_fwd_inplace`` write the gradient over the logits
# (inplace_backward), ``ce_fwd_out`` writes into caller buffers (none of which may be ``x``: use the inplace
# form for that), ``grad_scale_`` scales a gradient in place.  Tensors that a flag leaves unwritten come back
# as empty (0,) tensors (a custom op returns no None).


def _ce_kernels():
    from .triton import cross_entropy as kernels

    return kernels


def _ce_rows_fake(x: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    M = x.shape[0]
    return (x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M if with_entropy else 0, dtype=torch.float32))


def _grad_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("logitkit::ce_fwd", mutates_args=())
def _ce_fwd_op(x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor | None, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float | None, with_grad: bool,
               with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = _ce_kernels().ce_fwd(x, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              z_loss=z_loss, softcap=softcap, with_grad=with_grad and x.shape[0] > 0,
                              with_entropy=with_entropy, denom=denom)
    ent = st.entropy if with_entropy else x.new_empty(0, dtype=torch.float32)
    dx = st.dx if with_grad and st.dx is not None else (_grad_fake(x) if with_grad else x.new_empty(0))
    return st.loss, st.lse, ent, dx


@_ce_fwd_op.register_fake
def _(x, target, weight, denom, ignore_index, label_smoothing, z_loss, softcap, with_grad, with_entropy):
    return (*_ce_rows_fake(x, with_entropy), _grad_fake(x) if with_grad else x.new_empty(0))


@torch.library.custom_op("logitkit::ce_fwd_inplace", mutates_args=("x",))
def _ce_fwd_inplace_op(x: Tensor, target: Tensor, weight: Tensor | None, denom: Tensor | None,
                       ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
                       with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    st = _ce_kernels().ce_fwd(x, target, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              z_loss=z_loss, softcap=softcap, with_grad=x.shape[0] > 0, with_entropy=with_entropy,
                              denom=denom, inplace=True)
    return st.loss, st.lse, st.entropy if with_entropy else x.new_empty(0, dtype=torch.float32)


@_ce_fwd_inplace_op.register_fake
def _(x, target, weight, denom, ignore_index, label_smoothing, z_loss, softcap, with_entropy):
    return _ce_rows_fake(x, with_entropy)


@torch.library.custom_op("logitkit::ce_fwd_out", mutates_args=("loss", "lse", "entropy", "dx"))
def _ce_fwd_out_op(x: Tensor, target: Tensor, loss: Tensor | None, lse: Tensor | None, entropy: Tensor | None,
                   dx: Tensor | None, weight: Tensor | None, weight_sum: Tensor | None, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float | None, grad_scale: Tensor | None,
                   denom: Tensor | None) -> None:
    _ce_kernels().ce_fwd_out(x, target, loss=loss, lse=lse, entropy=entropy, dx=dx, weight=weight,
                             weight_sum=weight_sum, ignore_index=ignore_index, label_smoothing=label_smoothing,
                             z_loss=z_loss, softcap=softcap, grad_scale=grad_scale, denom=denom)


@_ce_fwd_out_op.register_fake
def _(x, target, loss, lse, entropy, dx, weight, weight_sum, ignore_index, label_smoothing, z_loss, softcap,
      grad_scale, denom):
    return None


@torch.library.custom_op("logitkit::ce_bwd", mutates_args=())
def _ce_bwd_op(x: Tensor, target: Tensor, grad_scale: Tensor, weight: Tensor | None, denom: Tensor | None,
               ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None) -> Tensor:
    return _ce_kernels().ce_bwd(x, target, grad_scale, weight=weight, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, denom=denom)


@_ce_bwd_op.register_fake
def _(x, target, grad_scale, weight, denom, ignore_index, label_smoothing, z_loss, softcap):
    return _grad_fake(x)


@torch.library.custom_op("logitkit::ce_prob_fwd", mutates_args=())
def _ce_prob_fwd_op(x: Tensor, y: Tensor, weight: Tensor | None, denom: Tensor | None, label_smoothing: float,
                    z_loss: float, softcap: float | None, with_grad: bool,
                    with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    st = _ce_kernels().ce_prob_fwd(x, y, weight=weight, label_smoothing=label_smoothing, z_loss=z_loss,
                                   softcap=softcap, with_grad=with_grad and x.shape[0] > 0,
                                   with_entropy=with_entropy, denom=denom)
    ent = st.entropy if with_entropy else x.new_empty(0, dtype=torch.float32)
    dx = st.dx if with_grad and st.dx is not None else (_grad_fake(x) if with_grad else x.new_empty(0))
    return st.loss, st.lse, ent, dx


@_ce_prob_fwd_op.register_fake
def _(x, y, weight, denom, label_smoothing, z_loss, softcap, with_grad, with_entropy):
    return (*_ce_rows_fake(x, with_entropy), _grad_fake(x) if with_grad else x.new_empty(0))


@torch.library.custom_op("logitkit::ce_prob_fwd_inplace", mutates_args=("x",))
def _ce_prob_fwd_inplace_op(x: Tensor, y: Tensor, weight: Tensor | None, denom: Tensor | None,
                            label_smoothing: float, z_loss: float, softcap: float | None,
                            with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    st = _ce_kernels().ce_prob_fwd(x, y, weight=weight, label_smoothing=label_smoothing, z_loss=z_loss,
                                   softcap=softcap, with_grad=x.shape[0] > 0, with_entropy=with_entropy,
                                   denom=denom, inplace=True)
    return st.loss, st.lse, st.entropy if with_entropy else x.new_empty(0, dtype=torch.float32)


@_ce_prob_fwd_inplace_op.register_fake
def _(x, y, weight, denom, label_smoothing, z_loss, softcap, with_entropy):
    return _ce_rows_fake(x, with_entropy)


@torch.library.custom_op("logitkit::ce_prob_bwd", mutates_args=())
def _ce_prob_bwd_op(x: Tensor, y: Tensor, grad_scale: Tensor, weight: Tensor | None, denom: Tensor | None,
                    label_smoothing: float, z_loss: float, softcap: float | None) -> Tensor:
    return _ce_kernels().ce_prob_bwd(x, y, grad_scale, weight=weight, label_smoothing=label_smoothing,
                                     z_loss=z_loss, softcap=softcap, denom=denom)


@_ce_prob_bwd_op.register_fake
def _(x, y, grad_scale, weight, denom, label_smoothing, z_loss, softcap):
    return _grad_fake(x)


@torch.library.custom_op("logitkit::grad_scale_", mutates_args=("dx",))
def _grad_scale_op(dx: Tensor, g: Tensor) -> None:
    _ce_kernels().grad_scale_(dx, g)


@_grad_scale_op.register_fake
def _(dx, g):
    return None


@torch.library.custom_op("logitkit::selective_fwd", mutates_args=())
def _selective_fwd_op(x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _ce_kernels().selective_fwd(x, index)


@_selective_fwd_op.register_fake
def _(x, index):
    M = x.shape[0]
    f32 = dict(dtype=torch.float32)
    return index.new_empty(index.shape, **f32), x.new_empty(M, **f32), x.new_empty(M, **f32)


@torch.library.custom_op("logitkit::selective_bwd", mutates_args=())
def _selective_bwd_op(x: Tensor, index: Tensor, g: Tensor, a: Tensor, r: Tensor) -> Tensor:
    return _ce_kernels().selective_bwd(x, index, g, a, r)


@_selective_bwd_op.register_fake
def _(x, index, g, a, r):
    return _grad_fake(x)


@torch.library.custom_op("logitkit::entropy_fwd", mutates_args=())
def _entropy_fwd_op(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _ce_kernels().entropy_fwd(x)


@_entropy_fwd_op.register_fake
def _(x):
    return _ce_rows_fake(x, True)


@torch.library.custom_op("logitkit::entropy_bwd", mutates_args=())
def _entropy_bwd_op(x: Tensor, g: Tensor, h: Tensor, a: Tensor, r: Tensor) -> Tensor:
    return _ce_kernels().entropy_bwd(x, g, h, a, r)


@_entropy_bwd_op.register_fake
def _(x, g, h, a, r):
    return _grad_fake(x)


class cross_entropy_ops:
    """The launcher API of triton/cross_entropy.py, dispatched through the registered ops (what autograd calls)."""

    @staticmethod
    def ce_fwd(x: Tensor, target: Tensor, *, weight: Tensor | None = None, denom: Tensor | None = None,
               ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
               softcap: float | None = None, with_grad: bool = False, with_entropy: bool = False,
               inplace: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(loss, lse, entropy, dx) rows; dx is ``x`` itself with ``inplace`` (written over), None without grad."""
        args = (weight, denom, ignore_index, float(label_smoothing), float(z_loss),
                None if softcap is None else float(softcap))
        if with_grad and inplace:
            loss, lse, ent = torch.ops.logitkit.ce_fwd_inplace(x, target, *args, with_entropy)
            return loss, lse, ent, x
        loss, lse, ent, dx = torch.ops.logitkit.ce_fwd(x, target, *args, with_grad, with_entropy)
        return loss, lse, ent, dx if with_grad else None

    @staticmethod
    def ce_bwd(x: Tensor, target: Tensor, grad_scale: Tensor, *, weight: Tensor | None = None,
               denom: Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
               z_loss: float = 0.0, softcap: float | None = None) -> Tensor:
        return torch.ops.logitkit.ce_bwd(x, target, grad_scale, weight, denom, ignore_index, float(label_smoothing),
                                         float(z_loss), None if softcap is None else float(softcap))

    @staticmethod
    def ce_prob_fwd(x: Tensor, y: Tensor, *, weight: Tensor | None = None, denom: Tensor | None = None,
                    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                    with_grad: bool = False, with_entropy: bool = False,
                    inplace: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        args = (weight, denom, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
        if with_grad and inplace:
            loss, lse, ent = torch.ops.logitkit.ce_prob_fwd_inplace(x, y, *args, with_entropy)
            return loss, lse, ent, x
        loss, lse, ent, dx = torch.ops.logitkit.ce_prob_fwd(x, y, *args, with_grad, with_entropy)
        return loss, lse, ent, dx if with_grad else None

    @staticmethod
    def ce_prob_bwd(x: Tensor, y: Tensor, grad_scale: Tensor, *, weight: Tensor | None = None,
                    denom: Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                    softcap: float | None = None) -> Tensor:
        return torch.ops.logitkit.ce_prob_bwd(x, y, grad_scale, weight, denom, float(label_smoothing), float(z_loss),
                                              None if softcap is None else float(softcap))

    @staticmethod
    def grad_scale_(dx: Tensor, g: Tensor) -> Tensor:
        torch.ops.logitkit.grad_scale_(dx, g)
        return dx

    @staticmethod
    def selective_fwd(x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.logitkit.selective_fwd(x, index)

    @staticmethod
    def selective_bwd(x: Tensor, index: Tensor, g: Tensor, a: Tensor, r: Tensor) -> Tensor:
        return torch.ops.logitkit.selective_bwd(x, index, g, a, r)

    @staticmethod
    def entropy_fwd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.logitkit.entropy_fwd(x)

    @staticmethod
    def entropy_bwd(x: Tensor, g: Tensor, h: Tensor, a: Tensor, r: Tensor) -> Tensor:
        return torch.ops.logitkit.entropy_bwd(x, g, h, a, r)


# linear cross-entropy --------------------------------------------------------------------------------------
# The kernels linear cross-entropy runs between its GEMMs: a token chunk's fused cross-entropy with the
# gradient written over the chunk's logits (``ce_fwd_out_inplace``: ``x`` and the caller's row buffers are
# written), and the vocab-block passes of triton/linear_cross_entropy.py (pass 1 updates the float64 row
# state in place, pass 2 writes the block's gradient over its logits).


def _lce_kernels():
    from .triton import linear_cross_entropy as kernels

    return kernels


@torch.library.custom_op("logitkit::ce_fwd_out_inplace", mutates_args=("x", "loss", "lse", "entropy"))
def _ce_fwd_out_inplace_op(x: Tensor, target: Tensor, loss: Tensor, lse: Tensor, entropy: Tensor | None,
                           weight: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                           softcap: float | None, grad_scale: Tensor | None) -> None:
    _ce_kernels().ce_fwd_out(x, target, loss=loss, lse=lse, entropy=entropy, dx=x, weight=weight,
                             ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                             softcap=softcap, grad_scale=grad_scale)


@_ce_fwd_out_inplace_op.register_fake
def _(x, target, loss, lse, entropy, weight, ignore_index, label_smoothing, z_loss, softcap, grad_scale):
    return None


@torch.library.custom_op("logitkit::lce_stats_fwd_", mutates_args=("a", "r", "s", "u", "e", "xt"))
def _lce_stats_fwd_op(x: Tensor, v0: int, target: Tensor, a: Tensor, r: Tensor, s: Tensor | None,
                      u: Tensor | None, e: Tensor | None, xt: Tensor, weight: Tensor | None, ignore_index: int,
                      softcap: float | None) -> None:
    _lce_kernels().lce_stats_fwd_out(x, v0, target, a=a, r=r, s=s, u=u, e=e, xt=xt, weight=weight,
                                     ignore_index=ignore_index, softcap=softcap)


@_lce_stats_fwd_op.register_fake
def _(x, v0, target, a, r, s, u, e, xt, weight, ignore_index, softcap):
    return None


@torch.library.custom_op("logitkit::lce_grad_bwd_", mutates_args=("x",))
def _lce_grad_bwd_op(x: Tensor, v0: int, V: int, target: Tensor, a: Tensor, R: Tensor, L: Tensor, lse: Tensor,
                     grad_rows: Tensor, weight: Tensor | None, weight_sum: Tensor | None, ignore_index: int,
                     label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    _lce_kernels().lce_grad_bwd_out(x, v0, V, target, a=a, R=R, L=L, lse=lse, grad_rows=grad_rows, weight=weight,
                                    weight_sum=weight_sum, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


@_lce_grad_bwd_op.register_fake
def _(x, v0, V, target, a, R, L, lse, grad_rows, weight, weight_sum, ignore_index, label_smoothing, z_loss,
      softcap):
    return None


def _opt_float(v: float | None) -> float | None:
    return None if v is None else float(v)


class linear_ce_ops:
    """The kernels of linear cross-entropy, dispatched through the registered ops (what autograd calls)."""

    @staticmethod
    def ce_chunk(x: Tensor, target: Tensor, *, loss: Tensor, lse: Tensor, entropy: Tensor | None,
                 weight: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                 softcap: float | None, grad_scale: Tensor | None, write_grad: bool) -> None:
        """A chunk's loss / lse (/ entropy) rows into the given buffers; with ``write_grad`` the gradient
        (scaled by ``grad_scale`` rows) over ``x``."""
        if write_grad:
            torch.ops.logitkit.ce_fwd_out_inplace(x, target, loss, lse, entropy, weight, ignore_index,
                                                  float(label_smoothing), float(z_loss), _opt_float(softcap),
                                                  grad_scale)
        else:
            torch.ops.logitkit.ce_fwd_out(x, target, loss, lse, entropy, None, weight, None, ignore_index,
                                          float(label_smoothing), float(z_loss), _opt_float(softcap), grad_scale,
                                          None)

    @staticmethod
    def block_stats(x: Tensor, v0: int, target: Tensor, *, a: Tensor, r: Tensor, s: Tensor | None,
                    u: Tensor | None, e: Tensor | None, xt: Tensor, weight: Tensor | None, ignore_index: int,
                    softcap: float | None) -> None:
        torch.ops.logitkit.lce_stats_fwd_(x, v0, target, a, r, s, u, e, xt, weight, ignore_index,
                                          _opt_float(softcap))

    @staticmethod
    def block_grad(x: Tensor, v0: int, V: int, target: Tensor, *, a: Tensor, R: Tensor, L: Tensor, lse: Tensor,
                   grad_rows: Tensor, weight: Tensor | None, weight_sum: Tensor | None, ignore_index: int,
                   label_smoothing: float, z_loss: float, softcap: float | None) -> None:
        torch.ops.logitkit.lce_grad_bwd_(x, v0, V, target, a, R, L, lse, grad_rows, weight, weight_sum,
                                         ignore_index, float(label_smoothing), float(z_loss), _opt_float(softcap))
