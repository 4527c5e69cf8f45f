"""The ``logitkit`` command: ``accuracy`` (errors in ulps against the oracle) and ``bench`` (time, memory).

The measuring code lives in the source checkout's ``benchmarks/`` folder (harness, named shapes, providers);
this module only parses arguments, runs it, and prints and writes the results.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from datetime import datetime, timezone
from pathlib import Path

_OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy")
_SUITES = ("shapes", "linear-ce", "gpu-softmax", "gpu-cross-entropy")


def _import_benchmarks(name: str):
    """Import ``benchmarks.<name>`` from the checkout this package sits in (``src/logitkit`` -> repo root)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "harness.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ImportError as exc:
        raise SystemExit(f"logitkit: the 'benchmarks' folder of a source checkout is needed ({exc})") from exc


def _default_json(kind: str, device: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    root = Path(__file__).resolve().parents[2]
    return str(root / "benchmarks" / "results" / f"{kind}-{device}-{stamp}.json")


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logitkit", description="Accurate softmax, log-softmax and cross-entropy: accuracy report and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{accuracy,bench}")

    acc = sub.add_parser("accuracy", help="max and p99.9 error in ulps per op, input family and dtype")
    acc.add_argument("--quick", action="store_true", help="few rows, V in {8, 1024, 32768}: under a minute")
    acc.add_argument(
        "--json",
        nargs="?",
        const="",
        metavar="PATH",
        help="write every row as JSON (no PATH: benchmarks/results/accuracy-cpu-<date>.json)",
    )
    acc.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the errors")
    acc.add_argument("--seed", type=int, default=0, help="seed of the input families (default 0)")

    bench = sub.add_parser("bench", help="median time and peak memory against torch and peers")
    bench.add_argument("--quick", action="store_true", help="tiny shapes: under a minute (CI)")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    bench.add_argument(
        "--json",
        nargs="?",
        const="",
        metavar="PATH",
        help="write every row as JSON (no PATH: benchmarks/results/bench-<device>-<date>.json)",
    )
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the medians")
    bench.add_argument("--op", nargs="+", choices=_OPS, help="only these ops")
    bench.add_argument(
        "--suite",
        choices=_SUITES,
        default="shapes",
        help="shapes: the named (M, V) shapes (default); linear-ce: linear cross-entropy (time, TFLOP/s, memory); "
        "gpu-softmax: the softmax-kernel grid (N = 256..1M, last and non-last dim, TB/s vs copy; CUDA); "
        "gpu-cross-entropy: fused cross-entropy fwd+bwd at (8192, 32768), (8192, 128256), (4096, 262144) (CUDA)",
    )
    bench.add_argument("--shape", nargs="+", metavar="NAME", help="only these named shapes (benchmarks/shapes.py)")
    bench.add_argument(
        "--budget-s",
        type=_non_negative_seconds,
        default=None,
        metavar="S",
        help="suites linear-ce, gpu-softmax, gpu-cross-entropy: start no case after S seconds (a device call has "
        "a hard limit); the cases left out are listed in the JSON",
    )
    bench.add_argument(
        "--provider",
        nargs="+",
        metavar="NAME",
        help="only these providers (benchmarks/providers.py; torch is kept for the ratio)",
    )
    return parser


def _accuracy(args, console) -> int:
    accuracy = _import_benchmarks("accuracy")
    harness = _import_benchmarks("harness")
    payload = accuracy.run(quick=args.quick, console=console, seed=args.seed)
    console.print(accuracy.table(payload))
    console.print("headline: " + accuracy.headline_text(payload["headline"]), highlight=False)
    failed = [e for e in payload["summary"] if not e["pass"]]
    if args.json is not None:
        path = args.json or _default_json("accuracy", "cpu")
        harness.write_json(path, payload)
        console.print(f"wrote {path}")
    if args.plot:
        accuracy.plot(payload, args.plot)
        console.print(f"wrote {args.plot}")
    if failed:
        console.print(
            f"[red]logitkit misses its target in {len(failed)} of {len(payload['summary'])} op/dtype/family cells[/]"
        )
        return 1
    console.print(f"[green]logitkit meets every target ({len(payload['summary'])} op/dtype/family cells)[/]")
    return 0


def _suite(args, console, device: str) -> int:
    """The per-issue suites that do not fit the (M, V) shape table."""
    harness = _import_benchmarks("harness")
    path = None if args.json is None else (args.json or _default_json(args.suite, device))
    # the JSON is rewritten after every row: a run killed by a device limit still leaves what it measured
    save = None if path is None else (lambda p: harness.write_json(path, p))
    if args.suite == "linear-ce":
        payload = _import_benchmarks("linear_ce").run(device=device, quick=args.quick, console=console,
                                                      budget_s=args.budget_s, on_row=save)
    else:
        if device != "cuda":
            console.print(f"[red]--suite {args.suite} needs --device cuda[/]")
            return 2
        module = "gpu_softmax" if args.suite == "gpu-softmax" else "gpu_cross_entropy"
        payload = _import_benchmarks(module).run(quick=args.quick, budget_s=args.budget_s, on_row=save)
    for row in payload["rows"]:
        console.print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      highlight=False)
    if payload.get("truncated"):
        console.print(f"[yellow]budget of {args.budget_s:g} s spent: {len(payload['truncated']['cases_left'])} "
                      f"cases not run (listed in the JSON's 'truncated')[/]")
    if path is not None:
        harness.write_json(path, payload)
        console.print(f"wrote {path}")
    return 0


def _bench(args, console) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is available[/]")
        return 2
    if args.suite != "shapes":
        return _suite(args, console, device)
    bench = _import_benchmarks("bench")
    harness = _import_benchmarks("harness")
    providers = None if args.provider is None else tuple(dict.fromkeys(["torch", *args.provider]))
    try:
        payload = bench.run(
            device=device,
            quick=args.quick,
            ops=None if args.op is None else tuple(args.op),
            shape_names=None if args.shape is None else tuple(args.shape),
            provider_names=providers,
            console=console,
        )
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    console.print(bench.table(payload))
    for row in payload["rows"]:
        if row["provider"] == "logitkit" and row["ratio_vs_torch"] is not None:
            console.print(
                f"ratio {row['shape']} {row['op']} {row['mode']}: logitkit/torch = {row['ratio_vs_torch']:.2f}",
                highlight=False,
            )
    if args.json is not None:
        path = args.json or _default_json("bench", device)
        harness.write_json(path, payload)
        console.print(f"wrote {path}")
    if args.plot:
        bench.plot(payload, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # piped or in CI: do not wrap the tables at 80 columns
    if args.command == "accuracy":
        return _accuracy(args, console)
    return _bench(args, console)
