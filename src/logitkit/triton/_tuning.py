"""Block and warp tables for every kernel: the one place with tuning numbers (STYLE.md).

Each section is owned by one op family; append a new ``# <op>`` section rather than editing another one.
Nothing here queries a device at import time.  ``force_softmax`` / ``force_cross_entropy`` override the tables
inside a ``with`` block (tests reach every path with them; ``python -m benchmarks.tune`` times candidate blocks
and warps on a GPU and proposes table entries).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton


def _check_num_warps(num_warps: int | None) -> None:
    """The forcing hooks' check: Triton launches 1 to 32 warps (1024 threads) per program, a power of two."""
    if num_warps is not None and (not isinstance(num_warps, int) or isinstance(num_warps, bool)
                                  or num_warps < 1 or num_warps > 32 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")


# softmax ---------------------------------------------------------------------------------------------------
# Regimes of the softmax / log_softmax / logsumexp kernels (triton/softmax.py), chosen per (rows R, length N):
#   "row":   the whole row in registers, BLOCK_M rows per program, x read once.
#   "loop":  BLOCK_M rows per program, an online (max, rest-sum) pass over BLOCK_N chunks, then an output pass.
#   "split": too few row blocks to fill the device: each row is cut into SPLIT segments, one program per
#            (row block, segment) writes a partial state; a second launch combines and writes its segment.

SOFTMAX_REGIMES = ("row", "loop", "split")

# Largest register tile (elements) per program for the whole-row regime, by input element size in bytes.
SOFTMAX_ROW_TILE = {2: 16384, 4: 8192, 8: 4096}
# Chunk length of the looped / split passes (a power of two), by element size.
SOFTMAX_CHUNK = {2: 4096, 4: 2048, 8: 1024}
# A non-last softmax dim has stride > 1 along the row: take at least this many neighbouring rows per program
# so that loads along the contiguous (row) axis coalesce.
SOFTMAX_STRIDED_MIN_ROWS = 16
# Target number of programs in flight per streaming multiprocessor before the split regime kicks in.
SOFTMAX_PROGRAMS_PER_SM = 4
# A split segment is at least this many chunks long (fewer segments, cheaper combine).
SOFTMAX_MIN_SEGMENT_CHUNKS = 2
SOFTMAX_MAX_SPLIT = 256
# Programs assumed to fill the device when it is not a CUDA device (the interpreter).
SOFTMAX_CPU_PROGRAMS = 8


class SoftmaxConfig(NamedTuple):
    regime: str  # one of SOFTMAX_REGIMES
    BLOCK_M: int  # rows per program
    BLOCK_N: int  # columns per tile (the whole padded row in the "row" regime)
    split: int  # segments per row (1 unless regime == "split")
    segment: int  # columns per segment (a multiple of BLOCK_N; N when split == 1)
    num_warps: int


class SoftmaxOverride(NamedTuple):
    """Test and tuning hook: force a regime, blocks and/or warps (see ``force_softmax``)."""

    regime: str | None = None
    block_n: int | None = None
    block_m: int | None = None
    split: int | None = None
    num_warps: int | None = None


_override: contextvars.ContextVar[SoftmaxOverride | None] = contextvars.ContextVar(
    "logitkit_softmax_override", default=None
)


@contextlib.contextmanager
def force_softmax(regime: str | None = None, *, block_n: int | None = None, block_m: int | None = None,
                  split: int | None = None, num_warps: int | None = None) -> Iterator[None]:
    """Force the softmax-family kernels onto one regime (tests reach every path on small shapes with it) and/or
    set blocks and warps per program (benchmarks/tune.py sweeps them); what is left None keeps the table's
    choice."""
    if regime is not None and regime not in SOFTMAX_REGIMES:
        raise ValueError(f"regime must be one of {SOFTMAX_REGIMES}, got {regime!r}")
    _check_num_warps(num_warps)
    token = _override.set(SoftmaxOverride(regime, block_n, block_m, split, num_warps))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(idx) * SOFTMAX_PROGRAMS_PER_SM
    return SOFTMAX_CPU_PROGRAMS


def _warps(tile: int, forced: int | None = None) -> int:
    if forced is not None:
        return forced
    # About 8 to 16 elements per thread (two 16-byte vectors of bf16), 1 to 16 warps.
    return max(1, min(16, tile // 512))


def softmax_config(R: int, N: int, elem_size: int, strided: bool, device: torch.device) -> SoftmaxConfig:
    """The regime and blocks for R rows of length N >= 1; ``strided``: the row is not the contiguous axis."""
    ov = _override.get() or SoftmaxOverride()
    row_tile = SOFTMAX_ROW_TILE[elem_size]
    min_rows = SOFTMAX_STRIDED_MIN_ROWS if strided else 1
    n_pow2 = triton.next_power_of_2(N)
    regime = ov.regime
    if regime is None:
        regime = "row" if n_pow2 * min_rows <= row_tile else "loop"
    if regime == "row":
        BLOCK_N = n_pow2  # the same padded length in every layout: the same reduction order
        BLOCK_M = ov.block_m or max(min_rows, min(row_tile // BLOCK_N, triton.next_power_of_2(R)))
        return SoftmaxConfig("row", BLOCK_M, BLOCK_N, 1, N, _warps(BLOCK_M * BLOCK_N, ov.num_warps))
    BLOCK_N = ov.block_n or min(SOFTMAX_CHUNK[elem_size], n_pow2)
    BLOCK_M = ov.block_m or max(1, min(min_rows, row_tile // BLOCK_N))
    row_blocks = triton.cdiv(R, BLOCK_M)
    chunks = triton.cdiv(N, BLOCK_N)
    if ov.split is not None:
        split = ov.split
    elif ov.regime is None and regime == "loop":
        want = triton.cdiv(target_programs(device), row_blocks)
        split = min(want, chunks // SOFTMAX_MIN_SEGMENT_CHUNKS, SOFTMAX_MAX_SPLIT)
    else:
        split = 2 if regime == "split" else 1
    split = max(1, min(split, chunks))
    if regime == "split" and split == 1 and chunks >= 2:
        split = 2
    if split > 1:
        seg_chunks = triton.cdiv(chunks, split)
        split = triton.cdiv(chunks, seg_chunks)
        return SoftmaxConfig("split", BLOCK_M, BLOCK_N, split, seg_chunks * BLOCK_N,
                             _warps(BLOCK_M * BLOCK_N, ov.num_warps))
    return SoftmaxConfig("loop", BLOCK_M, BLOCK_N, 1, N, _warps(BLOCK_M * BLOCK_N, ov.num_warps))


# cross-entropy ---------------------------------------------------------------------------------------------
# Kernels of triton/cross_entropy.py (cross-entropy, selective log-softmax, entropy): one program per row.
# A row of V <= CE_MAX_BLOCK_V classes is held in registers (read once); a longer row loops over CE_MAX_BLOCK_V
# chunks twice (online (max, rest) pass, then the gradient pass whose re-read should hit L2).
# 16384 fp32 working values over 16 warps is 32 per thread.  GPU numbers remain to be taken (no GPU yet).
# Compiled for sm_90 (benchmarks/aot_compile.py, Triton 3.6.0, 2026-12-06): at 16 warps the register cap is 128
# per thread; the one-block (SINGLE) variants fit it, while the looped ones (V > 16384) keep 56-104 bytes per
# thread in local memory (fp16/bf16; 96-176 fp32; with entropy up to 504).  Whether that costs bandwidth, or a
# smaller looped block / fewer warps does better, is for the GPU sweep (benchmarks/tune.py) to say.
CE_MAX_BLOCK_V = 16384
# Under the interpreter each block is NumPy work per program: smaller blocks keep the tests quick.
CE_MAX_BLOCK_V_CPU = 4096


class CrossEntropyOverride(NamedTuple):
    """Test and tuning hook (see ``force_cross_entropy``)."""

    block_v: int | None = None  # a cap on BLOCK_V, or BLOCK_V itself when ``exact``
    num_warps: int | None = None
    exact: bool = False


_ce_override: contextvars.ContextVar[CrossEntropyOverride | None] = contextvars.ContextVar(
    "logitkit_ce_override", default=None
)


@contextlib.contextmanager
def force_cross_entropy(block_v: int | None = None, *, num_warps: int | None = None,
                        exact: bool = False) -> Iterator[None]:
    """Test and tuning hook.  ``block_v`` (a power of two) caps BLOCK_V, so short rows take the multi-block
    (looped) path; with ``exact=True`` it is BLOCK_V itself, past the device cap and V too (the sweep in
    benchmarks/tune.py tries blocks the table does not give).  ``num_warps`` sets the warps per program."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if exact and block_v is None:
        raise ValueError("exact=True needs a block_v")
    _check_num_warps(num_warps)
    token = _ce_override.set(CrossEntropyOverride(block_v, num_warps, exact))
    try:
        yield
    finally:
        _ce_override.reset(token)


def cross_entropy_config(V: int, device_type: str) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of V classes."""
    ov = _ce_override.get() or CrossEntropyOverride()
    if ov.exact:
        block = ov.block_v
    else:
        cap = CE_MAX_BLOCK_V if device_type == "cuda" else CE_MAX_BLOCK_V_CPU
        if ov.block_v is not None:
            cap = min(cap, ov.block_v)
        block = min(triton.next_power_of_2(max(V, 1)), cap)
    if ov.num_warps is not None:
        return block, ov.num_warps
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, warps
