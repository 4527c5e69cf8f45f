"""Block and warp tables for every kernel: the one place with tuning numbers (STYLE.md).

Each section is owned by one op family; append a new ``# <op>`` section rather than editing another one.
Nothing here queries a device at import time.  ``force_softmax`` / ``force_cross_entropy`` override the tables
inside a ``with`` block (tests reach every path with them; ``python -m benchmarks.tune`` times candidate blocks
and warps on a GPU and proposes table entries).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton


def _check_reverse(reverse: bool | None) -> None:
    if reverse is not None and not isinstance(reverse, bool):
        raise TypeError(f"reverse must be a bool or None, got {reverse!r}")


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
#   "resident": rows too long for one program's registers, held by a group of programs instead: each program
#            loads one BLOCK_M x BLOCK_N tile of the row block, publishes its partial state to a workspace,
#            waits at a barrier with the other programs of its row block (_lib.group_barrier), combines the
#            states and writes its tile from registers: x read once, in one launch (the forward and backward
#            alike).  The barrier needs the whole group resident at once: one program per SM is always
#            possible, so a group has at most half the SM count (66 on an H100, room for a second such launch
#            on another stream; RESIDENT_MAX_GROUP caps it too): 1M bf16 / 512k fp32 contiguous, 64k bf16 /
#            32k fp32 strided (16-row tiles).  A longer row takes "loop" / "split".  Not the default
#            (SOFTMAX_RESIDENT_AUTO) until an H100 shows it beating "loop" / "split" (which read the row
#            twice) and never hanging: force_softmax("resident") takes it, and gpu_round.sh's "resident"
#            phase (benchmarks/gpu_softmax.py --resident) measures it; benchmarks/tune.py does not try it yet.

SOFTMAX_REGIMES = ("row", "loop", "split", "resident")
# Take "resident" by default where a row does not fit one program's tile and its group fits the device.
SOFTMAX_RESIDENT_AUTO = False
# Programs per row group at most (besides the SM count on a CUDA device).
RESIDENT_MAX_GROUP = 128

# Largest register tile (elements) per program for the whole-row regime, by input element size in bytes.
SOFTMAX_ROW_TILE = {2: 16384, 4: 8192, 8: 4096}
# Chunk length of the looped / split passes (a power of two), by element size.
SOFTMAX_CHUNK = {2: 4096, 4: 2048, 8: 1024}
# A non-last softmax dim has stride > 1 along the row: take at least this many neighbouring rows per program
# so that loads along the contiguous (row) axis coalesce (16 bf16 rows: one full 32-byte sector per column).
# The chunked regimes keep the register tile and shorten the chunk to row_tile // 16 (bf16 16 x 1024, fp32
# 16 x 512): the longer chunk with 4 rows read 8 of every 32 bytes per program and load.
SOFTMAX_STRIDED_MIN_ROWS = 16
# Register tile of the chunked regimes for strided rows whose 16-row groups Triton cannot prove contiguous and
# aligned (K or the outer stride not a multiple of 16, or rows not adjacent): scalar loads and addresses, and
# the full tile spills at 16 warps (sm_90 compiles, Triton 3.9.0: 700-1500 B of local memory per thread);
# 16 x 256 bf16 / 16 x 128 fp32 compiles without local memory.  Not measured on a GPU.
SOFTMAX_STRIDED_SCALAR_TILE = {2: 4096, 4: 2048, 8: 1024}
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
    reverse: bool | None = None  # the order of the second pass (see ``second_pass_reverse``)


class _Overrides:
    """The forcing hooks' stack of overrides, one per process (the innermost ``with`` wins).  Not a ContextVar:
    on CUDA, autograd runs backward on its own device thread, where a ContextVar set by the caller is unset and a
    forced regime would reach the forward kernels only.  A test and tuning hook: threads share it."""

    def __init__(self) -> None:
        self._stack: list = []

    def get(self):
        return self._stack[-1] if self._stack else None

    def set(self, value) -> int:
        self._stack.append(value)
        return len(self._stack) - 1

    def reset(self, token: int) -> None:
        del self._stack[token:]


_override = _Overrides()


@contextlib.contextmanager
def force_softmax(regime: str | None = None, *, block_n: int | None = None, block_m: int | None = None,
                  split: int | None = None, num_warps: int | None = None,
                  reverse: bool | None = None) -> Iterator[None]:
    """Force the softmax-family kernels onto one regime (tests reach every path on small shapes with it) and/or
    set blocks and warps per program and the order of the second pass (benchmarks/tune.py sweeps them); what is
    left None keeps the table's choice."""
    if regime is not None and regime not in SOFTMAX_REGIMES:
        raise ValueError(f"regime must be one of {SOFTMAX_REGIMES}, got {regime!r}")
    _check_num_warps(num_warps)
    _check_reverse(reverse)
    token = _override.set(SoftmaxOverride(regime, block_n, block_m, split, num_warps, reverse))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(_device_index(device)) * SOFTMAX_PROGRAMS_PER_SM
    return SOFTMAX_CPU_PROGRAMS


def _warps(tile: int, forced: int | None = None) -> int:
    if forced is not None:
        return forced
    # About 8 to 16 elements per thread (two 16-byte vectors of bf16), 1 to 16 warps.
    return max(1, min(16, tile // 512))


def softmax_config(R: int, N: int, elem_size: int, strided: bool, device: torch.device, *,
                   vector_rows: bool = True) -> SoftmaxConfig:
    """The regime and blocks for R rows of length N >= 1; ``strided``: the row is not the contiguous axis;
    ``vector_rows`` (strided only): groups of 16 neighbouring rows are contiguous and 16-element aligned."""
    ov = _override.get() or SoftmaxOverride()
    row_tile = SOFTMAX_ROW_TILE[elem_size]
    min_rows = SOFTMAX_STRIDED_MIN_ROWS if strided else 1
    n_pow2 = triton.next_power_of_2(N)
    regime = ov.regime
    if regime is None:
        regime = "row" if n_pow2 * min_rows <= row_tile else "loop"
    if regime == "resident" or (regime == "loop" and ov.regime is None and SOFTMAX_RESIDENT_AUTO):
        cfg = _resident_config(N, n_pow2, row_tile if vector_rows or not strided
                               else SOFTMAX_STRIDED_SCALAR_TILE[elem_size], min_rows, ov, device)
        if cfg is not None:
            return cfg
        if ov.regime == "resident":
            raise ValueError(f"the resident regime holds a row of {N} in at most {resident_group_limit(device)} "
                             f"programs; this row needs more (a larger block_n, or another regime)")
        regime = "loop"
    if regime == "row":
        BLOCK_N = n_pow2  # the same padded length in every layout: the same reduction order
        BLOCK_M = ov.block_m or max(min_rows, min(row_tile // BLOCK_N, triton.next_power_of_2(R)))
        return SoftmaxConfig("row", BLOCK_M, BLOCK_N, 1, N, _warps(BLOCK_M * BLOCK_N, ov.num_warps))
    chunk = SOFTMAX_CHUNK[elem_size]
    if strided:  # shorter chunks, the same register tile: min_rows neighbouring rows, so full 32-byte sectors
        tile = row_tile if vector_rows else SOFTMAX_STRIDED_SCALAR_TILE[elem_size]
        chunk = min(chunk, tile // min_rows)
    BLOCK_N = ov.block_n or min(chunk, n_pow2)
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


def resident_group_limit(device: torch.device) -> int:
    """Programs one row group of the resident regime may have.  All of them must be resident at once; any kernel
    fits one program per SM, and half the SMs leave room for a second resident launch on another stream (two
    launches holding half a group each would otherwise wait on each other)."""
    if device.type == "cuda":
        return min(RESIDENT_MAX_GROUP, _sm_count(_device_index(device)) // 2)
    return RESIDENT_MAX_GROUP


def _resident_config(N: int, n_pow2: int, tile: int, min_rows: int, ov: SoftmaxOverride,
                     device: torch.device) -> SoftmaxConfig | None:
    """The resident regime's blocks (a row group of ``split`` programs, one BLOCK_M x BLOCK_N tile each), or
    None when the group would be too large for the device."""
    BLOCK_M = ov.block_m or min_rows
    BLOCK_N = ov.block_n or min(n_pow2, max(16, tile // BLOCK_M))
    split = triton.cdiv(N, BLOCK_N)  # one tile per program (force_softmax's split does not apply)
    if split > resident_group_limit(device):
        return None
    return SoftmaxConfig("resident", BLOCK_M, BLOCK_N, split, BLOCK_N, _warps(BLOCK_M * BLOCK_N, ov.num_warps))


# second-pass order -----------------------------------------------------------------------------------------
# A looped or split kernel reads its rows twice: a (max, rest-sum) pass, then an output pass.  The model behind
# the default order (a model, not a measurement: benchmarks/tune.py times both orders on a GPU):
#   S = bytes read by the programs in flight during one pass (one launch's whole input for the split regime,
#       whose two passes are two launches), C = the L2 size.
#   Forward order re-reads every chunk exactly one pass (S bytes of other traffic) after its first read: with an
#   LRU-like L2 every re-read hits while S < C and nearly none does once S > C (a sequential scan thrashes LRU).
#   Reverse order re-reads the most recently read chunk first: the reuse distances spread evenly over (0, 2S),
#   so about min(1, C / 2S) of the re-reads hit, whatever S is.
#   Not modelled: the output pass's writes (they take L2 lines too), H100's two L2 halves, a policy that is not
#   LRU.  SECOND_PASS_L2_FRACTION is the knob a measurement would move.
# So forward while S <= C * SECOND_PASS_L2_FRACTION, reverse beyond.  For the split regime the output launch also
# takes its programs in reverse order, so that its whole traversal is the state launch's, backwards.  The order
# changes no value of the elementwise output passes; the cross-entropy kernels' second-pass sums (label
# smoothing, entropy) are summed in the other order (fp32, within their error bounds).
SECOND_PASS_L2_FRACTION = 1.0
# Resident programs per multiprocessor, the model's: limited by the 2048 threads and the 65536 registers of a
# multiprocessor (and 32 programs), at CHUNKED_REGS registers per thread below 16 warps and the cap (65536 /
# threads) from 16 warps up.  From the sm_90 compiles (benchmarks/aot_compile.py, Triton 3.9.0, 2026-12-06):
# softmax's chunked kernels over a contiguous row (4 or 8 warps) use 30-72 registers; looped cross-entropy
# (16 warps) sits at the 128 cap.  So 4-8 softmax programs and one cross-entropy program per multiprocessor.
# The strided softmax kernels at the full tile (16 x 1024 bf16 / 16 x 512 fp32, 16 warps) take 58-128 registers,
# the model's 128; at SOFTMAX_STRIDED_SCALAR_TILE (4-8 warps) 128-254, where the model counts 64, so it
# overcounts their resident programs (2026-12-07 compiles).
CHUNKED_REGS = {"softmax": 64, "cross_entropy": 128}


def programs_per_sm(num_warps: int, family: str) -> int:
    threads = 32 * num_warps
    regs = 65536 // threads if num_warps >= 16 else CHUNKED_REGS[family]
    return max(1, min(32, 2048 // threads, 65536 // (threads * regs)))


# L2 bytes assumed where the device properties do not give them (an H100's 50 MiB).
DEFAULT_L2_BYTES = 50 << 20


@functools.cache
def _l2_bytes(device_index: int) -> int:
    return getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def second_pass_reverse(reuse_bytes: int, device: torch.device) -> bool:
    """The model's order for a second pass whose re-reads are ``reuse_bytes`` (S above) behind the first reads:
    reverse when S exceeds the L2.  Off a CUDA device (the interpreter) there is no cache to model: forward."""
    if device.type != "cuda":
        return False
    return reuse_bytes > _l2_bytes(_device_index(device)) * SECOND_PASS_L2_FRACTION


def in_flight(programs: int, num_warps: int, family: str, device: torch.device) -> int:
    """Programs of a chunked launch of ``programs`` resident at once on a CUDA device (the model's estimate)."""
    return min(programs, _sm_count(_device_index(device)) * programs_per_sm(num_warps, family))


def softmax_reverse(cfg: SoftmaxConfig, R: int, N: int, read_bytes: int, device: torch.device) -> bool:
    """Order of the output pass of ``cfg`` (forced with ``force_softmax(reverse=)``); ``read_bytes``: bytes read
    per element (x's element size forward; y's plus g's backward)."""
    ov = _override.get()
    if ov is not None and ov.reverse is not None:
        return ov.reverse and cfg.regime not in ("row", "resident")
    if cfg.regime in ("row", "resident") or device.type != "cuda":
        return False
    if cfg.regime == "split":
        return second_pass_reverse(R * N * read_bytes, device)
    rows = in_flight(triton.cdiv(R, cfg.BLOCK_M), cfg.num_warps, "softmax", device) * cfg.BLOCK_M
    return second_pass_reverse(min(rows, R) * N * read_bytes, device)


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
    reverse: bool | None = None  # the order of the looped kernels' second pass


_ce_override = _Overrides()


@contextlib.contextmanager
def force_cross_entropy(block_v: int | None = None, *, num_warps: int | None = None,
                        exact: bool = False, reverse: bool | None = None) -> Iterator[None]:
    """Test and tuning hook.  ``block_v`` (a power of two) caps BLOCK_V, so short rows take the multi-block
    (looped) path; with ``exact=True`` it is BLOCK_V itself, past the device cap and V too (the sweep in
    benchmarks/tune.py tries blocks the table does not give).  ``num_warps`` sets the warps per program;
    ``reverse`` the order of the looped kernels' second pass (``cross_entropy_reverse``)."""
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if exact and block_v is None:
        raise ValueError("exact=True needs a block_v")
    _check_num_warps(num_warps)
    _check_reverse(reverse)
    token = _ce_override.set(CrossEntropyOverride(block_v, num_warps, exact, reverse))
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


def cross_entropy_reverse(M: int, V: int, block_v: int, num_warps: int, read_bytes: int,
                          device: torch.device) -> bool:
    """Order of the second pass of the looped kernels (one program of ``num_warps`` per row, M rows of V > block_v
    entries; ``read_bytes`` per entry: the logits' element size, plus the targets' for class probabilities)."""
    ov = _ce_override.get()
    if ov is not None and ov.reverse is not None:
        return ov.reverse
    if V <= block_v or device.type != "cuda":
        return False
    return second_pass_reverse(in_flight(M, num_warps, "cross_entropy", device) * V * read_bytes, device)
