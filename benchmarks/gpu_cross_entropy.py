"""GPU benchmark: cross-entropy forward+backward, (M, V) logits, bf16 and fp32 (issue 4).

Ideal bytes (forward+backward): read the logits once + write the gradient once = 2 * M * V * elem_size
(targets and per-row fp32 outputs are < 0.1% and not counted).  Reported: median ms (p20/p80), TB/s from the
ideal bytes, fraction of a device-to-device copy measured in the same run, and peak memory beyond logits +
gradient.  Columns: torch eager, torch eager on .float() logits, torch.compile, Liger (when importable),
logitkit.  Usage on the GPU machine:  PYTHONPATH=src python3 -m benchmarks.gpu_cross_entropy [--out DIR]
Not yet run: no GPU in the session that wrote it (GPU numbers remain to be taken).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.nn.functional as F

SHAPES = [(8192, 32768), (8192, 128256), (4096, 262144)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _providers():
    import logitkit

    out = {
        "torch": lambda x, t: F.cross_entropy(x, t),
        "torch_float": lambda x, t: F.cross_entropy(x.float(), t),
        "torch_compile": torch.compile(lambda x, t: F.cross_entropy(x, t)),
        "logitkit": lambda x, t: logitkit.cross_entropy(x, t),
    }
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        out["liger"] = lambda x, t: liger_cross_entropy(x, t)
    except ImportError:
        print("liger_kernel not importable: column skipped")
    return out


def _copy_tbps(do_bench) -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 2 / ms / 1e9


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    copy = _copy_tbps(do_bench)
    rows = []
    for name, fn in _providers().items():
        if fn is None:
            continue
        for dname, dt in DTYPES.items():
            for M, V in SHAPES:
                x = torch.randn(M, V, device="cuda", dtype=dt).requires_grad_()
                t = torch.randint(0, V, (M,), device="cuda")

                def step():
                    x.grad = None
                    fn(x, t).backward()

                try:
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    step()
                    peak = torch.cuda.max_memory_allocated() - base - x.numel() * x.element_size()
                    q = do_bench(step, return_mode="all")
                    q = sorted(q)
                    med, p20, p80 = q[len(q) // 2], q[len(q) // 5], q[4 * len(q) // 5]
                except Exception as e:  # a provider that fails (e.g. out of memory) leaves its cell empty
                    print(f"{name} {dname} {M}x{V}: {type(e).__name__}: {e}")
                    continue
                tbps = 2 * M * V * x.element_size() / med / 1e9
                rows.append(dict(provider=name, dtype=dname, M=M, V=V, ms=med, p20=p20, p80=p80, tbps=tbps,
                                 frac_copy=tbps / copy, extra_peak_bytes=peak))
                print(f"{name:16s} {dname} {M:5d}x{V:6d} {med:8.3f} ms {tbps:5.2f} TB/s {tbps / copy:5.2f}x copy "
                      f"extra {peak / 2**20:8.1f} MiB")
                del x
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                copy_tbps=copy)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_cross_entropy.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
