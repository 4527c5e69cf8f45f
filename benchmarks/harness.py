"""The benchmark harness: timing, ideal bytes and bandwidth, peak memory, run metadata, table, JSON and plot.

Timing
  CPU:  ``time.perf_counter`` around each call after a warm-up, repeated until a time budget is spent.
  CUDA: ``triton.testing.do_bench`` (L2 flushed between calls), quantiles 0.5 / 0.2 / 0.8.
Bandwidth
  Ideal bytes, counted in passes over the ``M * V`` logits (O(M) vectors such as the loss, targets and lse are
  left out): forward softmax/log_softmax = read x + write y = 2 passes; their forward+backward = 5 passes
  (read x, write y, read y, read dy, write dx); logsumexp forward = 1 pass, forward+backward = 3 (read x,
  read x again, write dx); cross-entropy forward = 1 pass, forward+backward = 2 (read the logits once, write the
  gradient once). Reported as TB/s over the median and as the fraction of a device-to-device copy (read + write)
  measured in the same run.
Peak memory (extra bytes above the inputs, outputs and gradients included)
  CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step.
  CPU:  neither tracemalloc nor torch sees torch's CPU allocations, so a worker subprocess measures resident
        memory: it pins glibc's mmap threshold (large blocks go to the kernel on free, so RSS follows the live
        bytes), resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` <- 5), runs one step, and reports
        ``VmHWM`` minus the ``VmRSS`` before the step: the peak of touched pages the step added.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch

from benchmarks import providers as _providers
from benchmarks import shapes as _shapes

REPO_ROOT = Path(__file__).resolve().parents[1]

_PASSES = {
    ("softmax", "fwd"): 2,
    ("softmax", "fwd+bwd"): 5,
    ("log_softmax", "fwd"): 2,
    ("log_softmax", "fwd+bwd"): 5,
    ("logsumexp", "fwd"): 1,
    ("logsumexp", "fwd+bwd"): 3,
    ("cross_entropy", "fwd"): 1,
    ("cross_entropy", "fwd+bwd"): 2,
}


def ideal_bytes(op: str, mode: str, M: int, V: int, dtype: torch.dtype) -> int:
    """Passes over the logits (module docstring) times ``M * V * itemsize``."""
    return _PASSES[(op, mode)] * M * V * dtype.itemsize


# ---------------------------------------------------------------------------------------------- metadata
def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def metadata(device: str) -> dict:
    """What every JSON file carries: machine, commit, versions, date."""
    import logitkit

    status = _git("status", "--porcelain")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "logitkit": getattr(logitkit, "__version__", None),
        "platform": platform.platform(),
        # CPU timings are only as good as the machine was quiet: the 1/5/15-minute load when the run began.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


class Deadline:
    """A suite's time budget: a case starts only while time is left (``budget_s=None``: no budget).

    A device call has a hard wall-clock limit (../shared/gpu/README.md); a suite that stops itself between
    cases, with its JSON written after every row, returns a partial but honest table instead of being killed
    with nothing written.  ``truncation(left)`` is what the payload records about the cases not run."""

    def __init__(self, budget_s: float | None):
        if budget_s is not None and not budget_s >= 0:
            raise ValueError(f"budget_s must be None or a non-negative number of seconds, got {budget_s!r}")
        self.budget_s = budget_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    def truncation(self, left: list) -> dict | None:
        """None when every case ran; else the budget, the time spent and the cases left out (as strings)."""
        if not left:
            return None
        return {"budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1), "cases_left": [str(c) for c in left]}


# ------------------------------------------------------------------------------------------------ timing
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lo = int(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def time_cpu(step, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> dict:
    step()  # warm-up: first-call costs (lazy imports, allocator growth) are not the steady state
    times = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        times.append(elapsed * 1e3)
        spent += elapsed
    return {
        "median_ms": statistics.median(times),
        "p20_ms": _percentile(times, 0.2),
        "p80_ms": _percentile(times, 0.8),
        "reps": len(times),
    }


def time_cuda(step, quick: bool) -> dict:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(
        step, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8], return_mode="median"
    )
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}


def copy_bandwidth(device: str, quick: bool) -> dict:
    """Bytes per second of ``dst.copy_(src)`` (read + write), the ceiling the ops are compared with."""
    nbytes = (64 << 20 if quick else 1 << 30) if device == "cuda" else (16 << 20 if quick else 256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    timing = time_cuda(step, quick) if device == "cuda" else time_cpu(step, 0.2 if quick else 1.0, min_reps=5)
    return {
        "bytes": nbytes,
        "moved_bytes": 2 * nbytes,
        "median_ms": timing["median_ms"],
        "tb_s": 2 * nbytes / (timing["median_ms"] * 1e-3) / 1e12,
    }


# ------------------------------------------------------------------------------------------------ memory
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS and return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _pin_malloc() -> None:
    """Fixed mmap/trim thresholds: freed large blocks go back to the kernel, so RSS follows live bytes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)


def _memory_worker() -> None:
    """Subprocess entry: read cases as JSON on stdin, print ``{"results": [...]}`` as the last stdout line."""
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    _pin_malloc()
    by_name = {s.name: s for s in _shapes.SHAPES}
    results = []
    current, inputs = None, None
    for case in spec["cases"]:
        shape = by_name[case["shape"]]
        if current != shape.name:
            inputs = None
            gc.collect()
            inputs = _providers.make_inputs(shape.M, shape.V, shape.dtype, "cpu")
            current = shape.name
        try:
            step = _providers.BY_NAME[case["provider"]].build(case["op"], case["mode"], inputs)
            step()  # warm-up, so one-time allocations are not charged to the step
            inputs.x_grad.grad = None
            gc.collect()
            before = _reset_peak_rss()
            step()
            peak = _status_bytes("VmHWM")
            inputs.x_grad.grad = None
            results.append({"peak_extra_bytes": max(peak - before, 0), "error": None})
        except Exception as exc:  # noqa: BLE001 - reported per case, the others still run
            results.append({"peak_extra_bytes": None, "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps({"results": results}))


def cpu_peak_memory(cases: list[dict]) -> list[dict]:
    """Run ``_memory_worker`` in a fresh interpreter over ``cases`` (dicts: shape, op, mode, provider)."""
    if not Path("/proc/self/clear_refs").exists():
        return [{"peak_extra_bytes": None, "error": "/proc/self/clear_refs is unavailable"} for _ in cases]
    import logitkit

    package_parent = str(Path(logitkit.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    spec = json.dumps({"threads": torch.get_num_threads(), "cases": cases})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness", "--memory-worker"],
        input=spec,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = f"memory worker failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        return [{"peak_extra_bytes": None, "error": reason} for _ in cases]
    return json.loads(lines[-1])["results"]


def cuda_peak_memory(step, inputs: _providers.Inputs) -> int:
    inputs.x_grad.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    inputs.x_grad.grad = None
    return peak


if __name__ == "__main__" and sys.argv[1:] == ["--memory-worker"]:
    _memory_worker()
