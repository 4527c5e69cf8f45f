"""Backend choice: explicit argument > ``use_backend`` context > automatic.

Nothing is read at import time; ``LOGITKIT_BACKEND`` (if set) is read lazily, once per call of
:func:`get_backend` when no context manager is active. While a torch.func transform is active every op takes
the composite path instead (:func:`transforms_active`), whatever the backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as _forward_ad

BACKENDS = ("auto", "reference", "triton")

# The innermost ``use_backend`` name is the last entry. A plain list, not a ContextVar: torch.compile traces
# list reads (and guards on them), while ContextVar.get is a graph break.
_stack: list[str] = []
_triton_ok: list[bool] = []  # filled on first use: whether ``import triton`` works


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``$LOGITKIT_BACKEND``, else 'auto'."""
    if _stack:
        return _stack[-1]
    env = os.environ.get("LOGITKIT_BACKEND")
    return _check_name(env) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Select the implementation inside a ``with`` block.

    ``'auto'``: Triton kernels for CUDA tensors when Triton is importable, the reference path otherwise.
    ``'reference'``: the plain-PyTorch path everywhere.
    ``'triton'``: the kernels, also for CPU tensors when ``TRITON_INTERPRET=1`` (tests use this).
    """
    _stack.append(_check_name(name))
    try:
        yield name
    finally:
        _stack.pop()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    if not _triton_ok:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_ok.append(False)
        else:
            _triton_ok.append(True)
    return _triton_ok[0]


def wants_triton(device_type: str, backend: str | None = None) -> bool:
    """Whether an op on a tensor of ``device_type`` goes to the Triton kernels.

    Raises ``RuntimeError`` when 'triton' is forced but cannot run there.
    """
    backend = get_backend() if backend is None else _check_name(backend)
    if backend == "reference":
        return False
    if backend == "auto":
        return device_type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError("use_backend('triton') needs the 'triton' package (pip install logitkit[triton])")
    if device_type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"use_backend('triton') on a {device_type} tensor needs TRITON_INTERPRET=1 (Triton's interpreter)"
        )
    return True


def transforms_active(*tensors) -> bool:
    """Whether the ops must take the composite path: a torch.func transform (grad, vjp, jacrev, jacfwd, vmap,
    ...) is active around this call, or one of ``tensors`` carries a forward-mode tangent
    (``torch.autograd.forward_ad.make_dual`` inside a ``dual_level``), which the autograd.Functions have no
    jvp rule for.

    The first is the test ``torch.autograd.Function.apply`` makes before taking functorch's route; torch.compile
    folds it to a constant (no graph break), and it is False while AOTAutograd traces an ordinary graph. The
    second looks at the tensors only while a dual level is open (never in ordinary training).
    """
    if torch._C._are_functorch_transforms_active():
        return True
    if _forward_ad._current_level < 0:
        return False
    return any(isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# Device types whose autocast uses torch's common op lists (AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE):
# there softmax / log_softmax run with dtype=float32 and logsumexp on float32 inputs. The CPU's own lists
# leave the three in the input dtype.
_AUTOCAST_FP32_DEVICES = ("cuda", "xpu", "mps")


def autocast_fp32(x: torch.Tensor) -> bool:
    """Whether torch's autocast would run softmax, log_softmax and logsumexp on ``x`` in float32: autocast is
    on for its device type (one of the above) and ``x`` is float16 / bfloat16 (float32 stays as it is, float64
    is never cast)."""
    return (x.dtype in (torch.float16, torch.bfloat16) and x.device.type in _AUTOCAST_FP32_DEVICES
            and torch.is_autocast_enabled(x.device.type))


def autocast_lower_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives ``F.linear`` on ``device_type`` (its lower-precision list, on every device
    type), or None when autocast is off there."""
    if device_type not in ("cpu", *_AUTOCAST_FP32_DEVICES) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_linear(device_type: str, *tensors):
    """``tensors`` as autocast hands them to ``F.linear`` on ``device_type``: float16/bfloat16/float32 tensors
    there cast to its lower-precision dtype (differentiably: gradients reach float32 weights in float32), others
    (float64, non-tensors, None) unchanged; all unchanged when autocast is off."""
    dt = autocast_lower_dtype(device_type)
    if dt is None:
        return tensors
    return tuple(
        t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and t.device.type == device_type else t
        for t in tensors
    )
