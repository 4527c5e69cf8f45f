"""Shared fixtures: the backends under test and the source tree on sys.path when not installed."""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

try:
    import logitkit  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "src"))

import logitkit  # noqa: E402


def available_backends() -> list[str]:
    """'reference' always; 'triton' when the interpreter is asked for.

    The generic tests build CPU tensors, which the kernels take only in Triton's interpreter; on a GPU machine
    without it the kernel test files (test_triton_*.py, the CUDA cases of test_compile.py) cover CUDA tensors.
    """
    names = ["reference"]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return names
        names.append("triton")
    return names


@pytest.fixture(params=available_backends())
def backend(request):
    """Run the test under each available backend."""
    with logitkit.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """Each test starts from its own fixed global seed, so its random inputs do not depend on which tests an
    xdist worker happened to run before it (an order-dependent input once failed CI and passed locally)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long rows or many compiles; deselect with -m 'not slow'")
