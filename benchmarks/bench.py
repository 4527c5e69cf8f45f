"""``logitkit bench``: time and peak memory of logitkit against torch and peers over the named shapes.

Shapes come from ``shapes.py`` and providers from ``providers.py``; measuring is ``harness.py``'s job. This
module runs the grid, prints one table, and writes the JSON and the plot.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import harness
from benchmarks import providers as _providers
from benchmarks import shapes as _shapes

# The bar on the CPU: logitkit within this factor of torch at the "issue" shape.
CPU_RATIO_BAR = 2.0


@dataclass
class _Case:
    shape: _shapes.Shape
    op: str
    mode: str
    provider: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run(
    *,
    device: str,
    quick: bool,
    ops: tuple[str, ...] | None,
    shape_names: tuple[str, ...] | None,
    provider_names: tuple[str, ...] | None,
    console: Console,
) -> dict:
    """Measure every (shape, op, mode, provider) case; return the JSON payload."""
    chosen = _shapes.select(device, quick, ops, shape_names)
    if not chosen:
        raise ValueError(f"no benchmark shapes for device={device!r}, quick={quick}, ops={ops}, shapes={shape_names}")
    skipped = []
    active = []
    for provider in _providers.PROVIDERS:
        if provider_names is not None and provider.name not in provider_names:
            continue
        reason = provider.unavailable(device) if device in provider.devices else f"not offered on {device}"
        if reason is None:
            active.append(provider)
        else:
            skipped.append({"provider": provider.name, "reason": reason})
            console.print(f"[yellow]skipping provider {provider.name}: {reason}[/]")

    copy = harness.copy_bandwidth(device, quick)
    console.print(
        f"copy bandwidth ({device}, {copy['bytes'] >> 20} MiB bf16, read+write): {copy['tb_s'] * 1e3:.1f} GB/s"
    )

    cases = [_Case(s, op, mode, p.name) for s in chosen for op in s.ops for mode in s.modes for p in active]
    rows = []
    budget_s = 0.3 if quick else 3.0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("timing", total=len(cases))
        inputs, inputs_for = None, None
        for case in cases:
            shape = case.shape
            progress.update(task, description=f"{shape.name} {case.op} {case.mode} {case.provider}")
            if inputs_for != shape.name:
                inputs = None
                gc.collect()
                inputs = _providers.make_inputs(shape.M, shape.V, shape.dtype, device)
                inputs_for = shape.name
            row = {
                "shape": shape.name,
                "M": shape.M,
                "V": shape.V,
                "dtype": _dtype_name(shape.dtype),
                "device": device,
                "op": case.op,
                "mode": case.mode,
                "provider": case.provider,
                "ideal_bytes": harness.ideal_bytes(case.op, case.mode, shape.M, shape.V, shape.dtype),
                "median_ms": None,
                "p20_ms": None,
                "p80_ms": None,
                "reps": None,
                "tb_s": None,
                "frac_copy": None,
                "peak_extra_bytes": None,
                "ratio_vs_torch": None,
                "error": None,
            }
            try:
                step = _providers.BY_NAME[case.provider].build(case.op, case.mode, inputs)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot build this case is reported, not fatal
                step, row["error"] = None, f"{type(exc).__name__}: {exc}"
            if step is None:
                if row["error"] is None:
                    skipped.append(
                        {
                            "provider": case.provider,
                            "shape": shape.name,
                            "op": case.op,
                            "mode": case.mode,
                            "reason": "op/mode not offered",
                        }
                    )
                    progress.advance(task)
                    continue
            else:
                try:
                    timing = harness.time_cuda(step, quick) if device == "cuda" else harness.time_cpu(step, budget_s)
                    row.update(timing)
                    row["tb_s"] = row["ideal_bytes"] / (row["median_ms"] * 1e-3) / 1e12
                    row["frac_copy"] = row["tb_s"] / copy["tb_s"]
                    if device == "cuda":
                        row["peak_extra_bytes"] = harness.cuda_peak_memory(step, inputs)
                except Exception as exc:  # noqa: BLE001 - e.g. a peer refusing a row length
                    row["error"] = f"{type(exc).__name__}: {exc}"
                inputs.x_grad.grad = None
            rows.append(row)
            progress.advance(task)
        inputs = None
        gc.collect()

        if device == "cpu":
            measured = [r for r in rows if r["error"] is None]
            task = progress.add_task("peak memory (fresh subprocess)", total=1)
            results = harness.cpu_peak_memory(
                [{"shape": r["shape"], "op": r["op"], "mode": r["mode"], "provider": r["provider"]} for r in measured]
            )
            for row, result in zip(measured, results, strict=True):
                row["peak_extra_bytes"] = result["peak_extra_bytes"]
                if result["error"]:
                    row["memory_error"] = result["error"]
            progress.advance(task)

    torch_ms = {(r["shape"], r["op"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    for row in rows:
        ref = torch_ms.get((row["shape"], row["op"], row["mode"]))
        if ref and row["median_ms"] is not None:
            row["ratio_vs_torch"] = row["median_ms"] / ref
    return {
        "kind": "bench",
        "meta": harness.metadata(device),
        "copy": copy,
        "providers": [p.name for p in active],
        "skipped": skipped,
        "rows": rows,
    }


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def table(payload: dict) -> Table:
    device = payload["meta"]["device"]
    title = (
        f"logitkit bench on {payload['meta']['gpu'] or payload['meta']['cpu']} "
        f"({payload['meta']['torch_threads']} threads)"
        if device == "cpu"
        else f"logitkit bench on {payload['meta']['gpu']}"
    )
    t = Table(
        title=title,
        caption=f"copy {payload['copy']['tb_s'] * 1e3:.1f} GB/s; ratio = median / torch "
        f"median (bar: logitkit <= {CPU_RATIO_BAR:g}x torch at the issue shape)",
    )
    for name, justify in [
        ("shape", "left"),
        ("op", "left"),
        ("mode", "left"),
        ("provider", "left"),
        ("median ms", "right"),
        ("p20-p80 ms", "right"),
        ("GB/s", "right"),
        ("% copy", "right"),
        ("peak extra MiB", "right"),
        ("x torch", "right"),
    ]:
        t.add_column(name, justify=justify)
    previous = None
    for r in payload["rows"]:
        key = (r["shape"], r["op"], r["mode"])
        if previous is not None and key[:2] != previous[:2]:
            t.add_section()
        previous = key
        label = f"{r['shape']} {r['M']}x{r['V']} {r['dtype']}"
        if r["error"]:
            t.add_row(label, r["op"], r["mode"], r["provider"], f"[red]{r['error'][:60]}[/]", "", "", "", "", "")
            continue
        ratio = r["ratio_vs_torch"]
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        if r["provider"] == "logitkit" and ratio is not None:
            ratio_text = f"[{'green' if ratio <= CPU_RATIO_BAR else 'red'}]{ratio_text}[/]"
        t.add_row(
            label,
            r["op"],
            r["mode"],
            r["provider"],
            f"{r['median_ms']:.3f}",
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
            f"{r['tb_s'] * 1e3:.1f}",
            f"{r['frac_copy'] * 100:.0f}",
            _fmt_bytes(r["peak_extra_bytes"]),
            ratio_text,
        )
    return t


def plot(payload: dict, path: str) -> None:
    """One panel per shape: median ms per op/mode (log scale), one bar per provider."""
    from matplotlib.figure import Figure

    rows = [r for r in payload["rows"] if r["median_ms"] is not None]
    shape_names = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig = Figure(figsize=(max(6.0, 2.2 * max(1, len(shape_names)) + 4), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(shape_names)), squeeze=False)[0]
    width = 0.8 / max(1, len(providers))
    for ax, shape_name in zip(axes, shape_names, strict=False):
        shape_rows = [r for r in rows if r["shape"] == shape_name]
        groups = list(dict.fromkeys((r["op"], r["mode"]) for r in shape_rows))
        for k, provider in enumerate(providers):
            xs, ys = [], []
            for g, (op, mode) in enumerate(groups):
                hit = [r for r in shape_rows if (r["op"], r["mode"], r["provider"]) == (op, mode, provider)]
                if hit:
                    xs.append(g + (k - (len(providers) - 1) / 2) * width)
                    ys.append(hit[0]["median_ms"])
            ax.bar(xs, ys, width=width, label=provider)
        ax.set_xticks(range(len(groups)), [f"{op}\n{mode}" for op, mode in groups], fontsize=7, rotation=45)
        ax.set_yscale("log")
        first = shape_rows[0]
        ax.set_title(f"{shape_name} ({first['M']}x{first['V']} {first['dtype']})", fontsize=9)
        ax.set_ylabel("median ms")
    axes[0].legend(fontsize=8)
    meta = payload["meta"]
    fig.suptitle(f"logitkit bench, {meta['gpu'] or meta['cpu']}, torch {meta['torch']}, {meta['date']}", fontsize=9)
    fig.savefig(path, dpi=110)
