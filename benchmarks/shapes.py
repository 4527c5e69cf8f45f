"""Named benchmark shapes: the one table to extend when an issue adds a shape.

Each entry is a logits shape ``(M, V)`` in one dtype on one device kind, with the ops and modes measured on it.
``quick`` entries are tiny and run in CI on the CPU so the benchmark code cannot rot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OPS = ("softmax", "log_softmax", "logsumexp", "cross_entropy")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    V: int
    dtype: torch.dtype
    device: str  # "cpu" or "cuda"
    ops: tuple[str, ...] = OPS
    modes: tuple[str, ...] = MODES
    quick: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} ({self.M}x{self.V} {str(self.dtype).removeprefix('torch.')})"


_ISSUE_OPS = ("softmax", "log_softmax", "cross_entropy")

SHAPES: tuple[Shape, ...] = (
    # CPU. The issue's bar: logitkit within 2x of torch at (4096, 32000) float32, forward and forward+backward.
    Shape("issue", 4096, 32000, torch.float32, "cpu", ops=_ISSUE_OPS),
    # Llama-3 vocabulary, few rows (decode-like): row length dominates, not the row count.
    Shape("llama3-decode", 8, 128256, torch.float32, "cpu"),
    # Many short rows: per-row overhead dominates.
    Shape("short-rows", 65536, 64, torch.float32, "cpu", ops=("softmax", "log_softmax", "logsumexp")),
    # Quick (CI) shapes.
    Shape("quick-1k", 64, 1024, torch.float32, "cpu", quick=True),
    Shape("quick-32k", 8, 32000, torch.float32, "cpu", ops=_ISSUE_OPS, quick=True),
    # CUDA. M*V = 2**28 elements for the softmax family (bf16: 512 MiB of logits), vocabularies of real models.
    Shape("bf16-32k", 8192, 32768, torch.bfloat16, "cuda"),
    Shape("llama3", 2048, 128256, torch.bfloat16, "cuda"),
    Shape("gemma", 1024, 262144, torch.bfloat16, "cuda"),
    Shape("fp32-32k", 4096, 32000, torch.float32, "cuda", ops=_ISSUE_OPS),
    Shape("cuda-quick", 256, 4096, torch.bfloat16, "cuda", quick=True),
)


def select(device: str, quick: bool, ops: tuple[str, ...] | None = None, names: tuple[str, ...] | None = None):
    """The shapes to run on ``device`` (``names`` overrides ``quick``), each with its ops filtered by ``ops``."""
    chosen = []
    for shape in SHAPES:
        if shape.device != device:
            continue
        if names is not None:
            if shape.name not in names:
                continue
        elif shape.quick != quick:
            continue
        shape_ops = tuple(op for op in shape.ops if ops is None or op in ops)
        if shape_ops:
            chosen.append(
                Shape(shape.name, shape.M, shape.V, shape.dtype, shape.device, shape_ops, shape.modes, shape.quick)
            )
    return chosen
