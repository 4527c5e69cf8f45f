"""``logitkit accuracy``: errors in ulps against the float64/mpmath oracle, per op, input family and dtype.

Implementations compared on the same rounded inputs: logitkit, torch (same dtype), the naive
``log(softmax(x))`` (log_softmax and cross-entropy), and SciPy's ``special`` functions (float32 only: NumPy has
no bfloat16, and float16 SciPy is not a kernel anyone ships). Targets are NUMERICS.md's table; a logitkit row
over its target fails the command (exit code 1).

Units: ulps of each implementation's output dtype (``oracle.ulp_error``). logitkit's cross-entropy returns
float32 for fp16/bf16 logits (NUMERICS.md), so its errors there are float32 ulps against the float32 target.
logsumexp: near lse = 0 an ulp count is meaningless (the ulp shrinks with y while the error scales with the
inputs), so its per-row error is the oracle's mixed metric ``err / max(ulp(y), eps * sum_i p_i |x_i|)``
(``oracle.lse_error``): the ulp error away from 0, scaled by the condition number near 0.

Families: NUMERICS.md's finite ones (``oracle.input_families``) and the special-value ones
(``oracle.special_families``: -inf among finite values; rows with +inf, NaN, only -inf, all -inf but one).
Special values must match exactly: ``oracle.ulp_error`` counts an equal NaN/inf as 0 and a special value on one
side only as inf, so a cell passes only if every special output is torch's and every finite one is within its
target.  Cross-entropy targets are uniform on the finite families; on the special ones they sit on finite
entries except for one deliberate -inf target (loss +inf, as torch; ``oracle.cross_entropy_targets``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks import harness

OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("logitkit", "torch", "naive", "scipy")

# (V, M): row length and number of rows. NUMERICS.md's CPU row lengths; fewer rows where rows are long.
QUICK_SIZES = ((8, 64), (1024, 16), (32768, 2))
FULL_SIZES = ((1, 256), (2, 256), (3, 256), (7, 256), (8, 256), (33, 256), (1024, 64), (1025, 64), (32768, 8))

# NUMERICS.md targets, in ulps of the output dtype.
_FP32_TARGETS = {"softmax": 4.0, "log_softmax": 2.0, "cross_entropy": 2.0, "logsumexp": 2.0}
HALF_TARGET = 1.0


def target(op: str, out_dtype: torch.dtype) -> float:
    return _FP32_TARGETS[op] if out_dtype == torch.float32 else HALF_TARGET


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------------------------- implementations
def _scipy_fn(op: str):
    from scipy import special

    return {
        "softmax": lambda a: special.softmax(a, axis=-1),
        "log_softmax": lambda a: special.log_softmax(a, axis=-1),
        "logsumexp": lambda a: special.logsumexp(a, axis=-1),
    }.get(op)


def _gather(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _compute(impl: str, op: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Output of ``impl`` for ``op`` on ``x`` (per-row losses for cross-entropy), or None if not offered."""
    import logitkit

    if impl == "logitkit":
        return {
            "softmax": lambda: logitkit.softmax(x, dim=-1),
            "log_softmax": lambda: logitkit.log_softmax(x, dim=-1),
            "logsumexp": lambda: logitkit.logsumexp(x, -1),
            "cross_entropy": lambda: logitkit.cross_entropy(x, target, reduction="none"),
        }[op]()
    if impl == "torch":
        return {
            "softmax": lambda: torch.softmax(x, dim=-1),
            "log_softmax": lambda: torch.log_softmax(x, dim=-1),
            "logsumexp": lambda: torch.logsumexp(x, -1),
            "cross_entropy": lambda: torch.nn.functional.cross_entropy(x, target, reduction="none"),
        }[op]()
    if impl == "naive":
        if op == "log_softmax":
            return torch.log(torch.softmax(x, dim=-1))
        if op == "cross_entropy":
            return -_gather(torch.log(torch.softmax(x, dim=-1)), target)
        return None
    if impl == "scipy":
        fn = _scipy_fn(op)
        if fn is None or x.dtype != torch.float32:
            return None
        with np.errstate(all="ignore"):
            out = np.asarray(fn(x.numpy()))
        return torch.from_numpy(out.astype(np.float32, copy=False)).reshape(
            x.shape[:-1] if op == "logsumexp" else x.shape
        )
    raise ValueError(f"unknown implementation {impl!r}")


# ---------------------------------------------------------------------------------------------- errors
def _truth(oracle, op: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if op == "softmax":
        return oracle.softmax(x, -1)
    if op == "log_softmax":
        return oracle.log_softmax(x, -1)
    if op == "logsumexp":
        return oracle.logsumexp(x, -1)
    return oracle.cross_entropy(x, target, reduction="none")


def _errors(oracle, op: str, out: torch.Tensor, truth: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Per-element (per-row for lse and cross-entropy) errors, float64, in ulps of ``out.dtype``."""
    if op == "logsumexp":
        errors = oracle.lse_error(out, truth, x, -1)  # the mixed metric (module docstring)
    else:
        errors = oracle.ulp_error(out, truth, out.dtype)
    return errors.reshape(-1).numpy()


def _summary(errors: np.ndarray) -> dict:
    if errors.size == 0:
        return {"max": None, "p999": None, "n": 0}
    nan = np.isnan(errors)
    clean = np.where(nan, np.inf, errors)  # a NaN error (NaN where truth is a number) is the worst case
    return {"max": float(clean.max()), "p999": float(np.quantile(clean, 0.999, method="higher")), "n": int(errors.size)}


@dataclass
class _Group:
    """Errors of one (op, dtype, family) across row lengths, per implementation."""

    errors: dict
    out_dtype: dict


def run(*, quick: bool, console: Console, seed: int = 0) -> dict:
    from logitkit.reference import oracle

    sizes = QUICK_SIZES if quick else FULL_SIZES
    rows = []  # one per (op, dtype, family, V)
    groups: dict[tuple[str, str, str], _Group] = {}
    work = [(dtype, V, M) for dtype in DTYPES for V, M in sizes]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("accuracy", total=len(work))
        for dtype, V, M in work:
            progress.update(task, description=f"accuracy {_dtype_name(dtype)} V={V}")
            gen = torch.Generator().manual_seed(seed + V)
            families = itertools.chain(
                ((f, x, True) for f, x in oracle.input_families(dtype, V, M, seed)),
                ((f, x, False) for f, x in oracle.special_families(dtype, V, M, seed)),
            )
            for family, x, finite in families:
                if finite:
                    target_idx = torch.randint(0, max(V, 1), x.shape[:-1], generator=gen)
                else:
                    target_idx = oracle.cross_entropy_targets(x, gen)
                softmax_truth = oracle.softmax(x, -1)
                for op in OPS:
                    truth = softmax_truth if op == "softmax" else _truth(oracle, op, x, target_idx)
                    row = {
                        "op": op,
                        "dtype": _dtype_name(dtype),
                        "family": family,
                        "V": V,
                        "M": int(x.numel() // max(V, 1)),
                        "impl": {},
                    }
                    group = groups.setdefault((op, _dtype_name(dtype), family), _Group({}, {}))
                    for impl in IMPLS:
                        try:
                            out = _compute(impl, op, x, target_idx)
                        except Exception as exc:  # noqa: BLE001 - recorded in the row, shown in the table
                            row["impl"][impl] = {"error": f"{type(exc).__name__}: {exc}"}
                            group.errors.setdefault(impl, []).append(np.array([np.inf]))
                            continue
                        if out is None:
                            continue
                        errors = _errors(oracle, op, out, truth, x)
                        row["impl"][impl] = {**_summary(errors), "out_dtype": _dtype_name(out.dtype)}
                        group.errors.setdefault(impl, []).append(errors)
                        group.out_dtype[impl] = out.dtype
                    lk = row["impl"].get("logitkit", {})
                    if "out_dtype" in lk:
                        row["target"] = target(op, group.out_dtype["logitkit"])
                        row["pass"] = lk["max"] is not None and lk["max"] <= row["target"]
                    else:
                        row["target"], row["pass"] = None, False
                    rows.append(row)
            progress.advance(task)

    summary = []
    for (op, dtype, family), group in groups.items():
        entry = {"op": op, "dtype": dtype, "family": family, "impl": {}}
        for impl, chunks in group.errors.items():
            entry["impl"][impl] = _summary(np.concatenate(chunks))
            if impl in group.out_dtype:
                entry["impl"][impl]["out_dtype"] = _dtype_name(group.out_dtype[impl])
        lk_dtype = group.out_dtype.get("logitkit")
        entry["target"] = target(op, lk_dtype) if lk_dtype is not None else None
        lk_max = entry["impl"].get("logitkit", {}).get("max")
        entry["pass"] = lk_max is not None and entry["target"] is not None and lk_max <= entry["target"]
        summary.append(entry)
    family_order = list(dict.fromkeys(family for _, _, family in groups))
    dtype_order = [_dtype_name(d) for d in DTYPES]
    summary.sort(key=lambda e: (OPS.index(e["op"]), dtype_order.index(e["dtype"]), family_order.index(e["family"])))
    return {
        "kind": "accuracy",
        "meta": harness.metadata("cpu"),
        "quick": quick,
        "sizes": sizes,
        "headline": headline(),
        "summary": summary,
        "rows": rows,
    }


def headline() -> dict:
    """float32 log_softmax([0, -20])[0], cross_entropy of that row (target 0) and its gradient's sum."""
    import logitkit
    from logitkit.reference import oracle

    x = torch.tensor([[0.0, -20.0]])
    target_idx = torch.tensor([0])
    result = {
        "log_softmax_truth": float(oracle.log_softmax(x, -1)[0, 0]),
        "cross_entropy_truth": float(oracle.cross_entropy(x, target_idx)),
        "grad_sum_truth": 0.0,
    }
    for name, log_softmax, cross_entropy in [
        ("logitkit", logitkit.log_softmax, logitkit.cross_entropy),
        ("torch", torch.log_softmax, torch.nn.functional.cross_entropy),
    ]:
        xg = x.clone().requires_grad_()
        result[f"log_softmax_{name}"] = float(log_softmax(x, dim=-1)[0, 0])
        loss = cross_entropy(xg, target_idx)
        loss.backward()
        result[f"cross_entropy_{name}"] = float(loss.detach())
        result[f"grad_sum_{name}"] = float(xg.grad.sum())
    return result


def headline_text(h: dict) -> str:
    return (
        f"float32 log_softmax([0,-20])[0]: logitkit {h['log_softmax_logitkit']:.8g}, "
        f"torch {h['log_softmax_torch']:.8g}, truth {h['log_softmax_truth']:.8g} | "
        f"cross_entropy(target 0): logitkit {h['cross_entropy_logitkit']:.8g}, "
        f"torch {h['cross_entropy_torch']:.8g}, truth {h['cross_entropy_truth']:.8g} | "
        f"gradient sum: logitkit {h['grad_sum_logitkit']:.3g}, torch {h['grad_sum_torch']:.3g}"
    )


# ------------------------------------------------------------------------------------------- rendering
def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if value == 0:
        return "0"
    if value < 100:
        return f"{value:.3g}"
    return f"{value:.2e}"


def table(payload: dict) -> Table:
    t = Table(
        title=f"logitkit accuracy ({'quick' if payload['quick'] else 'full'}): max / p99.9 error in ulps "
        "of the output dtype"
    )
    for name, justify in (
        [("op", "left"), ("dtype", "left"), ("family", "left"), ("target", "right")]
        + [(impl, "right") for impl in IMPLS]
        + [("", "center")]
    ):
        t.add_column(name, justify=justify)
    previous = None
    for entry in payload["summary"]:
        key = (entry["op"], entry["dtype"])
        if previous is not None and key != previous:
            t.add_section()
        previous = key
        cells = []
        for impl in IMPLS:
            s = entry["impl"].get(impl)
            if s is None:
                cells.append("")
                continue
            text = f"{_fmt(s['max'])} / {_fmt(s['p999'])}"
            if impl == "logitkit" and s.get("out_dtype") not in (None, entry["dtype"]):
                text += f" ({s['out_dtype']})"
            cells.append(text)
        mark = "[green]ok[/]" if entry["pass"] else "[red]FAIL[/]"
        t.add_row(entry["op"], entry["dtype"], entry["family"], _fmt(entry["target"]), *cells, mark)
    return t


def plot(payload: dict, path: str) -> None:
    """Max error (log scale) per op/family, one bar per implementation; one panel per dtype."""
    from matplotlib.figure import Figure

    floor, cap = 0.1, 1e12  # log axes cannot show 0 (drawn at the floor) or inf (drawn at the cap)
    dtypes = list(dict.fromkeys(e["dtype"] for e in payload["summary"]))
    groups = list(dict.fromkeys((e["op"], e["family"]) for e in payload["summary"]))
    fig = Figure(figsize=(max(8.0, 0.45 * len(groups) + 2), 3.2 * len(dtypes)), layout="constrained")
    axes = fig.subplots(len(dtypes), 1, squeeze=False)[:, 0]
    width = 0.8 / len(IMPLS)
    for ax, dtype in zip(axes, dtypes, strict=True):
        by_group = {(e["op"], e["family"]): e for e in payload["summary"] if e["dtype"] == dtype}
        for k, impl in enumerate(IMPLS):
            xs, ys = [], []
            for g, key in enumerate(groups):
                s = by_group.get(key, {}).get("impl", {}).get(impl)
                if s is None or s["max"] is None:
                    continue
                xs.append(g + (k - (len(IMPLS) - 1) / 2) * width)
                ys.append(min(max(s["max"], floor), cap))
            ax.bar(xs, ys, width=width, label=impl)
        for g, key in enumerate(groups):
            if key in by_group and by_group[key]["target"] is not None:
                ax.hlines(by_group[key]["target"], g - 0.45, g + 0.45, colors="black", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, cap * 2)
        ax.set_ylabel(f"{dtype}: max ulps")
        ax.set_xticks(range(len(groups)), [f"{op}/{family}" for op, family in groups], fontsize=6, rotation=90)
    axes[0].legend(fontsize=7, ncols=len(IMPLS))
    meta = payload["meta"]
    fig.suptitle(
        f"logitkit accuracy (black: target; 0 drawn at {floor}, inf at {cap:g}), torch {meta['torch']}, {meta['date']}",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
