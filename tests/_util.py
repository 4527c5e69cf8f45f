"""Small helpers shared by the test modules (no fixtures here; those live in conftest.py)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from logitkit.reference import oracle

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# NUMERICS.md row lengths that fit the CPU budget: 1, small primes, powers of two and one past them.
LENGTHS = [1, 2, 3, 7, 8, 33, 1024, 1025]

# Module marks of the Triton kernel test files: they run where the kernels can (a GPU, or the interpreter on
# the CPU), and NumPy's warnings on inf - inf in guarded lanes of the interpreter are expected.
KERNEL_MARKS = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 (or a GPU)"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

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


def special_values(dtype: torch.dtype, V: int, M: int, seed: int) -> tuple[str, torch.Tensor]:
    """The oracle's special-value families (-inf among finite values; +inf, NaN, all -inf, all -inf but one)
    stacked into one batch of about M rows (at least 4 "specials" rows, one of each kind, and one
    "neginf_masked" row): one launch of the size of one family, which the interpreter's per-row cost rewards."""
    n_spec = max(4, M // 2)
    n_neg = max(1, M - n_spec)
    neg = dict(oracle.special_families(dtype, V, n_neg, seed))["neginf_masked"]
    spec = dict(oracle.special_families(dtype, V, n_spec, seed))["specials"]
    return "neginf_masked+specials", torch.cat([neg, spec])


def all_families(dtype: torch.dtype, V: int, M: int, seed: int):
    """NUMERICS.md's finite families, then the special-value ones (special_values)."""
    return itertools.chain(oracle.input_families(dtype, V, M, seed), [special_values(dtype, V, M, seed)])


def layout_rows(dtype: torch.dtype, V: int, seed: int) -> torch.Tensor:
    """(24, V) rows for the layout tests: 8 of N(0, 5), then the special-value families (-inf among finite
    values, +inf, NaN, all -inf, all -inf but one)."""
    rows = [torch.randn(8, V, dtype=F64, generator=torch.Generator().manual_seed(seed)).mul(5).to(dtype)]
    rows += [x for _, x in oracle.special_families(dtype, V, M=8, seed=seed)]
    return torch.cat(rows)


def strict_specials(err: torch.Tensor, ours: torch.Tensor, truth: torch.Tensor, x=None) -> torch.Tensor:
    """``err`` with NUMERICS.md's "special values must match exactly": at every position where the truth is
    NaN or +-inf, or (with ``x``, broadcast to the truth) where the input is non-finite and the truth is 0
    (softmax, gradients at -inf logits), the error is 0 if ``ours`` is exactly the truth (NaN == NaN), inf
    otherwise.  Elsewhere ``err`` is unchanged."""
    o, t = ours.detach().cpu().double(), truth.double()
    special = ~torch.isfinite(t)
    if x is not None:
        special |= ~torch.isfinite(torch.broadcast_to(x.detach().cpu(), t.shape)) & (t == 0)
    exact = (o == t) | (torch.isnan(o) & torch.isnan(t))
    bad = torch.full_like(err, torch.inf)
    return torch.where(special, torch.where(exact, torch.zeros_like(err), bad), err)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (the sign of zero included); any two NaNs count as equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False
    nan = torch.tensor(float("nan"), dtype=a.dtype, device=a.device)
    a, b = torch.where(torch.isnan(a), nan, a), torch.where(torch.isnan(b), nan, b)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
