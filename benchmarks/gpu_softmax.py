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
    # logitkit first and torch.compile (a compile per case) last: a case cut short by a device limit still
    # has the numbers that matter most.
    out = {
        "logitkit": lambda x: lk(x, dim=dim),
        "torch": lambda x: tf(x, dim),
    }
    try:
        from liger_kernel.transformers.functional import liger_softmax  # noqa: F401

        if op == "softmax" and dim == -1:
            out["liger"] = lambda x: liger_softmax(x)
    except Exception as exc:  # a missing peer skips its column
        print(f"liger unavailable: {exc!r}", file=sys.stderr)
    out["torch.compile"] = torch.compile(lambda x: tf(x, dim))
    return out


def _copy_tbs() -> float:
    """Device-to-device copy of 1 GiB (read + write), in TB/s: the ceiling, measured in the same run."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _bench(lambda: dst.copy_(src)) / 1e9


# The order in which cases run: spread over the row lengths first, so that a run stopped by its budget still
# covers short, long and split-row lengths in both dtypes and layouts.
N_PRIORITY = (4096, 131072, 1048576, 256, 32768, 262144, 1024)


def cases(quick: bool = False, ns=None, dtypes=None) -> list[tuple[str, int, str]]:
    """(dtype name, N, layout) in run order; ``ns`` / ``dtypes`` narrow the grid."""
    order = [n for n in N_PRIORITY if n in NS[:2]] if quick else list(N_PRIORITY)
    if ns is not None:
        bad = sorted(set(ns) - set(NS))
        if bad:
            raise ValueError(f"ns must be among {NS}, got {bad}")
        order = [n for n in order if n in ns]
    names = list(DTYPES) if dtypes is None else [d for d in DTYPES if d in dtypes]
    if dtypes is not None and len(names) != len(set(dtypes)):
        raise ValueError(f"dtypes must be among {tuple(DTYPES)}, got {list(dtypes)}")
    return [(d, n, layout) for n in order for d in names for layout in ("last", "non-last")]


def _add_row(row: dict, x, ms_f: float, ms_b: float, payload: dict, on_row) -> None:
    """TB/s from ideal bytes (forward reads x and writes y: 2 passes; forward+backward adds read y, read dy,
    write dx: 5) and as a fraction of the run's copy; the row is printed and the JSON rewritten."""
    nbytes = x.numel() * x.element_size()
    copy_tbs = payload["copy_tbs"]
    row.update(fwd_ms=ms_f, fwdbwd_ms=ms_b, fwd_tbs=2 * nbytes / ms_f / 1e9, fwdbwd_tbs=5 * nbytes / ms_b / 1e9)
    row.update(fwd_frac=row["fwd_tbs"] / copy_tbs, fwdbwd_frac=row["fwdbwd_tbs"] / copy_tbs)
    payload["rows"].append(row)
    print(json.dumps(row), flush=True)
    if on_row is not None:
        on_row(payload)


def run(quick: bool = False, budget_s: float | None = None, on_row=None, ns=None, dtypes=None) -> dict:
    """The grid (or its ``ns`` x ``dtypes`` part); cases start while ``budget_s`` lasts; ``on_row(payload)`` after
    every row (the CLI rewrites its JSON there, so a killed run still leaves what it measured)."""
    deadline = harness.Deadline(budget_s)
    todo = cases(quick, ns, dtypes)
    rows = []
    copy_tbs = _copy_tbs()
    payload = dict(meta=harness.metadata("cuda"), copy_tbs=copy_tbs, rows=rows, truncated=None)
    while todo and not deadline.expired():
        dname, N, layout = todo.pop(0)
        dtype, elems = DTYPES[dname]
        M = elems // N
        dim = -1 if layout == "last" else 0
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
                _add_row(row, x, ms_f, ms_b, payload, on_row)
        del x
    payload["truncated"] = deadline.truncation(todo)
    return payload


# The resident regime (triton/_tuning.py; not the default until measured): rows longer than one program's tile,
# held by a group of programs that meet at a barrier, x read once.  Timed against the default ("loop" / "split",
# two reads) through the launchers (force_softmax is process-wide, but the launchers keep autograd out of it),
# both on the same tensors; the headline lengths first.
RESIDENT_NS = (1048576, 131072, 262144, 32768)


def run_resident(budget_s: float | None = None, on_row=None, *, device: str = "cuda", ns=RESIDENT_NS,
                 elems: int | None = None, bench=None, copy_tbs: float | None = None) -> dict:
    """``device`` / ``elems`` (M * N) / ``bench`` / ``copy_tbs``: the CPU smoke test's small run (interpreter)."""
    from logitkit.triton import _tuning
    from logitkit.triton import softmax as kernels

    _bench_fn = bench or _bench
    deadline = harness.Deadline(budget_s)
    todo = [(d, n, layout) for n in ns for d in DTYPES for layout in ("last", "non-last")]
    rows = []
    copy_tbs = copy_tbs or _copy_tbs()
    payload = dict(meta=harness.metadata(device), copy_tbs=copy_tbs, rows=rows, truncated=None)
    while todo and not deadline.expired():
        dname, N, layout = todo.pop(0)
        dtype, full = DTYPES[dname]
        M = (elems or full) // N
        dim = 1 if layout == "last" else 0  # the launchers take a non-negative dim
        x = torch.randn((M, N) if dim == 1 else (N, M), device=device, dtype=dtype)
        dy = torch.randn_like(x)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        for op in OPS:
            log = op == "log_softmax"
            for name, regime in (("logitkit", None), ("logitkit-resident", "resident")):
                row = dict(dtype=dname, N=N, M=M, layout=layout, op=op, provider=name)
                try:
                    with _tuning.force_softmax(regime):
                        R, _, K = kernels._geometry(x, dim)
                        cfg = kernels._config(R, N, K, *kernels._pnk(x, dim))  # the launchers' own choice
                        row["config"] = cfg._asdict()

                        def fwd(x=x, dim=dim, log=log, y=y):
                            kernels.softmax_fwd_out(x, dim, log=log, out=y)

                        def fwdbwd(x=x, dim=dim, log=log, y=y, dy=dy, dx=dx):
                            kernels.softmax_fwd_out(x, dim, log=log, out=y)
                            kernels.softmax_bwd_out(y, dy, dim, log=log, out=dx)

                        ms_f, ms_b = _bench_fn(fwd), _bench_fn(fwdbwd)
                    if regime is not None:  # y is the resident output: within rounding of the default's
                        ref = torch.empty_like(x)
                        kernels.softmax_fwd_out(x, dim, log=log, out=ref)
                        row["max_abs_diff_vs_default"] = (y.float() - ref.float()).abs().max().item()
                except Exception as exc:
                    row["error"] = repr(exc)[:200]
                    rows.append(row)
                    continue
                _add_row(row, x, ms_f, ms_b, payload, on_row)
        del x, dy, y, dx
    payload["truncated"] = deadline.truncation(todo)
    return payload


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resident", action="store_true",
                    help="the resident regime against the default, N >= 32768 (logitkit only, via the launchers)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    args = ap.parse_args(argv)
    save = (lambda p: harness.write_json(args.out, p)) if args.out else None
    if args.resident:
        payload = run_resident(budget_s=args.budget_s, on_row=save)
    else:
        payload = run(quick=args.quick, budget_s=args.budget_s, on_row=save)
    if save:
        save(payload)
    print(f"copy {payload['copy_tbs']:.2f} TB/s")
    if payload["truncated"]:
        print(f"budget spent: {len(payload['truncated']['cases_left'])} cases not run")
    for r in payload["rows"]:
        if "error" not in r:
            print(f"{r['dtype']:5} N={r['N']:>8} {r['layout']:8} {r['op']:12} {r['provider']:14} "
                  f"fwd {r['fwd_tbs']:.2f} ({r['fwd_frac']:.2f}x)  "
                  f"fwd+bwd {r['fwdbwd_tbs']:.2f} ({r['fwdbwd_frac']:.2f}x)")


if __name__ == "__main__":
    main()
