"""Linear cross-entropy benchmark (issue 5): forward+backward time and peak extra memory.

Providers: torch eager (F.linear + F.cross_entropy: materialises the (M, V) logits and their gradient),
torch.compile of the same (CUDA), torch's own F.linear_cross_entropy (torch >= 2.13, chunked options), Liger's
and cut-cross-entropy's fused linear CE (CUDA, when importable), logitkit with its automatic strategy, and
logitkit with each strategy forced ("logitkit token_chunks": 3 GEMMs, fp32 (V, D) dW accumulator for half
weights; "logitkit vocab_blocks": 4 GEMMs, dW written once in the weight's dtype; the one that 'auto' picks
for a shape is not run twice: its row says so, and the "logitkit" row's "strategy" field names it). A provider
that cannot run is skipped and the reason is recorded.

Time: median/p20/p80 of forward+backward (loss.backward() with gradients for input, weight).
Effective TFLOP/s: 6 * M * D * V / time (the three matmuls of the unfused graph).
Peak extra memory: on the CPU the rise of the kernel's peak RSS over the step in a fresh subprocess per
provider (harness._memory_worker's method); on CUDA max_memory_allocated minus what was allocated before.

Run:  python -m benchmarks.linear_ce [--quick] [--device cpu|cuda] [--json PATH] [--shape NAME ...]
                                    [--provider NAME ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness

# (name, M, D, V, dtype, device, quick)
SHAPES = (
    ("cpu-issue", 2048, 512, 32000, torch.float32, "cpu", False),
    ("cpu-issue-bf16", 2048, 512, 32000, torch.bfloat16, "cpu", False),
    ("cpu-quick", 256, 64, 4000, torch.float32, "cpu", True),
    ("llama3-8k", 8192, 4096, 128256, torch.bfloat16, "cuda", False),
    ("llama3-4k", 4096, 4096, 128256, torch.bfloat16, "cuda", False),
    ("llama3-32k", 32768, 4096, 128256, torch.bfloat16, "cuda", False),
    ("v32k-8k", 8192, 4096, 32768, torch.bfloat16, "cuda", False),
    ("gemma-8k", 8192, 4096, 262144, torch.bfloat16, "cuda", False),
    ("cuda-quick", 1024, 512, 32768, torch.bfloat16, "cuda", True),
)


def _inputs(M, D, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(M, D, generator=g) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (M,), generator=g).to(device)
    return x, W, t


def _unfused(x, W, t):
    return F.cross_entropy(F.linear(x, W).float(), t)


def _build(provider: str, device: str):
    """A loss function (x, W, t) -> scalar, or a string saying why the provider cannot run."""
    if provider == "torch":
        return _unfused
    if provider == "torch.compile":
        if device != "cuda":
            return "compiled only on CUDA (CPU inductor needs a C++ toolchain at run time)"
        return torch.compile(_unfused)
    if provider == "torch F.linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy"
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda x, W, t: F.linear_cross_entropy(x, W, t, options=opts)
    if provider == "liger":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as f
        except Exception as exc:  # noqa: BLE001 - any import failure skips the column
            return f"not importable: {exc!r}"[:200]
        if device != "cuda":
            return "CUDA only"
        return lambda x, W, t: f(x, W, t)
    if provider == "cut-cross-entropy":
        try:
            from cut_cross_entropy import linear_cross_entropy as f
        except Exception as exc:  # noqa: BLE001
            return f"not importable: {exc!r}"[:200]
        if device != "cuda":
            return "CUDA only"
        return lambda x, W, t: f(x, W, t)
    if provider == "logitkit" or provider.startswith("logitkit "):
        import logitkit

        strategy = provider.removeprefix("logitkit").strip() or "auto"
        return lambda x, W, t: logitkit.linear_cross_entropy(x, W, t, strategy=strategy)
    raise ValueError(provider)


PROVIDERS = ("torch", "torch.compile", "torch F.linear_cross_entropy", "liger", "cut-cross-entropy", "logitkit",
             "logitkit token_chunks", "logitkit vocab_blocks")


def _step(fn, x, W, t):
    def step():
        x.grad = W.grad = None
        fn(x, W, t).backward()

    return step


def _cpu_memory(shape, provider: str) -> dict:
    """Peak RSS rise of one forward+backward in a fresh interpreter (see module docstring)."""
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_extra_bytes": None, "error": "/proc/self/clear_refs is unavailable"}
    import logitkit

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(harness.REPO_ROOT), str(Path(logitkit.__file__).resolve().parents[1])]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    spec = json.dumps({"shape": shape[0], "provider": provider, "threads": torch.get_num_threads()})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.linear_ce", "--memory-worker", spec],
        capture_output=True, text=True, cwd=harness.REPO_ROOT, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"peak_extra_bytes": None, "error": f"worker failed: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _memory_worker(spec: str) -> None:
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    harness._pin_malloc()
    name, M, D, V, dtype, device, _ = next(s for s in SHAPES if s[0] == spec["shape"])
    x, W, t = _inputs(M, D, V, dtype, device)
    step = _step(_build(spec["provider"], device), x, W, t)
    step()  # warm-up; gradients of x and W are then allocated and count as "inputs and their gradients"
    gc.collect()
    before = harness._reset_peak_rss()
    step()
    peak = harness._status_bytes("VmHWM")
    print(json.dumps({"peak_extra_bytes": max(peak - before, 0), "error": None}))


def run(device: str = "cpu", quick: bool = False, console=None, shapes=None, providers=None,
        budget_s: float | None = None, on_row=None) -> dict:
    """Every shape of ``device`` (quick or not) and every provider; ``shapes`` / ``providers`` (names) narrow it.
    A (shape, provider) case starts only while ``budget_s`` lasts (benchmarks.harness.Deadline); ``on_row(payload)``
    runs after every row."""
    deadline = harness.Deadline(budget_s)
    rows = []
    payload = {"meta": harness.metadata(device), "benchmark": "linear_cross_entropy", "rows": rows,
               "truncated": None}
    picked = [s for s in SHAPES if (s[0] in shapes if shapes is not None else (s[5] == device and s[6] == quick))]
    names = PROVIDERS if providers is None else providers
    left = []
    for shape in picked:
        name, M, D, V, dtype, dev, q = shape
        if deadline.expired():
            left += [(name, p) for p in names]
            continue
        x, W, t = _inputs(M, D, V, dtype, device)
        for provider in names:
            if deadline.expired():
                left.append((name, provider))
                continue
            fn = _build(provider, device)
            row = {"shape": name, "M": M, "D": D, "V": V, "dtype": str(dtype).removeprefix("torch."),
                   "provider": provider}
            if provider.startswith("logitkit"):
                from logitkit.autograd.linear_cross_entropy import pick_strategy

                auto = pick_strategy("auto", W)
                row["strategy"] = provider.removeprefix("logitkit").strip() or auto
                if provider == f"logitkit {auto}" and (providers is None or "logitkit" in providers):
                    fn = f"the 'logitkit' row (strategy='auto' picks {auto} here)"
            if isinstance(fn, str):
                rows.append({**row, "skipped": fn})
                continue
            step = _step(fn, x, W, t)
            try:
                timing = harness.time_cuda(step, quick) if device == "cuda" else harness.time_cpu(
                    step, 0.5 if quick else 5.0, min_reps=3, max_reps=10)
            except Exception as exc:  # noqa: BLE001 - a provider that fails (out of memory, say) leaves its cell
                rows.append({**row, "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]})
                x.grad = W.grad = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            row.update(timing)
            row["tflop_s"] = 6 * M * D * V / (timing["median_ms"] * 1e-3) / 1e12
            if device == "cuda":
                x.grad = W.grad = None
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                # gradients of x and W stay allocated after the step: subtract them (they are not "extra")
                grads = x.numel() * x.element_size() + W.numel() * W.element_size()
                row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before - grads
            else:
                row.update(_cpu_memory(shape, provider))
            rows.append(row)
            if console is not None:
                console.print(f"{name} {provider}: {row['median_ms']:.1f} ms, "
                              f"peak extra {(row.get('peak_extra_bytes') or 0) / 2**20:.0f} MiB", highlight=False)
            if on_row is not None:
                on_row(payload)
        del x, W, t
    torch_rows = {(r["shape"]): r for r in rows if r["provider"] == "torch" and "median_ms" in r}
    for r in rows:
        base = torch_rows.get(r["shape"])
        if base and "median_ms" in r:
            r["time_vs_torch"] = r["median_ms"] / base["median_ms"]
            if r.get("peak_extra_bytes") and base.get("peak_extra_bytes"):
                r["memory_vs_torch"] = r["peak_extra_bytes"] / base["peak_extra_bytes"]
    payload["truncated"] = deadline.truncation(left)
    return payload


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--memory-worker"]:
        _memory_worker(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--shape", action="append", choices=[s[0] for s in SHAPES],
                   help="only these named shapes (repeatable; overrides the --quick/--device selection)")
    p.add_argument("--provider", action="append", choices=PROVIDERS, help="only these providers (repeatable)")
    p.add_argument("--budget-s", type=float, default=None, help="start no (shape, provider) case after this many s")
    args = p.parse_args(argv)
    from rich.console import Console

    save = (lambda p: harness.write_json(args.json, p)) if args.json else None
    payload = run(args.device, args.quick, Console(), shapes=args.shape, providers=args.provider,
                  budget_s=args.budget_s, on_row=save)
    for r in payload["rows"]:
        if "skipped" in r:
            print(f"{r['shape']:12s} {r['provider']:30s} skipped: {r['skipped']}")
        else:
            mem = r.get("peak_extra_bytes")
            print(f"{r['shape']:12s} {r['provider']:30s} {r['median_ms']:9.1f} ms  {r['tflop_s']:7.3f} TFLOP/s  "
                  f"extra {'n/a' if mem is None else f'{mem / 2**20:8.0f} MiB'}  "
                  f"x torch time {r.get('time_vs_torch', float('nan')):.2f} "
                  f"mem {r.get('memory_vs_torch', float('nan')):.3f}")
    if args.json:
        harness.write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
