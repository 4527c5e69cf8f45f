"""Blocks-and-warps sweep of the Triton kernels on a GPU: a measured table and a proposal for triton/_tuning.py.

    PYTHONPATH=src python3 -m benchmarks.tune --device cuda --out $OUT/tune.json [--quick] [--budget-s 420]
    PYTHONPATH=src python -m benchmarks.tune --plan         # candidates and a time estimate; needs no device
    TRITON_INTERPRET=1 PYTHONPATH=src python -m benchmarks.tune --device cpu --quick --out /tmp/tune.json

What is timed: the launchers with preallocated outputs, inside _tuning.force_softmax / force_cross_entropy:
  softmax / log_softmax forward    softmax_fwd_out(x, dim, log=, out=y)
  softmax / log_softmax backward   softmax_bwd_out(y, g, dim, log=, out=dx)
  cross-entropy forward+backward   ce_fwd_out(x, t, loss=, lse=, dx=, denom=): the fused-gradient path that
                                   logitkit.cross_entropy(x, t) takes when x requires grad (reduction 'mean':
                                   the gradient is formed in the forward; backward only scales it, free at g = 1)
  CUDA: triton.testing.do_bench medians with p20/p80 (L2 flushed between calls, short warm-up and repetition: the
  candidates are many); each row also keeps the first call's seconds (compile or cubin load) and, per launched
  kernel, registers, spills and shared memory. CPU (Triton's interpreter, only so that this code cannot rot):
  one perf_counter call.
Shapes: benchmarks/gpu_softmax.py's (M*N = 2**28 bf16, 2**27 fp32, N in NS, the dim last and dim 0 of an (N, M)
  tensor) and benchmarks/gpu_cross_entropy.py's (M, V); on the CPU tiny ones.
Bytes (benchmarks/harness.py's ideal bytes): softmax forward 2 passes over M*N (read x, write y), backward 3 (read y,
  read dy, write dx: the fwd+bwd 5 minus the forward's 2), cross-entropy fwd+bwd 2 (read logits, write gradient);
  TB/s over the median and as a fraction of a device-to-device copy measured in the same run.
Candidates: per shape a bounded set of (regime, BLOCK_M, BLOCK_N, split, num_warps) (softmax) or (BLOCK_V,
  num_warps) (cross-entropy), deduplicated by the config they resolve to; each runs as that config forced in full.
  Each takes the second-pass order of _tuning.py's model ("second-pass order"); where the default has a second
  pass (looped / split), one more candidate is the default with the other order, and the proposal's "order"
  list gives, per case, the model's order against the flipped one (an "R" in a config label: reverse).
  The table's default runs unforced first and again last (the two medians' spread is the noise floor).
  softmax_config has no direction and no op: one config serves forward and backward of softmax and log_softmax, so
  the proposal gives, besides each shape's best, the best config for the sum of those four times per (dtype,
  layout, N), which is what the table can express.
Guard: before timing, each candidate runs once into NaN-poisoned outputs that are compared with the default's: the
  largest |difference| over the row's largest |value| must stay within GUARD_ULPS ulps of the output dtype and
  GUARD_F32_ULPS fp32 ulps (reduction orders differ between configs, so no bitwise equality is asked; it is
  reported), and non-finite values must match. A candidate that fails the guard is not timed; one that fails to
  compile or raises is recorded with its error. A CUDA error that breaks the context ends the sweep (the JSON keeps
  what was measured).
Budget: --budget-s counts from the start; cases run in priority order (cross-entropy bf16, softmax bf16 last dim,
  cross-entropy fp32, softmax fp32 last dim, then the non-last dims), the JSON is rewritten after each case and
  once more at the end, and a run out of time stops before its next candidate.
Compile: on CUDA, --jobs worker processes compile every candidate ahead of the timing (launchers called with
  JITFunction.run forced to warmup=True on 16-row copies of the inputs, whose argument specialisation is the full
  shape's: the same kernel hashes, checked with sm_90 compiles on a machine without a GPU) into Triton's on-disk
  cache; the timing process then loads the cubins. Workers only save time: a kernel
  they miss is compiled where it is first launched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks import harness
from benchmarks.gpu_cross_entropy import SHAPES as CE_SHAPES
from benchmarks.gpu_softmax import DTYPES as SOFTMAX_DTYPES
from benchmarks.gpu_softmax import NS

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# On the CPU (the interpreter runs every program in NumPy): M*N elements per dtype, row lengths, (M, V).
CPU_ELEMENTS = {"bf16": 1 << 10, "fp32": 1 << 10}
CPU_NS = (256, 1024)
CPU_CE_SHAPES = [(4, 512), (2, 2048)]
# --quick on CUDA: a smoke run of a minute or two.
QUICK_NS = (4096, 131072)
QUICK_CE_SHAPES = [(8192, 128256)]
QUICK_CANDIDATES = 2  # non-default candidates per shape with --quick
# Guard: |candidate - default| <= GUARD_ULPS ulps (at 1.0) of the output dtype times the row's largest |value|,
# and never tighter than GUARD_F32_ULPS fp32 ulps: fp32 outputs of rows of 2**20 summed in another order (other
# chunks, segments, warps) may differ by more than a few ulps; a wrong or unwritten value is off by far more.
GUARD_ULPS = 4
GUARD_F32_ULPS = 256
# do_bench's warm-up and repetition (ms): about 60 calls of a 0.35 ms kernel per candidate.
BENCH_MS = {False: (5, 20), True: (2, 8)}
# A case waits this long at most for its candidates' compile jobs; after one timeout the workers are ignored.
PRECOMPILE_WAIT_S = 90.0
# --plan's estimate, not measured on a GPU: seconds per timed candidate (cubin load ~0.03, guard run and compare
# ~0.01, do_bench ~0.03: 5 + 10 + 40 calls of ~0.5 ms, an L2 flush each), per case (inputs, reference, the
# default's second timing), and per compiled kernel (measured without a GPU: sm_90 compiles of 26 candidate kernels
# through Triton 3.9 took 0.2-2.6 s, mean 0.5 s, on a 2-core machine; the workers run in parallel).
EST_RUN_S = 0.08
EST_CASE_S = 0.3
EST_COMPILE_S = 0.5


class Profile(NamedTuple):
    """Candidate blocks per device: CUDA's span the tables' range; the interpreter's are tiny."""

    row_tiles: tuple[int, ...]  # whole-row tiles BLOCK_M * BLOCK_N (elements) for a contiguous row
    big_row_tile: int | None  # one more whole-row tile for 2-byte inputs
    chunks: tuple[int, ...]  # BLOCK_N of the looped / split passes over a contiguous row
    per_thread: tuple[int, ...]  # elements per thread: num_warps = tile / (32 * per_thread)
    strided_bm: tuple[int, ...]  # neighbouring rows per program (the contiguous axis) for a non-last dim
    strided_bn: tuple[int, ...]
    strided_tiles: tuple[int, int]  # smallest and largest BLOCK_M * BLOCK_N for a non-last dim
    strided_per_thread: tuple[int, ...]
    ce_blocks: tuple[int, ...]
    ce_per_thread: tuple[int, ...]


PROFILES = {
    # One, two or four 16-byte bf16 vectors per thread; 32768 elements over 32 warps for one bf16 row of 32768.
    "cuda": Profile(row_tiles=(1024, 2048, 4096, 8192, 16384), big_row_tile=32768, chunks=(2048, 4096, 8192, 16384),
                    per_thread=(8, 16, 32), strided_bm=(16, 32, 64, 128), strided_bn=(64, 128, 256, 512, 1024),
                    strided_tiles=(2048, 16384), strided_per_thread=(8, 16), ce_blocks=(2048, 4096, 8192, 16384, 32768),
                    ce_per_thread=(8, 16, 32)),
    # The interpreter's time grows with programs x chunks: few of each.
    "cpu": Profile(row_tiles=(256, 1024), big_row_tile=None, chunks=(128,), per_thread=(8,), strided_bm=(4,),
                   strided_bn=(64,), strided_tiles=(256, 1024), strided_per_thread=(8,), ce_blocks=(256,),
                   ce_per_thread=(8,)),
}


@dataclass(frozen=True)
class Case:
    family: str  # "softmax" (softmax / log_softmax, forward or backward) or "cross_entropy"
    op: str  # "softmax", "log_softmax" or "cross_entropy"
    direction: str  # "fwd", "bwd", or "fwd+bwd" (cross-entropy's fused path)
    dtype: str  # "bf16" or "fp32"
    layout: str  # "last", "non-last" (dim 0 of an (N, M) tensor) or "rows" (cross-entropy's (M, V))
    M: int
    N: int  # the reduced length (V for cross-entropy)

    @property
    def label(self) -> str:
        return f"{self.op} {self.direction} {self.dtype} {self.layout} M={self.M} N={self.N}"

    def ideal_bytes(self) -> int:
        dt = DTYPES[self.dtype]
        if self.family == "cross_entropy":
            return harness.ideal_bytes("cross_entropy", "fwd+bwd", self.M, self.N, dt)
        fwd = harness.ideal_bytes(self.op, "fwd", self.M, self.N, dt)
        return fwd if self.direction == "fwd" else harness.ideal_bytes(self.op, "fwd+bwd", self.M, self.N, dt) - fwd


def plan_cases(device: str, quick: bool) -> list[Case]:
    """Every case, most important first (the budget may end the sweep anywhere)."""
    cpu = device != "cuda"
    dtypes = ("bf16",) if quick else ("bf16", "fp32")
    ns = CPU_NS if cpu else (QUICK_NS if quick else NS)
    ce_shapes = (CPU_CE_SHAPES[:1] if quick else CPU_CE_SHAPES) if cpu else (QUICK_CE_SHAPES if quick else CE_SHAPES)

    def softmax(dtype: str, layout: str, these_ns) -> list[Case]:
        elements = CPU_ELEMENTS[dtype] if cpu else SOFTMAX_DTYPES[dtype][1]
        return [Case("softmax", op, direction, dtype, layout, elements // n, n)
                for n in these_ns for direction in ("fwd", "bwd") for op in ("softmax", "log_softmax")]

    def ce(dtype: str) -> list[Case]:
        return [Case("cross_entropy", "cross_entropy", "fwd+bwd", dtype, "rows", m, v) for m, v in ce_shapes]

    cases: list[Case] = []
    for dtype in dtypes:
        cases += ce(dtype) + softmax(dtype, "last", ns)
    for dtype in dtypes:
        cases += softmax(dtype, "non-last", ns[:1] if quick else ns)
    return cases


# ------------------------------------------------------------------------------------------------ candidates
def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _warp_choices(tile: int, per_thread: tuple[int, ...]) -> list[int]:
    return sorted({max(1, min(32, tile // (32 * p))) for p in per_thread if _pow2(max(1, tile // (32 * p)))})


def _softmax_key(cfg) -> tuple:
    return (cfg.regime, cfg.BLOCK_M, cfg.BLOCK_N, cfg.split, cfg.num_warps)


def _softmax_spec(cfg) -> dict:
    """force_softmax arguments that resolve to ``cfg`` whatever the number of rows."""
    return dict(regime=cfg.regime, block_n=cfg.BLOCK_N, block_m=cfg.BLOCK_M, split=cfg.split,
                num_warps=cfg.num_warps)


def _softmax_geometry(case: Case) -> tuple[int, int, int, bool]:
    """(R, N, element size, strided) as triton/softmax.py passes them to softmax_config."""
    return case.M, case.N, DTYPES[case.dtype].itemsize, case.layout == "non-last" and case.N > 1


def _resolve(case: Case, device: torch.device, spec: dict | None):
    """The config the kernels take for ``case`` under ``spec`` (None: the table's default)."""
    from logitkit.triton import _tuning

    with _force(case, spec):
        if case.family == "cross_entropy":
            return _tuning.cross_entropy_config(case.N, device.type)
        # a non-last case is dim 0 of an (N, M) tensor: K = M, adjacent rows, as triton/softmax.py's _config sees it
        return _tuning.softmax_config(*_softmax_geometry(case), device, vector_rows=case.M % 16 == 0)


def _reverse(case: Case, device: torch.device, spec: dict | None, cfg) -> bool:
    """The second-pass order the launchers take for ``case`` under ``spec`` with config ``cfg``."""
    from logitkit.triton import _tuning

    elem = DTYPES[case.dtype].itemsize
    with _force(case, spec):
        if case.family == "cross_entropy":
            return _tuning.cross_entropy_reverse(case.M, case.N, cfg[0], cfg[1], elem, device)
        # forward reads x; backward y and g (triton/softmax.py's launchers)
        return _tuning.softmax_reverse(cfg, case.M, case.N, elem * (1 if case.direction == "fwd" else 2), device)


def resolved_config(case: Case, device: torch.device, spec: dict | None) -> dict:
    """config_dict of what ``case`` runs under ``spec``: blocks, warps and second-pass order."""
    cfg = _resolve(case, device, spec)
    return config_dict(case, cfg, _reverse(case, device, spec, cfg))


def _pinned(case: Case, device: torch.device, spec: dict | None) -> dict:
    """``spec`` (None: the default's config) forced in full, its second-pass order included, so that a compile
    worker's 16-row copy of the case (whose model order may differ) builds the kernel the full case launches."""
    full = dict(spec) if spec else _full_spec(case, device)
    if "reverse" not in full:
        full["reverse"] = resolved_config(case, device, spec)["reverse"]
    return full


def _chunked(R: int, block_m: int, sms: int) -> tuple[str | None, ...]:
    """Regimes to try for chunked rows: None (the table's split rule, which splits rows when the row blocks are
    fewer than it wants programs) and, when the row blocks alone fill every multiprocessor once, "loop" (no split)."""
    return ("loop", None) if -(-R // block_m) >= sms else (None,)


def _softmax_candidates(case: Case, device: torch.device, prof: Profile) -> list[dict]:
    from logitkit.triton import _tuning

    R, N, elem, strided = _softmax_geometry(case)
    sms = max(1, _tuning.target_programs(device) // _tuning.SOFTMAX_PROGRAMS_PER_SM)
    n2, r2 = 1 << (N - 1).bit_length(), 1 << (R - 1).bit_length()
    specs: list[dict] = []
    if not strided:
        tiles = prof.row_tiles + ((prof.big_row_tile,) if prof.big_row_tile and elem == 2 else ())
        for tile in tiles:  # the whole row in registers, tile // n2 rows per program
            if tile >= n2 and tile // n2 <= r2:
                specs += [dict(regime="row", block_m=tile // n2, num_warps=w)
                          for w in _warp_choices(tile, prof.per_thread)]
        for bn in prof.chunks:  # chunks of one row
            if bn < n2:
                specs += [dict(regime=regime, block_n=bn, block_m=1, num_warps=w)
                          for w in _warp_choices(bn, prof.per_thread) for regime in _chunked(R, 1, sms)]
    else:
        lo, hi = prof.strided_tiles
        for bm in prof.strided_bm:
            if bm > r2:
                continue
            if lo <= bm * n2 <= hi:
                specs += [dict(regime="row", block_m=bm, num_warps=w)
                          for w in _warp_choices(bm * n2, prof.strided_per_thread)]
            for bn in prof.strided_bn:
                if bn < n2 and lo <= bm * bn <= hi:
                    specs += [dict(regime=regime, block_n=bn, block_m=bm, num_warps=w)
                              for w in _warp_choices(bm * bn, prof.strided_per_thread)
                              for regime in _chunked(R, bm, sms)]
    default = _resolve(case, device, None)
    if default.regime == "split":  # few rows: half and twice the table's segments
        for split in (max(2, default.split // 2), default.split * 2):
            specs.append(dict(_softmax_spec(default), split=split))
    seen = {_softmax_key(default)}
    out: list[dict | None] = [None]
    for spec in specs:
        cfg = _resolve(case, device, spec)
        if spec["regime"] is None and cfg.regime == "row":  # the table's rule took the whole row: not a new candidate
            continue
        if _softmax_key(cfg) in seen:
            continue
        full = _softmax_spec(cfg)
        if _softmax_key(_resolve(case, device, full)) != _softmax_key(cfg):  # forced in full it must be itself
            continue  # (never seen: tests/test_tune.py checks the plan) rather than time a config it does not name
        seen.add(_softmax_key(cfg))
        out.append(full)
    if default.regime != "row":  # the default with the other second-pass order
        out.append(dict(_softmax_spec(default), reverse=not _reverse(case, device, None, default)))
    return out


def _ce_candidates(case: Case, device: torch.device, prof: Profile) -> list[dict | None]:
    default = _resolve(case, device, None)
    out: list[dict | None] = [None]
    for block in prof.ce_blocks:
        for w in _warp_choices(block, prof.ce_per_thread):
            if (block, w) != tuple(default):
                out.append(dict(block_v=block, num_warps=w, exact=True))
    if case.N > default[0]:  # looped rows: the default with the other second-pass order
        out.insert(1, dict(block_v=default[0], num_warps=default[1], exact=True,
                           reverse=not _reverse(case, device, None, default)))
    return out


def candidates(case: Case, device: torch.device, quick: bool) -> list[dict | None]:
    """None (the table's default, unforced) first, then forced specs, each a distinct config."""
    prof = PROFILES["cuda" if device.type == "cuda" else "cpu"]
    specs = (_ce_candidates if case.family == "cross_entropy" else _softmax_candidates)(case, device, prof)
    if quick and len(specs) > 1 + QUICK_CANDIDATES:  # the order experiment, then picks spread over the rest
        flipped = [s for s in specs[1:] if "reverse" in s]  # the order experiment stays
        rest = [s for s in specs[1:] if "reverse" not in s]
        picks = max(1, QUICK_CANDIDATES - len(flipped))
        specs = [None] + flipped + [rest[round(i * (len(rest) - 1) / max(1, picks - 1))] for i in range(picks)]
    return specs


def config_dict(case: Case, cfg, reverse: bool = False) -> dict:
    if case.family == "cross_entropy":
        return {"BLOCK_V": cfg[0], "num_warps": cfg[1], "reverse": reverse}
    return {"regime": cfg.regime, "BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "split": cfg.split,
            "segment": cfg.segment, "num_warps": cfg.num_warps, "reverse": reverse}


def config_label(config: dict) -> str:
    order = " R" if config.get("reverse") else ""
    if "BLOCK_V" in config:
        return f"V{config['BLOCK_V']} w{config['num_warps']}{order}"
    split = f" s{config['split']}" if config["split"] > 1 else ""
    return f"{config['regime']} {config['BLOCK_M']}x{config['BLOCK_N']}{split} w{config['num_warps']}{order}"


def _compile_key(case: Case, config: dict) -> tuple:
    """What makes a distinct compiled kernel (approximately): kernel, dtype, layout, constexprs, warps."""
    if case.family == "cross_entropy":
        return (case.family, case.dtype, config["BLOCK_V"], case.N <= config["BLOCK_V"], config["num_warps"],
                config["reverse"])
    s = config["split"]
    return (case.direction, case.op, case.dtype, case.layout, config["regime"], config["BLOCK_M"], config["BLOCK_N"],
            1 << (s - 1).bit_length() if s > 1 else 1, config["num_warps"], config["reverse"])


# ------------------------------------------------------------------------------------------------ running
@contextlib.contextmanager
def _force(case: Case, spec: dict | None):
    from logitkit.triton import _tuning

    if spec is None:
        yield
    elif case.family == "cross_entropy":
        with _tuning.force_cross_entropy(**spec):
            yield
    else:
        with _tuning.force_softmax(**spec):
            yield


def _io(case: Case, device: str, rows: int | None = None, compile_only: bool = False):
    """(step, outputs) of ``case`` on fresh random inputs; ``rows`` replaces M (the compile workers' copies);
    ``compile_only``: no values are needed (nothing is launched), the backward's y is left unset."""
    from logitkit.triton import cross_entropy as ce
    from logitkit.triton import softmax as sm

    M = rows or case.M
    dt = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.label.encode()))
    new = torch.empty if compile_only else lambda *s, **kw: torch.randn(*s, generator=gen, **kw)
    if case.family == "cross_entropy":
        x = new((M, case.N), dtype=dt, device=device)
        t = torch.randint(0, case.N, (M,), device=device, generator=gen)
        f32 = dict(dtype=torch.float32, device=device)
        loss, lse, dx = torch.empty(M, **f32), torch.empty(M, **f32), torch.empty_like(x)
        denom = torch.full((1,), float(M), **f32)  # reduction 'mean', no ignored rows: the sum of target weights

        def ce_step():
            ce.ce_fwd_out(x, t, loss=loss, lse=lse, dx=dx, denom=denom)

        return ce_step, [loss, lse, dx]
    shape, dim = ((M, case.N), 1) if case.layout == "last" else ((case.N, M), 0)
    log = case.op == "log_softmax"
    x = new(shape, dtype=dt, device=device)
    out = torch.empty_like(x)
    if case.direction == "fwd":
        def fwd_step():
            sm.softmax_fwd_out(x, dim, log=log, out=out)

        return fwd_step, [out]
    y = x if compile_only else sm.softmax_fwd(x, dim, log=log)  # the table's forward: a real softmax output
    g = new(shape, dtype=dt, device=device)

    def bwd_step():
        sm.softmax_bwd_out(y, g, dim, log=log, out=out)

    return bwd_step, [out]


def _rows_view(t: torch.Tensor, case: Case) -> torch.Tensor:
    """The (rows, reduced length) view of an output; per-row fp32 vectors as (M, 1)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    return t.t() if case.layout == "non-last" else t


def guard(outs: list[torch.Tensor], refs: list[torch.Tensor], case: Case) -> dict:
    """The candidate's outputs against the default's (module docstring), chunks of rows at a time.

    ``max_rel_err[i]``: the largest |got - want| over the largest finite |want| of its row, output i (per-row fp32
    vectors count each entry as its own row); ``tol[i]``: its bound; ``nonfinite_mismatch``: entries where either
    side is not finite and they differ."""
    rels, tols = [], []
    bad = torch.zeros((), dtype=torch.int64, device=outs[0].device)
    differ = torch.zeros((), dtype=torch.int64, device=outs[0].device)
    for got, want in zip(outs, refs, strict=True):
        tols.append(max(GUARD_ULPS * torch.finfo(got.dtype).eps, GUARD_F32_ULPS * torch.finfo(torch.float32).eps))
        worst = torch.zeros((), dtype=torch.float32, device=got.device)
        gv, wv = _rows_view(got, case), _rows_view(want, case)
        step = max(1, (1 << 24) // gv.shape[1])
        for r0 in range(0, gv.shape[0], step):
            a, b = gv[r0:r0 + step].float(), wv[r0:r0 + step].float()
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
            finite = torch.isfinite(a) & torch.isfinite(b)
            bad += (~same & ~finite).sum()
            differ += (~same).sum()
            scale = torch.where(torch.isfinite(b), b.abs(), 0.0).amax(dim=1, keepdim=True).clamp_min(1e-30)
            worst = torch.maximum(worst, torch.where(same | ~finite, 0.0, (a - b).abs() / scale).amax())
        rels.append(worst)
    rel = [float(r) for r in rels]
    n_bad = int(bad)
    return {"ok": n_bad == 0 and all(r <= t for r, t in zip(rel, tols, strict=True)), "max_rel_err": rel,
            "tol": tols, "nonfinite_mismatch": n_bad, "bitwise_equal": int(differ) == 0}


@contextlib.contextmanager
def _captured_kernels():
    """The compiled kernels launched inside the block (registers and spills per kernel); none in the interpreter."""
    seen: list = []
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield seen
        return
    orig = JITFunction.run

    def run(self, *args, **kwargs):
        k = orig(self, *args, **kwargs)
        seen.append(k)
        return k

    JITFunction.run = run
    try:
        yield seen
    finally:
        JITFunction.run = orig


def _resources(kernels: list) -> list[dict]:
    out = []
    for k in kernels:
        meta = getattr(k, "metadata", None)
        if meta is None:
            continue
        out.append({"kernel": getattr(meta, "name", None), "num_warps": getattr(meta, "num_warps", None),
                    "regs": getattr(k, "n_regs", None), "spills": getattr(k, "n_spills", None),
                    "shared": getattr(meta, "shared", None)})
    return out


def _now() -> float:
    """The budget's clock (tests replace it)."""
    return time.monotonic()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, device: str, quick: bool) -> dict:
    if device == "cuda":
        from triton.testing import do_bench

        warmup, rep = BENCH_MS[quick]
        median, p20, p80 = do_bench(step, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    # the interpreter (this code's CPU check, not a measurement): one call, the guard run was the warm-up
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1e3
    return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}


def _cuda_ok(device: str) -> bool:
    if device != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception:  # noqa: BLE001 - a sticky CUDA error: the context is gone
        return False
    return True


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


# ------------------------------------------------------------------------------------------------ compile workers
def _worker_init() -> None:
    """Compile-worker start: launches become compile-only (JITFunction.run forced to warmup=True)."""
    torch.set_num_threads(1)
    from triton.runtime.jit import JITFunction

    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return orig(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = run


def _compile_job(job: tuple[str, dict, dict]) -> str | None:
    """Compile one candidate of one case into Triton's on-disk cache; the error, if any.  (Under the interpreter,
    where nothing compiles, it runs the kernels: a test of this machinery.)"""
    device, case_fields, spec = job
    case = Case(**case_fields)
    try:
        step, _ = _io(case, device, rows=16, compile_only=True)  # 16 rows: the specialisation of M rows
        with _force(case, spec):
            step()
    except Exception as exc:  # noqa: BLE001 - the timing process meets it again and records it
        return _error(exc)
    return None


class _Compiler:
    """Compile jobs in worker processes, submitted in the sweep's order; each case waits only for its own."""

    def __init__(self, jobs: int, device: str):
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init)
        self.device = device
        self.pending: dict[str, list] = {}
        self.healthy = True

    def submit(self, case: Case, specs: list[dict]) -> None:
        self.pending[case.label] = [self.pool.apply_async(_compile_job, ((self.device, asdict(case), s),))
                                    for s in specs]

    def wait(self, case: Case, deadline: float) -> dict:
        results = self.pending.pop(case.label, [])
        t0 = _now()
        for r in results:
            if self.healthy:
                r.wait(max(0.0, min(deadline, t0 + PRECOMPILE_WAIT_S) - _now()))
                if not r.ready():
                    self.healthy = _now() >= deadline  # a timeout before the deadline: stop trusting them
                    break
        done = [r for r in results if r.ready()]
        errors = sum(1 for r in done if not r.successful() or r.get() is not None)
        return {"waited_s": _now() - t0, "compiled": len(done), "of": len(results), "errors": errors}

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


# ------------------------------------------------------------------------------------------------ the sweep
def _row(case: Case, index: int, spec: dict | None, config: dict) -> dict:
    return {**asdict(case), "label": case.label, "candidate": index, "is_default": spec is None,
            "spec": spec, "config": config, "config_label": config_label(config)}


def _measure(case: Case, device: str, quick: bool, step, outs, refs, spec, row: dict, copy_tb_s: float) -> None:
    """Guard run, then timing, into ``row``; the default (``refs`` None) keeps its outputs as the reference."""
    with _force(case, spec):
        for o in outs:
            o.fill_(float("nan"))  # poison: an element no program writes fails the guard
        with _captured_kernels() as kernels:
            t0 = time.perf_counter()
            step()
            _sync(device)
            row["first_call_s"] = time.perf_counter() - t0  # compile or cache load included
        row["kernels"] = _resources(kernels)
        if refs is not None:
            row["check"] = guard(outs, refs, case)
            if not row["check"]["ok"]:
                return
        _timed(row, case, _time(step, device, quick), copy_tb_s)


def _timed(row: dict, case: Case, timing: dict, copy_tb_s: float) -> None:
    row.update(timing)
    row["tb_s"] = case.ideal_bytes() / (timing["median_ms"] * 1e-3) / 1e12
    row["frac_copy"] = row["tb_s"] / copy_tb_s if copy_tb_s else None


def sweep(device: str = "cuda", quick: bool = False, budget_s: float = 420.0, out: str | None = None,
          jobs: int = 0, only: list[str] | None = None, log=print) -> dict:
    start = _now()
    deadline = start + budget_s
    dev = torch.device(device)
    cases = [c for c in plan_cases(device, quick) if not only or any(s in c.label for s in only)]
    plan = [(c, candidates(c, dev, quick)) for c in cases]
    settings = {"quick": quick, "budget_s": budget_s, "jobs": jobs, "only": only,
                "do_bench_warmup_rep_ms": BENCH_MS[quick] if device == "cuda" else None,
                "guard_ulps": GUARD_ULPS, "guard_f32_ulps": GUARD_F32_ULPS}
    payload: dict = {"meta": harness.metadata(device), "benchmark": "tune", "settings": settings, "copy": None,
                     "rows": [], "cases": [], "status": {}, "proposal": {}}
    compiler = None
    if jobs > 0:
        try:
            compiler = _Compiler(jobs, device)
        except Exception as exc:  # noqa: BLE001 - the sweep runs without them, compiling as it goes
            log(f"no compile workers: {_error(exc)}")
        else:
            for case, specs in plan:  # the default too, forced in full: its config for 16 rows may differ
                compiler.submit(case, [_pinned(case, dev, spec) for spec in specs])
    n_cand = sum(len(s) for _, s in plan)
    log(f"tune: {len(cases)} cases, {n_cand} candidates, budget {budget_s:.0f} s, {jobs} compile workers")
    payload["copy"] = harness.copy_bandwidth(device, quick)
    copy_tb_s = payload["copy"]["tb_s"]
    log(f"copy {copy_tb_s:.3f} TB/s")
    stopped, aborted = None, None
    try:
        for ci, (case, specs) in enumerate(plan):
            if _now() >= deadline:
                stopped = f"budget spent before case {ci} of {len(plan)}"
                break
            info = {"label": case.label, "candidates": len(specs), "measured": 0}
            if compiler is not None:
                info["precompile"] = compiler.wait(case, deadline)
            t_case = _now()
            try:
                step, outs = _io(case, device)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: the next case may fit
                info["error"] = _error(exc)
                payload["cases"].append(info)
                aborted = None if _cuda_ok(device) else f"CUDA context broken by {case.label}: {info['error']}"
                if aborted:
                    break
                continue
            refs = None
            default_config = None
            for index, spec in enumerate(specs):
                if _now() >= deadline:
                    stopped = f"budget spent in case {ci} ({case.label}) at candidate {index} of {len(specs)}"
                    break
                config = resolved_config(case, dev, spec)
                if spec is None:
                    default_config = config
                row = _row(case, index, spec, config)
                try:
                    _measure(case, device, quick, step, outs, refs, spec, row, copy_tb_s)
                except Exception as exc:  # noqa: BLE001 - recorded; the next candidate runs
                    row["error"] = _error(exc)
                    if not _cuda_ok(device):
                        aborted = f"CUDA context broken by {case.label} {row['config_label']}: {row['error']}"
                payload["rows"].append(row)
                info["measured"] += 1
                if aborted:
                    break
                if spec is None:
                    if "median_ms" not in row:  # no reference to guard the candidates with
                        break
                    refs = [o.clone() for o in outs]
            if refs is not None and not aborted and _now() < deadline:
                again = _row(case, len(specs), None, default_config)
                again["repeat_of_default"] = True
                try:
                    _timed(again, case, _time(step, device, quick), copy_tb_s)
                except Exception as exc:  # noqa: BLE001
                    again["error"] = _error(exc)
                payload["rows"].append(again)
            info["seconds"] = _now() - t_case
            payload["cases"].append(info)
            del step, outs, refs
            if device == "cuda" and not aborted:
                torch.cuda.empty_cache()
            if stopped or aborted:
                break
            if out:
                _finish(payload, start, len(plan), stopped, aborted)
                _write(out, payload)
            log(f"[{_now() - start:6.1f}s] {case.label}: {info['measured']} measured")
    finally:
        if compiler is not None:
            compiler.close()
    _finish(payload, start, len(plan), stopped, aborted)
    if out:
        _write(out, payload)
    return payload


def _full_spec(case: Case, device: torch.device) -> dict:
    cfg = _resolve(case, device, None)
    reverse = _reverse(case, device, None, cfg)
    if case.family == "cross_entropy":
        return dict(block_v=cfg[0], num_warps=cfg[1], exact=True, reverse=reverse)
    return dict(_softmax_spec(cfg), reverse=reverse)


def _finish(payload: dict, start: float, n_cases: int, stopped: str | None, aborted: str | None) -> None:
    payload["status"] = {"elapsed_s": _now() - start, "cases_total": n_cases,
                         "cases_done": len(payload["cases"]), "stopped_early": bool(stopped or aborted),
                         "stopped": stopped, "aborted": aborted}
    payload["proposal"] = proposal(payload["rows"])


def _write(path: str, payload: dict) -> None:
    """Atomically, so that a run killed mid-write leaves the previous complete file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------------------ proposal
def _ok(row: dict) -> bool:
    return "median_ms" in row and not row.get("error") and row.get("check", {"ok": True})["ok"]


def _brief(row: dict) -> dict:
    return {"config": row["config"], "label": row["config_label"], "ms": row["median_ms"],
            "tb_s": row.get("tb_s"), "frac_copy": row.get("frac_copy")}


def proposal(rows: list[dict]) -> dict:
    """Per case the best config and the default's ratio to it; per table entry (group) the best for the sum."""
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["label"], []).append(r)
    cases = []
    for label, rs in by_case.items():
        first = [r for r in rs if r["is_default"] and not r.get("repeat_of_default")]
        repeat = [r for r in rs if r.get("repeat_of_default") and "median_ms" in r]
        tried = [r for r in rs if not r.get("repeat_of_default")]
        ok = [r for r in tried if _ok(r)]
        if not first or not _ok(first[0]) or not ok:
            cases.append({"label": label, "error": "no measured default"})
            continue
        default, best = first[0], min(ok, key=lambda r: r["median_ms"])
        noise = abs(repeat[0]["median_ms"] - default["median_ms"]) / default["median_ms"] if repeat else None
        gain = default["median_ms"] / best["median_ms"]
        cases.append({**{k: default[k] for k in ("family", "op", "direction", "dtype", "layout", "M", "N")},
                      "label": label, "default": _brief(default), "best": _brief(best), "default_over_best": gain,
                      "noise": noise, "significant": gain - 1 > max(0.02, 2 * (noise or 0.0)),
                      "measured": len(ok), "failed": len(tried) - len(ok)})
    order = []  # the model's second-pass order (the default) against the flipped one, per case
    for label, rs in by_case.items():
        model = [r for r in rs if r["is_default"] and not r.get("repeat_of_default") and _ok(r)]
        flipped = [r for r in rs if _flipped(r) and _ok(r)]
        if model and flipped:
            order.append({"label": label, "model_reverse": model[0]["config"]["reverse"],
                          "model_ms": model[0]["median_ms"], "flipped_ms": flipped[0]["median_ms"],
                          "model_over_flipped": model[0]["median_ms"] / flipped[0]["median_ms"]})
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        if "error" not in c:
            groups.setdefault((c["family"], c["dtype"], c["layout"], c["N"]), []).append(c)
    entries = []
    for (family, dtype, layout, N), cs in groups.items():
        labels = [c["label"] for c in cs]  # the sweep's order: forward softmax, log_softmax, then backward
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        configs: dict[str, dict] = {}
        for r in rows:  # blocks and warps (the table's part), each case in the model's order
            if r["label"] in labels and _ok(r) and not r.get("repeat_of_default") and not _flipped(r):
                key = _blocks_label(r["config"])
                totals[key] = totals.get(key, 0.0) + r["median_ms"]
                counts[key] = counts.get(key, 0) + 1
                configs[key] = {k: v for k, v in r["config"].items() if k != "reverse"}
        full = {k: v for k, v in totals.items() if counts[k] == len(cs)}  # measured in every case of the group
        default_label = _blocks_label(cs[0]["default"]["config"])
        if default_label not in full:
            continue
        best_label = min(full, key=full.get)
        entries.append({"family": family, "dtype": dtype, "layout": layout, "N": N, "M": cs[0]["M"],
                        "cases": labels, "default": {"config": configs[default_label], "label": default_label,
                                                             "total_ms": full[default_label]},
                        "best": {"config": configs[best_label], "label": best_label, "total_ms": full[best_label]},
                        "default_over_best": full[default_label] / full[best_label],
                        "per_case_best_total_ms": sum(c["best"]["ms"] for c in cs)})
    return {"cases": cases, "table_entries": entries, "order": order}


def _flipped(row: dict) -> bool:
    """The order experiment: the default's config with the other second-pass order (see candidates)."""
    return bool(row.get("spec")) and "reverse" in row["spec"]


def _blocks_label(config: dict) -> str:
    return config_label({k: v for k, v in config.items() if k != "reverse"})


def summary(payload: dict) -> str:
    lines = []
    st, copy = payload["status"], payload.get("copy") or {}
    lines.append(f"copy {copy.get('tb_s', float('nan')):.3f} TB/s; {len(payload['rows'])} rows, "
                 f"{st.get('cases_done')}/{st.get('cases_total')} cases in {st.get('elapsed_s', 0):.0f} s"
                 + (f"; STOPPED: {st['stopped']}" if st.get("stopped") else "")
                 + (f"; ABORTED: {st['aborted']}" if st.get("aborted") else ""))
    failed = [r for r in payload["rows"] if not _ok(r) and not r.get("repeat_of_default")]
    if failed:
        lines.append(f"{len(failed)} candidates failed (error or guard), e.g. {failed[0]['label']} "
                     f"{failed[0]['config_label']}: {failed[0].get('error') or failed[0].get('check')}")
    by_label = {c["label"]: c for c in payload["proposal"]["cases"] if "error" not in c}
    lines.append(f"{'table entry':32s} {'default':22s} {'ms':>8s}  {'best':22s} {'ms':>8s} {'x':>5s}  "
                 "each case's best as a fraction of copy (fwd sm, lsm; bwd sm, lsm)")
    for e in payload["proposal"]["table_entries"]:
        name = f"{e['family'][:7]} {e['dtype']} {e['layout']} N={e['N']}"
        fracs = " ".join(f"{by_label[lab]['best']['frac_copy']:.2f}" for lab in e["cases"]
                         if by_label[lab]["best"]["frac_copy"] is not None)
        lines.append(f"{name:32s} {e['default']['label']:22s} {e['default']['total_ms']:8.3f}  "
                     f"{e['best']['label']:22s} {e['best']['total_ms']:8.3f} {e['default_over_best']:5.2f}  {fracs}")
    for o in payload["proposal"].get("order", []):
        lines.append(f"order {o['label']}: model ({'reverse' if o['model_reverse'] else 'forward'}) "
                     f"{o['model_ms']:.3f} ms, flipped {o['flipped_ms']:.3f} ms, x{o['model_over_flipped']:.2f}")
    return "\n".join(lines)


def print_plan(device: str, quick: bool, sms: int, jobs: int, l2_mib: int = 50) -> dict:
    """Candidates per case and a time estimate, for a CUDA sweep on a machine without one (``sms`` multiprocessors,
    ``l2_mib`` MiB of L2)."""
    from unittest import mock

    from logitkit.triton import _tuning

    with mock.patch.object(_tuning, "_sm_count", lambda index: sms), \
            mock.patch.object(_tuning, "_l2_bytes", lambda index: l2_mib << 20):
        dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
        cases = plan_cases(device, quick)
        keys, n_runs, per_case = set(), 0, []
        for case in cases:
            specs = candidates(case, dev, quick)
            for spec in specs:
                keys.add(_compile_key(case, resolved_config(case, dev, spec)))
            n_runs += len(specs)
            per_case.append((case.label, len(specs)))
    # compile and timing overlap (workers run ahead); their plain sum is the conservative figure
    est = n_runs * EST_RUN_S + len(cases) * EST_CASE_S + len(keys) * EST_COMPILE_S / max(1, jobs)
    for label, n in per_case:
        print(f"{n:4d}  {label}")
    print(f"{len(cases)} cases, {n_runs} candidate runs, about {len(keys)} distinct kernels to compile; estimate "
          f"{est:.0f} s = {n_runs} x {EST_RUN_S} s + {len(cases)} x {EST_CASE_S} s + {len(keys)} x {EST_COMPILE_S} s"
          f" / {max(1, jobs)} workers")
    return {"cases": len(cases), "runs": n_runs, "compiles": len(keys), "estimate_s": est}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=None, help="JSON file (rewritten after every case)")
    ap.add_argument("--quick", action="store_true", help="a few shapes and candidates (CPU: under TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop cleanly after this many seconds")
    ap.add_argument("--jobs", type=int, default=None,
                    help="compile worker processes (CUDA; default: CPUs - 3, at most 12; 0: none; --plan: 12)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of case labels to keep")
    ap.add_argument("--plan", action="store_true", help="print candidates and a time estimate; run nothing")
    ap.add_argument("--sms", type=int, default=132, help="--plan: multiprocessors of the GPU to plan for")
    ap.add_argument("--l2-mib", type=int, default=50, help="--plan: L2 of the GPU to plan for (MiB)")
    args = ap.parse_args(argv)
    if args.plan:  # for the device machine's 16 cores unless told
        return print_plan(args.device, args.quick, args.sms, 12 if args.jobs is None else args.jobs, args.l2_mib)
    jobs = args.jobs if args.jobs is not None else max(0, min(12, (os.cpu_count() or 1) - 3))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (--plan needs none; --device cpu runs under TRITON_INTERPRET=1)")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        sys.exit("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    payload = sweep(args.device, args.quick, args.budget_s, args.out, jobs if args.device == "cuda" else args.jobs or 0,
                    only)
    print(summary(payload))
    if args.out:
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
