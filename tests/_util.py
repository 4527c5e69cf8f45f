"""Small helpers shared by the test modules (no fixtures here; those live in conftest.py)."""

from __future__ import annotations

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# NUMERICS.md row lengths that fit the CPU budget: 1, small primes, powers of two and one past them.
LENGTHS = [1, 2, 3, 7, 8, 33, 1024, 1025]

# Dtypes with accuracy targets in NUMERICS.md (float64 is checked against torch and gradcheck instead).
TARGET_DTYPES = [F16, BF16, F32]


def rows_for(V: int) -> int:
    """Rows per family: many short rows (cheap), a few long ones."""
    return 64 if V <= 33 else 4


def grad(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/dx of sum(g * fn(x)) through autograd, in x's dtype."""
    xr = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(xr), xr, g)
    return gx


def worst(errors: dict[str, float], bound) -> dict[str, float]:
    """The entries of ``errors`` above ``bound`` (a number, or a dict of per-key bounds)."""
    return {k: v for k, v in errors.items() if not v <= (bound[k] if isinstance(bound, dict) else bound)}
