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
import os

import torch
import torch.nn.functional as F

SHAPES = [(8192, 32768), (8192, 128256), (4096, 262144)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _providers():
    import logitkit

    # logitkit first: a run cut short by its budget keeps the numbers that matter most
    out = {
        "logitkit": lambda x, t: logitkit.cross_entropy(x, t),
        "torch": lambda x, t: F.cross_entropy(x, t),
        "torch_compile": torch.compile(lambda x, t: F.cross_entropy(x, t)),
    }
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        out["liger"] = lambda x, t: liger_cross_entropy(x, t)
    except ImportError:
        print("liger_kernel not importable: column skipped")
    out["torch_float"] = lambda x, t: F.cross_entropy(x.float(), t)
    return out


# Run order: the issue's headline shape first, bf16 (the targets' dtype) before fp32.
SHAPE_PRIORITY = [(8192, 128256), (4096, 262144), (8192, 32768)]


def cases(quick: bool = False) -> list[tuple[str, int, int]]:
    shapes = [(1024, 32768)] if quick else SHAPE_PRIORITY
    return [(d, M, V) for d in DTYPES for M, V in shapes]


def _copy_tbps(do_bench) -> float:
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 2 / ms / 1e9


def _measure(fn, x, t, do_bench) -> tuple[float, float, float, int]:
    def step():
        x.grad = None
        fn(x, t).backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    # beyond the logits (already counted in base) and their gradient, which stays allocated
    peak = torch.cuda.max_memory_allocated() - base - x.numel() * x.element_size()
    q = sorted(do_bench(step, return_mode="all"))
    return q[len(q) // 2], q[len(q) // 5], q[4 * len(q) // 5], peak


def run(quick: bool = False, budget_s: float | None = None, on_row=None) -> dict:
    """Every case while ``budget_s`` lasts (see benchmarks.harness.Deadline); ``on_row(payload)`` after each row."""
    from triton.testing import do_bench

    from benchmarks import harness

    deadline = harness.Deadline(budget_s)
    todo = cases(quick)
    copy = _copy_tbps(do_bench)
    rows = []
    payload = {"meta": harness.metadata("cuda"), "benchmark": "cross_entropy_gpu", "copy_tb_s": copy, "rows": rows,
               "truncated": None}
    providers = _providers()
    while todo and not deadline.expired():
        dname, M, V = todo.pop(0)
        dt = DTYPES[dname]
        x = torch.randn(M, V, device="cuda", dtype=dt).requires_grad_()
        t = torch.randint(0, V, (M,), device="cuda")
        for name, fn in providers.items():
            try:
                med, p20, p80, peak = _measure(fn, x, t, do_bench)
            except Exception as e:  # a provider that fails (e.g. out of memory) leaves its cell empty
                rows.append(dict(provider=name, dtype=dname, M=M, V=V, error=f"{type(e).__name__}: {e}"[:300]))
                torch.cuda.empty_cache()
                continue
            # ideal bytes: read the logits once + write their gradient once
            tbps = 2 * M * V * x.element_size() / med / 1e9
            rows.append(dict(provider=name, dtype=dname, M=M, V=V, median_ms=med, p20_ms=p20, p80_ms=p80,
                             tb_s=tbps, frac_copy=tbps / copy, extra_peak_bytes=peak))
            print(f"{name:16s} {dname} {M:5d}x{V:6d} {med:8.3f} ms {tbps:5.2f} TB/s {tbps / copy:5.2f}x copy "
                  f"extra {peak / 2**20:8.1f} MiB", flush=True)
            if on_row is not None:
                on_row(payload)
        x.grad = None
        del x, t
    payload["truncated"] = deadline.truncation(todo)
    return payload


def main() -> None:
    from benchmarks import harness

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    args = ap.parse_args()
    path = os.path.join(args.out, f"gpu_cross_entropy-{datetime.date.today().isoformat()}.json")
    payload = run(args.quick, args.budget_s, on_row=lambda p: harness.write_json(path, p))
    harness.write_json(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
