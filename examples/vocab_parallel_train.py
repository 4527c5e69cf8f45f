"""Train a tiny language model whose classifier is sharded by vocabulary rows across ranks (CPU, gloo).

    torchrun --nproc-per-node 2 examples/vocab_parallel_train.py            # train, print both loss curves
    torchrun --nproc-per-node 2 examples/vocab_parallel_train.py --measure  # collectives, bytes, peak memory

Every rank holds the same trunk (embedding + one tanh layer, same seed) and its slice of the (V, D)
classifier; the loss is ``logitkit.distributed.linear_cross_entropy`` (logits never materialised). The
``--measure`` mode also runs ``logitkit.distributed.cross_entropy`` on local logits. The same model, unsharded, is
trained beside it in the same process with ``logitkit.cross_entropy``; both loss curves are printed.
No gradient all-reduce is needed for the trunk: the loss's backward all-reduces the hidden-state gradient,
so every rank computes identical trunk gradients.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import logitkit
import logitkit.distributed as lkd


class Trunk(torch.nn.Module):
    def __init__(self, V: int, D: int):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)

    def forward(self, tokens):
        return torch.tanh(self.mix(self.emb(tokens)))


def shard_sizes(V: int, world: int) -> list[int]:
    """Uneven on purpose: the first rank gets one class more than an even split."""
    base = [V // world] * world
    for i in range(V - sum(base)):
        base[i] += 1
    return base


def peak_rss_bytes(fn) -> int:
    """Peak resident memory added while ``fn`` runs (Linux VmHWM after resetting it via clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def train(args, rank: int, world: int) -> None:
    V, D, M = args.vocab, args.hidden, args.tokens
    torch.manual_seed(0)
    trunk = Trunk(V, D)
    W_full = torch.randn(V, D) * D**-0.5
    sizes = shard_sizes(V, world)
    start = sum(sizes[:rank])
    # The sharded model: same trunk, this rank's rows of the classifier.
    trunk_s = copy.deepcopy(trunk)
    W_s = torch.nn.Parameter(W_full[start : start + sizes[rank]].clone())
    # The unsharded reference model.
    W_u = torch.nn.Parameter(W_full.clone())
    opt_s = torch.optim.SGD([*trunk_s.parameters(), W_s], lr=args.lr)
    opt_u = torch.optim.SGD([*trunk.parameters(), W_u], lr=args.lr)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (args.steps, M + 1), generator=g)  # identical on every rank
    counter = lkd.CollectiveCounter()
    worst = 0.0
    for step in range(args.steps):
        tokens, target = data[step, :-1], data[step, 1:]
        with counter:
            counter.reset()
            h = trunk_s(tokens)
            loss_s = lkd.linear_cross_entropy(h, W_s, target)
            opt_s.zero_grad()
            loss_s.backward()
            opt_s.step()
        loss_u = logitkit.cross_entropy(F.linear(trunk(tokens), W_u), target)
        opt_u.zero_grad()
        loss_u.backward()
        opt_u.step()
        ls, lu = float(loss_s.detach()), float(loss_u.detach())
        worst = max(worst, abs(ls - lu) / lu)
        if rank == 0:
            print(f"step {step:3d}  sharded {ls:.6f}  unsharded {lu:.6f}  "
                  f"collectives {counter.total_calls} ({dict(counter.calls)})  bytes {counter.total_bytes}")
    if rank == 0:
        print(f"worst relative loss difference over {args.steps} steps: {worst:.2e}")


def measure(args, rank: int, world: int) -> None:
    V, D, M = args.vocab, args.hidden, args.tokens
    sizes = shard_sizes(V, world)
    start, n = sum(sizes[:rank]), sizes[rank]
    torch.manual_seed(0)
    h = torch.randn(M, D)
    W = torch.randn(V, D) * D**-0.5
    t = torch.randint(0, V, (M,))
    W_loc = W[start : start + n].clone()
    del W
    results = {}

    def sharded_ce():
        hh = h.clone().requires_grad_()
        ww = W_loc.clone().requires_grad_()
        with lkd.CollectiveCounter() as c:
            logits = F.linear(hh, ww)
            loss = lkd.cross_entropy(logits, t)
            loss.backward()
        results["ce"] = c

    def sharded_lce():
        hh = h.clone().requires_grad_()
        ww = W_loc.clone().requires_grad_()
        with lkd.CollectiveCounter() as c:
            loss = lkd.linear_cross_entropy(hh, ww, t)
            loss.backward()
        results["lce"] = c

    lkd.cross_entropy(F.linear(h[:4], W_loc), t[:4])  # warm-up outside the measurement
    mem_ce = peak_rss_bytes(sharded_ce)
    dist.barrier()
    mem_lce = peak_rss_bytes(sharded_lce)
    dist.barrier()
    out = torch.tensor([mem_ce, mem_lce], dtype=torch.float64)
    peaks = [torch.zeros_like(out) for _ in range(world)]
    dist.all_gather(peaks, out)
    if rank == 0:
        W_full = torch.randn(V, D) * D**-0.5

        def unsharded():
            hh = h.clone().requires_grad_()
            ww = W_full.clone().requires_grad_()
            logits = F.linear(hh, ww)
            logitkit.cross_entropy(logits, t).backward()

        mem_u = peak_rss_bytes(unsharded)
        MiB = 2**20
        print(f"M={M} D={D} V={V} world={world} shards={sizes}; fp32 logits unsharded = {M * V * 4 / MiB:.0f} MiB")
        print(f"unsharded logitkit.cross_entropy(F.linear(h, W)): peak +{mem_u / MiB:.0f} MiB")
        for r, p in enumerate(peaks):
            print(f"rank {r}: lkd.cross_entropy(local logits) peak +{p[0] / MiB:.0f} MiB; "
                  f"lkd.linear_cross_entropy peak +{p[1] / MiB:.0f} MiB")
        for name in ("ce", "lce"):
            c = results[name]
            print(f"{name}: {c.total_calls} collectives per step {dict(c.calls)}, bytes per rank {dict(c.bytes)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="report collectives, bytes and peak memory instead")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.5)
    args = p.parse_args()
    big = args.measure
    args.vocab = args.vocab or (32768 if big else 1001)
    args.hidden = args.hidden or (128 if big else 32)
    args.tokens = args.tokens or (4096 if big else 64)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        (measure if big else train)(args, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
