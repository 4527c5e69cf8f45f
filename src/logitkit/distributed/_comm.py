"""The only place logitkit.distributed talks to the network: collectives, a counter, the shard layout.

Every collective goes through ``all_reduce`` / ``all_gather_sizes`` here, so ``CollectiveCounter`` sees them
all.  Payload bytes are counted per rank, as the tensor each rank hands to the collective (what an
all-reduce moves per rank is about 2x that on a ring; the ratio is the same for every op, so counts compare).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

_ACTIVE: list["CollectiveCounter"] = []


class CollectiveCounter:
    """Counts the collectives logitkit.distributed issues while active (a context manager; nests).

    ``calls[name]`` and ``bytes[name]`` per collective kind ('all_reduce.max', 'all_reduce.sum',
    'all_gather'); ``total_calls`` / ``total_bytes`` sum them. Bytes are the payload each rank sends in.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> "CollectiveCounter":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {self.calls[k]} calls / {self.bytes[k]} B" for k in sorted(self.calls))
        return f"CollectiveCounter({parts})"


def _record(name: str, nbytes: int) -> None:
    for c in _ACTIVE:
        c.calls[name] += 1
        c.bytes[name] += nbytes


def all_reduce(t: Tensor, op: str, group) -> Tensor:
    """In-place all-reduce of ``t`` (``op`` is 'max' or 'sum'); a no-op on a group of one rank."""
    if dist.get_world_size(group) == 1:
        return t
    _record(f"all_reduce.{op}", t.numel() * t.element_size())
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


class Shard(NamedTuple):
    """This rank's slice of the class dimension: classes [start, start + size) of V."""

    start: int
    size: int
    V: int | None  # None when the caller gave vocab_start= (then V comes from the packed all-reduce)


# (group, local size) -> (start, V). Every rank of a group keys on its own local size, so all ranks hit or
# miss together as long as shard sizes change on all ranks at once (or vocab_start= is passed).
_SIZES: dict[tuple, tuple[int, int]] = {}


def reset_shard_cache() -> None:
    """Forget the cached shard offsets; call it on every rank of a group whose shard sizes change."""
    _SIZES.clear()


def all_gather_sizes(group, size: int, device: torch.device) -> tuple[int, int]:
    """(start, V) for this rank's shard of ``size`` classes: one all-gather of one int64, then cached."""
    key = (group if group is not None else dist.group.WORLD, size)
    hit = _SIZES.get(key)
    if hit is not None:
        return hit
    n = dist.get_world_size(group)
    if n == 1:
        out = (0, size)
    else:
        mine = torch.tensor([size], dtype=torch.int64, device=device)
        parts = [torch.empty_like(mine) for _ in range(n)]
        _record("all_gather", mine.numel() * mine.element_size())
        dist.all_gather(parts, mine, group=group)
        sizes = [int(p) for p in parts]
        r = dist.get_rank(group)
        out = (sum(sizes[:r]), sum(sizes))
    _SIZES[key] = out
    return out


def shard_of(group, size: int, vocab_start: int | None, device: torch.device, need_start: bool) -> Shard:
    """The shard layout; the all-gather runs only when an op needs class offsets and none were given."""
    if vocab_start is not None:
        if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        return Shard(vocab_start, size, None)
    if not need_start:
        return Shard(0, size, None)
    start, V = all_gather_sizes(group, size, device)
    return Shard(start, size, V)
