"""GPU benchmark of the softmax family (issue 3): TB/s from ideal bytes and as a fraction of a copy.

Shapes: M*N = 2**28 elements (bf16; 2**27 fp32), N in {256, 1024, 4096, 32768, 131072, 262144, 1048576}, the
softmax dim last and (as a (N, M) tensor reduced over dim 0) not last.  Modes: forward (bytes: read x + write
y) and forward+backward (5 passes: read x, write y, read y, read dy, write dx).  Providers: torch eager,
torch.compile, Liger (when importable; it refuses N > 65536), logitkit.  The copy ceiling is measured in the
same run.  Run on the GPU machine:  PYTHONPATH=src python3 -m benchmarks.gpu_softmax --out $OUT/softmax.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks import harness

NS = (256, 1024, 4096, 32768, 131072, 262144, 1048576)
DTYPES = {"bf16": (torch.bfloat16, 1 << 28), "fp32": (torch.float32, 1 << 27)}
OPS = ("softmax", "log_softmax")


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _providers(op: str, dim: int):
    import logitkit

    lk = getattr(logitkit, op)
    tf = getattr(torch, op)
    out = {
        "torch": lambda x: tf(x, dim),
        "torch.compile": torch.compile(lambda x: tf(x, dim)),
        "logitkit": lambda x: lk(x, dim=dim),
    }
    try:
        from liger_kernel.transformers.functional import liger_softmax  # noqa: F401

        if op == "softmax" and dim == -1:
            out["liger"] = lambda x: liger_softmax(x)
    except Exception as exc:  # a missing peer skips its column
        print(f"liger unavailable: {exc!r}", file=sys.stderr)
    return out


def run(quick: bool = False) -> dict:
    rows = []
    copy_src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = _bench(lambda: copy_dst.copy_(copy_src))
    copy_tbs = 2 * copy_src.numel() / copy_ms / 1e9
    for dname, (dtype, elems) in DTYPES.items():
        for N in NS[:2] if quick else NS:
            M = elems // N
            for layout, dim in (("last", -1), ("non-last", 0)):
                x = torch.randn((M, N) if dim == -1 else (N, M), device="cuda", dtype=dtype)
                for op in OPS:
                    for name, fn in _providers(op, dim).items():
                        row = dict(dtype=dname, N=N, M=M, layout=layout, op=op, provider=name)
                        try:
                            ms_f = _bench(lambda f=fn, t=x: f(t))
                            xg = x.detach().requires_grad_()
                            dy = torch.randn_like(x)
                            ms_b = _bench(lambda f=fn, t=xg, d=dy: torch.autograd.grad(f(t), t, d))
                        except Exception as exc:
                            row["error"] = repr(exc)[:200]
                            rows.append(row)
                            continue
                        nbytes = x.numel() * x.element_size()
                        row.update(fwd_ms=ms_f, fwdbwd_ms=ms_b,
                                   fwd_tbs=2 * nbytes / ms_f / 1e9, fwdbwd_tbs=5 * nbytes / ms_b / 1e9)
                        row.update(fwd_frac=row["fwd_tbs"] / copy_tbs, fwdbwd_frac=row["fwdbwd_tbs"] / copy_tbs)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return dict(meta=harness.metadata("cuda"), copy_tbs=copy_tbs, rows=rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    payload = run(quick=args.quick)
    if args.out:
        harness.write_json(args.out, payload)
    print(f"copy {payload['copy_tbs']:.2f} TB/s")
    for r in payload["rows"]:
        if "error" not in r:
            print(f"{r['dtype']:5} N={r['N']:>8} {r['layout']:8} {r['op']:12} {r['provider']:14} "
                  f"fwd {r['fwd_tbs']:.2f} ({r['fwd_frac']:.2f}x)  "
                  f"fwd+bwd {r['fwdbwd_tbs']:.2f} ({r['fwdbwd_frac']:.2f}x)")


if __name__ == "__main__":
    main()
