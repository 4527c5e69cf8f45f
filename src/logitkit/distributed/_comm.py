"""The only place logitkit.distributed talks to the network: collectives, a counter, the shard layout.

Every collective goes through ``all_reduce`` here, so ``CollectiveCounter`` sees them all.  Payload bytes
are counted per rank, as the tensor each rank hands to the collective (what an all-reduce moves per rank is
about 2x that on a ring; the ratio is the same for every op, so counts compare).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

_ACTIVE: list[CollectiveCounter] = []


class CollectiveCounter:
    """Counts the collectives logitkit.distributed issues while active (a context manager; nests).

    ``calls[name]`` and ``bytes[name]`` per collective kind ('all_reduce.max', 'all_reduce.sum');
    ``total_calls`` / ``total_bytes`` sum them. Bytes are the payload each rank sends in.
    """

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> CollectiveCounter:
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

    start: int | None  # None until the forward's all-reduce(max) has carried the local sizes (max_and_layout)
    size: int
    V: int | None  # None when the caller gave vocab_start= (then V comes from the packed all-reduce(sum))


# Each rank's local size rides the forward's all-reduce(max) in two slots of its own (the other ranks send 0,
# which MAX leaves alone): as two base-2**24 digits, each exact in float32, so any size below 2**48 survives.
_DIGIT = 1 << 24

# linear_cross_entropy needs its offset before the one collective that could carry it (it forms the logits
# and picks the target's column before the max is known), so it starts from a guess: the offset it saw last
# for this (group, local size). A guess is only a guess: the all-reduce(max) tells every rank its true offset,
# and a wrong guess costs a local recomputation, never a collective, so ranks can never disagree on the
# collectives they issue, whatever their sizes do.
_START_GUESS: dict[tuple, int] = {}


def _key(group, size: int) -> tuple:
    return (group if group is not None else dist.group.WORLD, size)


def reset_shard_cache() -> None:
    """No longer needed: every call finds the shard layout in its own forward's all-reduce(max), so shard
    sizes may change on any rank between calls. Kept for compatibility; it only drops the remembered offsets
    ``linear_cross_entropy`` starts from (each is checked on every call, so stale ones are harmless)."""
    _START_GUESS.clear()


def start_guess(group, size: int) -> int:
    """Where linear_cross_entropy assumes this rank's shard starts before the layout arrives."""
    return _START_GUESS.get(_key(group, size), dist.get_rank(group) * size)  # right for even shards


def remember_start(group, shard: Shard) -> None:
    _START_GUESS[_key(group, shard.size)] = shard.start


def max_and_layout(a: Tensor, shard: Shard, group) -> Shard:
    """All-reduce(max) of ``a`` in place; when the layout is not known yet, every rank's local size rides
    along in slots of its own, and the returned shard has its start (sum of the lower ranks' sizes) and V."""
    if shard.start is not None:
        all_reduce(a, "max", group)
        return shard
    n, r = dist.get_world_size(group), dist.get_rank(group)
    slots = torch.zeros(n, 2, dtype=a.dtype)
    slots[r, 0], slots[r, 1] = divmod(shard.size, _DIGIT)
    buf = torch.cat([a.reshape(-1), slots.reshape(-1).to(a.device)])
    all_reduce(buf, "max", group)
    a.copy_(buf[: a.numel()].view(a.shape))
    hi, lo = buf[a.numel() :].view(n, 2).to(torch.int64).unbind(1)
    sizes = (hi * _DIGIT + lo).tolist()  # the layout as host ints: one small device-to-host copy
    assert sizes[r] == shard.size, (sizes, r, shard.size)
    return Shard(sum(sizes[:r]), shard.size, sum(sizes))


def shard_of(group, size: int, vocab_start: int | None) -> Shard:
    """The shard layout as far as it is known before any collective: this rank's start when the caller gave
    ``vocab_start=`` (or the group has one rank); otherwise start and V stay None until ``max_and_layout``."""
    if vocab_start is not None:
        if not isinstance(vocab_start, int) or isinstance(vocab_start, bool) or vocab_start < 0:
            raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
        return Shard(vocab_start, size, None)
    if dist.get_world_size(group) == 1:
        return Shard(0, size, size)
    return Shard(None, size, None)
