"""Benchmark providers: who computes each op. Add a peer by appending a ``Provider`` to ``PROVIDERS``.

A provider says whether it can run here (``unavailable`` returns the reason it cannot, shown to the user and
written to the JSON), and builds a zero-argument step for ``(op, mode)`` on given inputs, or ``None`` when it
does not offer that op/mode (the row is skipped and said so, never silently dropped).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Step = Callable[[], object]


@dataclass
class Inputs:
    """Inputs for one shape: logits ``x``, a view of them that requires grad, targets and an upstream gradient."""

    x: torch.Tensor
    x_grad: torch.Tensor  # x.detach().requires_grad_(): same storage, so no extra memory
    target: torch.Tensor
    dy: torch.Tensor  # upstream gradient for softmax/log_softmax, shape (M, V)
    dy_lse: torch.Tensor  # upstream gradient for logsumexp, shape (M,)


def make_inputs(M: int, V: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, V, generator=gen, device=device, dtype=torch.float32).mul_(2.0).to(dtype)
    target = torch.randint(0, V, (M,), generator=gen, device=device)
    dy = torch.randn(M, V, generator=gen, device=device, dtype=torch.float32).to(dtype)
    dy_lse = torch.randn(M, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return Inputs(x, x.detach().requires_grad_(), target, dy, dy_lse)


def _steps(fns: dict[str, Callable], op: str, mode: str, inp: Inputs) -> Step | None:
    """Forward or forward+backward step from the provider's per-op functions ``fn(x, target)``."""
    fn = fns.get(op)
    if fn is None:
        return None
    if mode == "fwd":
        x, target = inp.x, inp.target

        def fwd():
            with torch.no_grad():
                return fn(x, target)

        return fwd
    xg, target = inp.x_grad, inp.target
    dy = {"softmax": inp.dy, "log_softmax": inp.dy, "logsumexp": inp.dy_lse}.get(op)

    def fwd_bwd():
        xg.grad = None  # no accumulation into a previous gradient: each step allocates and writes dx once
        out = fn(xg, target)
        out.backward(dy)

    return fwd_bwd


@dataclass(frozen=True)
class Provider:
    name: str
    devices: tuple[str, ...]
    unavailable: Callable[[str], str | None]  # device -> reason it cannot run, or None
    build: Callable[[str, str, Inputs], Step | None]  # (op, mode, inputs) -> step, or None if not offered


def _always(device: str) -> str | None:
    return None


# --- logitkit -------------------------------------------------------------------------------------------
def _logitkit_build(op: str, mode: str, inp: Inputs) -> Step | None:
    import logitkit

    return _steps(
        {
            "softmax": lambda x, t: logitkit.softmax(x, dim=-1),
            "log_softmax": lambda x, t: logitkit.log_softmax(x, dim=-1),
            "logsumexp": lambda x, t: logitkit.logsumexp(x, -1),
            "cross_entropy": lambda x, t: logitkit.cross_entropy(x, t),
        },
        op,
        mode,
        inp,
    )


# --- torch eager ----------------------------------------------------------------------------------------
_TORCH_FNS = {
    "softmax": lambda x, t: torch.softmax(x, dim=-1),
    "log_softmax": lambda x, t: torch.log_softmax(x, dim=-1),
    "logsumexp": lambda x, t: torch.logsumexp(x, -1),
    "cross_entropy": lambda x, t: F.cross_entropy(x, t),
}


def _torch_build(op: str, mode: str, inp: Inputs) -> Step | None:
    return _steps(_TORCH_FNS, op, mode, inp)


# --- torch.compile (CUDA only: on the CPU it needs a C++ toolchain and minutes of compile) ---------------
def _compile_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "torch.compile is benchmarked on CUDA only"
    return None


def _compile_build(op: str, mode: str, inp: Inputs) -> Step | None:
    fn = _TORCH_FNS.get(op)
    if fn is None:
        return None
    return _steps({op: torch.compile(fn, dynamic=False)}, op, mode, inp)


# --- Liger-Kernel (CUDA, when importable) ---------------------------------------------------------------
def _liger_unavailable(device: str) -> str | None:
    if device != "cuda":
        return "Liger-Kernel runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not importable (see ../shared/gpu/README.md: bring the wheel with carry)"
    return None


def _liger_build(op: str, mode: str, inp: Inputs) -> Step | None:
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss()
    # Liger's cross-entropy writes the gradient into the logits during the forward: the benchmark's x is
    # overwritten by bounded gradient values, which keeps the timing meaningful (same shape, finite values).
    return _steps(
        {
            "softmax": lambda x, t: LigerSoftmaxFunction.apply(x),
            "cross_entropy": lambda x, t: ce(x, t),
        },
        op,
        mode,
        inp,
    )


# --- SciPy (CPU, forward only, float32/float64 only: NumPy has no bfloat16) ------------------------------
def _scipy_unavailable(device: str) -> str | None:
    if device != "cpu":
        return "SciPy runs on the CPU only"
    if importlib.util.find_spec("scipy") is None:
        return "scipy is not installed"
    return None


def _scipy_build(op: str, mode: str, inp: Inputs) -> Step | None:
    if mode != "fwd" or inp.x.dtype not in (torch.float32, torch.float64):
        return None
    from scipy import special

    fns = {
        "softmax": lambda a: special.softmax(a, axis=-1),
        "log_softmax": lambda a: special.log_softmax(a, axis=-1),
        "logsumexp": lambda a: special.logsumexp(a, axis=-1),
    }
    fn = fns.get(op)
    if fn is None:
        return None
    array = inp.x.numpy()
    return lambda: fn(array)


PROVIDERS: tuple[Provider, ...] = (
    Provider("logitkit", ("cpu", "cuda"), _always, _logitkit_build),
    Provider("torch", ("cpu", "cuda"), _always, _torch_build),
    Provider("torch.compile", ("cuda",), _compile_unavailable, _compile_build),
    Provider("liger", ("cuda",), _liger_unavailable, _liger_build),
    Provider("scipy", ("cpu",), _scipy_unavailable, _scipy_build),
)

BY_NAME = {p.name: p for p in PROVIDERS}
