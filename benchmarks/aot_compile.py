"""Compile every logitkit Triton kernel specialisation for a CUDA target on a machine without a GPU (no launch).

    PYTHONPATH=src python -m benchmarks.aot_compile [arch=90] [gpu|cpu tables]     (without TRITON_INTERPRET)
    AOT_REVERSE=1 ...: every looped / split second pass in reverse order (_tuning.py "second-pass order")

A GPU-readiness check the interpreter cannot give: every kernel variant (dtypes, regimes, masks, every
cross-entropy option, the CUDA block/warp tables) goes through Triton's real compiler down to a cubin, and the
worst register/local-memory users are listed (local memory = spills or stack). The launchers are called with
CPU tensors while JITFunction.run is forced to warmup=True (compile, never launch) behind a fake driver that
reports the target. PTX and cubins land in $AOT_OUT (default: a temporary folder). Touches Triton internals
(driver, knobs); ran on Triton 3.6.0, 3.7.1, 3.8.0 and 3.9.0 (629 kernels on 3.9.0, 1-6 min on 2 cores).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver as _driver
from triton.runtime.jit import JITFunction

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET: this compiles"

if any(a in ("-h", "--help") for a in sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
ARCH = int(sys.argv[1]) if len(sys.argv) > 1 else 90
SIZES = sys.argv[2] if len(sys.argv) > 2 else "gpu"


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


_driver.set_active(FakeDriver())

COMPILED = {}
META = {}
_orig_run = JITFunction.run


def _run(self, *args, grid, warmup, **kwargs):
    k = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    if k is not None:
        COMPILED.setdefault(id(k), k)
        keys = ("LOG", "ONE_TILE", "PHASE", "BLOCK_M", "BLOCK_N", "BLOCK_V", "HAS_MASK", "SINGLE", "HAS_SUMS",
                "HAS_ENT", "REVERSE", "RESIDENT")
        flags = {n: v for n, v in kwargs.items() if n in keys}
        META.setdefault(id(k), f"{getattr(args[0], 'dtype', '?')} {flags}")
    return k


JITFunction.run = _run

from logitkit.triton import _tuning  # noqa: E402
from logitkit.triton import cross_entropy as ce  # noqa: E402
from logitkit.triton import linear_cross_entropy as lce  # noqa: E402
from logitkit.triton import softmax as sm  # noqa: E402

if SIZES == "gpu":  # the CUDA tables (BLOCK_V 16384 / 16 warps, 132 SMs), not the interpreter's
    ce._block_config = lambda V, device_type: _tuning.cross_entropy_config(V, "cuda")
    lce._block_config = ce._block_config
    _tuning.target_programs = lambda device: 132 * _tuning.SOFTMAX_PROGRAMS_PER_SM
sm._arrive_first = lambda cfg, x: False  # the launchers' tensors are CPU ones: compile the GPU's single launch
if os.environ.get("AOT_REVERSE", "0") not in ("", "0"):  # the launchers' tensors are CPU ones: forward otherwise
    _tuning.softmax_reverse = lambda cfg, R, N, read_bytes, device: cfg.regime != "row"
    _tuning.cross_entropy_reverse = lambda M, V, block_v, num_warps, read_bytes, device: V > block_v

t0 = time.time()
g = torch.Generator().manual_seed(0)
DT = [torch.float16, torch.bfloat16, torch.float32]

# softmax family: row / loop / split, log or not, mask or not, last and non-last dim, lse fwd/bwd, bwd
for dt in DT:
    for shape, dim, _n in (((4, 100), 1, 100), ((4, 300000), 1, 300000), ((2, 20000), 1, 20000),
                          ((64, 5000, 3), 1, 5000), ((4, 5000, 16), 1, 5000), ((3, 7, 2), 1, 7)):
        x = torch.randn(shape, dtype=dt)
        m = x > -1
        for mask in (None, m):
            for log in (False, True):
                y = sm.softmax_fwd(x, dim, mask=mask, log=log)
                sm.softmax_bwd(y, torch.randn_like(y), dim, mask=mask, log=log)
            lse = sm.logsumexp_fwd(x, dim, mask=mask)
            sm.logsumexp_bwd(x, lse, torch.ones_like(lse), dim, mask=mask)
    # the resident regime at the table's tiles (16384 / 8192 contiguous, 16 x 1024 / 16 x 512 strided, the
    # scalar strided tile): one launch each, the GPU's (not the interpreter's arrive-first launch)
    with _tuning.force_softmax("resident"):
        for shape, dim in (((4, 300000), 1), ((4, 5000, 16), 1), ((64, 5000, 3), 1)):
            x = torch.randn(shape, dtype=dt)
            for mask in (None, x > -1):
                for log in (False, True):
                    y = sm.softmax_fwd(x, dim, mask=mask, log=log)
                    sm.softmax_bwd(y, torch.randn_like(y), dim, mask=mask, log=log)
                lse = sm.logsumexp_fwd(x, dim, mask=mask)
                sm.logsumexp_bwd(x, lse, torch.ones_like(lse), dim, mask=mask)
    for regime in ("row", "loop", "split", "resident"):
        with _tuning.force_softmax(regime, block_n=64):
            x = torch.randn(5, 300, dtype=dt)
            for log in (False, True):
                y = sm.softmax_fwd(x, 1, log=log)
                sm.softmax_bwd(y, torch.randn_like(y), 1, log=log)
            lse = sm.logsumexp_fwd(x, 1)
            sm.logsumexp_bwd(x, lse, torch.ones_like(lse), 1)

# cross-entropy family: single block and looped rows, every option
for dt in DT:
    for V in (1000, 128256):
        x = torch.randn(3, V, dtype=dt)
        t = torch.tensor([0, 5, -100])
        w = torch.rand(V, dtype=dt)
        for kw in (dict(), dict(weight=w), dict(label_smoothing=0.1), dict(weight=w, label_smoothing=0.1),
                   dict(z_loss=1e-4), dict(softcap=30.0), dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)):
            ce.ce_fwd(x, t, **kw)
            ce.ce_fwd(x, t, with_grad=True, with_entropy=True, grad_scale=torch.ones(3),
                      denom=torch.ones(1), **kw)
            ce.ce_bwd(x, t, torch.ones(1), **kw)
        y = torch.softmax(torch.randn(3, V), 1).to(dt)
        for kw in (dict(), dict(weight=w, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)):
            ce.ce_prob_fwd(x, y, **kw)
            ce.ce_prob_fwd(x, y, with_grad=True, with_entropy=True, grad_scale=torch.ones(3), denom=torch.ones(1),
                           **kw)
        idx = torch.randint(0, V, (3, 4))
        out, a, r = ce.selective_fwd(x, idx)
        ce.selective_bwd(x, idx, torch.randn(3, 4), a, r)
        h, a, r = ce.entropy_fwd(x)
        ce.entropy_bwd(x, torch.randn(3), h, a, r)
        ce.grad_scale_(x.clone(), torch.full((1,), 2.0))

# linear cross-entropy vocab blocks: one-tile and looped blocks, pass 1 with / without sums and entropy, pass 2
for dt in DT:
    for n in (1000, 32768):
        x = torch.randn(3, n, dtype=dt)
        t = torch.tensor([0, 5, -100])
        w = torch.rand(2 * n, dtype=dt)
        col = [torch.zeros(3, dtype=torch.float64) for _ in range(6)]
        row = dict(a=torch.zeros(3), R=torch.ones(3), L=torch.zeros(3), lse=torch.zeros(3), grad_rows=torch.ones(3))
        for kw in (dict(), dict(weight=w), dict(softcap=30.0)):
            for sums, ent in ((False, False), (True, False), (False, True), (True, True)):
                lce.lce_stats_fwd_out(x, n, t, a=col[0], r=col[1], s=col[2] if sums else None,
                                      u=col[3] if sums else None, e=col[4] if ent else None, xt=col[5], **kw)
            for extra in (dict(), dict(label_smoothing=0.1, z_loss=1e-4)):
                lce.lce_grad_bwd_out(x.clone(), n, 2 * n, t, **row, **kw, **extra)

t1 = time.time()
from triton import knobs  # noqa: E402

cuobjdump = knobs.nvidia.cuobjdump.path
out_dir = os.environ.get("AOT_OUT") or tempfile.mkdtemp(prefix="logitkit-aot-")
os.makedirs(out_dir, exist_ok=True)
worst = []
for i, k in enumerate(COMPILED.values()):
    name = k.metadata.name
    assert "cubin" in k.asm, (name, list(k.asm))
    with open(os.path.join(out_dir, f"{i}_{name}.ptx"), "w") as f:
        f.write(k.asm["ptx"])
    cub = os.path.join(out_dir, f"{i}_{name}.cubin")
    with open(cub, "wb") as f:
        f.write(k.asm["cubin"])
    info = subprocess.run([cuobjdump, "--dump-resource-usage", cub], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", info).group(1))
    stack = int(re.search(r"STACK:(\d+)", info).group(1))
    spill = stack  # local memory per thread (spills and stack frame)
    worst.append((spill, stack, regs, name, k.metadata.num_warps, k.metadata.target.arch, META[id(k)]))
worst.sort(reverse=True)
print(f"triton {triton.__version__}: {len(COMPILED)} kernels compiled to cubin for sm_{ARCH} "
      f"({SIZES} tables) in {t1 - t0:.0f}s")
for row in worst[:int(os.environ.get('AOT_TOP', 15))]:
    spill, stack, regs, name, warps, arch, meta = row
    print(f"local bytes {spill:6d}  stack {stack:6d}  regs {regs:3d}  {name}  warps={warps}  sm_{arch}  {meta}")
print("kernels with local memory (spills):", sum(1 for w in worst if w[0] > 0))
