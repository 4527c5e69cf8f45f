"""logitkit.distributed on gloo (CPU): each rank's outputs and gradients against the single-process result.

One spawn per world size (a module fixture) runs every case on every rank and reports per case; the
parametrised tests below assert on those reports, so a failure names its case and rank.  Tolerances:
float32 1 ulp of the single-process value, elementwise; float64 1e-12 relative (TOL below); linear
cross-entropy against an unfused float64 F.linear + F.cross_entropy oracle (no single-device fused op yet).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import logitkit
import logitkit.distributed as lkd

F32, F64 = torch.float32, torch.float64

# The worlds: the smallest group, and one whose shards cannot be equal.
WORLDS = [2, 3]
# Uneven shard sizes of V = 37 per world size; the 3-rank list includes an empty shard.
SPLITS = {2: [(20, 17), (1, 36)], 3: [(5, 20, 12), (0, 25, 12)]}
# float32: ulps of the single-process value; float64: relative error.  Units of the "err" each case reports.
TOL = {F32: 1.0, F64: 1e-12}
DTYPES = [F32, F64]  # the two dtypes the issue names (half inputs use the same code path with fp32 working)


# --------------------------------------------------------------------------------------------------------
# error metrics
# --------------------------------------------------------------------------------------------------------


def err(got: torch.Tensor, ref: torch.Tensor, row_scaled: bool = False) -> float:
    """Worst elementwise error of got vs ref in units of TOL[ref.dtype]; special values must match exactly.

    ``row_scaled`` (gradients): the unit is TOL of the largest magnitude in the row (the last dim), the
    gradient analogue of the output metric: a gradient entry that cancels to ~0 has no relative accuracy
    on one process either.
    """
    got, ref = got.detach(), ref.detach()
    if row_scaled and ref.dim() > 0 and ref.numel():
        fin = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
        mx = fin.abs().amax(dim=-1, keepdim=True).expand_as(ref)
        if not ((torch.isnan(got) == torch.isnan(ref)).all() and (got[torch.isinf(ref)] == ref[torch.isinf(ref)]).all()):
            return math.inf
        ok = torch.isfinite(ref)
        d = (got[ok].double() - ref[ok].double()).abs()
        m = mx[ok]
        unit = (torch.nextafter(m, torch.full_like(m, math.inf)) - m).double() if ref.dtype == F32 else m.double() * TOL[F64]
        unit = unit.clamp_min(1e-300)
        return float((d / unit).max()) if d.numel() else 0.0
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    if ref.numel() == 0:
        return 0.0
    same_special = (torch.isnan(got) == torch.isnan(ref)).all() and (
        got[torch.isinf(ref)] == ref[torch.isinf(ref)]).all() and torch.isfinite(got[torch.isfinite(ref)]).all()
    if not same_special:
        return math.inf
    fin = torch.isfinite(ref)
    g, r = got[fin].double(), ref[fin].double()
    if r.numel() == 0:
        return 0.0
    if ref.dtype == F32:
        a = ref[fin].abs()
        ulp = (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()
        return float(((g - r).abs() / ulp).max())
    scale = r.abs().clamp_min(1e-300)
    return float(((g - r).abs() / scale).max() / TOL[F64])


class Ctx:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def split(self, x: torch.Tensor, sizes, dim: int = -1) -> torch.Tensor:
        start = sum(sizes[: self.rank])
        return x.narrow(dim, start, sizes[self.rank]).contiguous()


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(map(ord, name)) * 7919)


def _logits(name: str, M: int, V: int, dtype) -> torch.Tensor:
    """N(0, 3) rows plus the NUMERICS.md hard rows: confident, a tie across shards, -inf entries, large offset."""
    g = _gen(name)
    x = torch.randn(M, V, generator=g, dtype=F64) * 3
    x[0] = -30.0
    x[0, 0] = 0.0  # confident: loss 1e-13-ish, must not be 0 (it lies on the first shard)
    x[1] = -25.0
    x[1, -1] = 0.0  # confident, max on the last shard
    x[2, 3] = x[2, V - 2] = x[2].max() + 1.0  # a tie across shards
    x[3, 5:9] = -math.inf
    x[4] += 1e4
    return x.to(dtype)


def _grad_through(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().clone().requires_grad_()
    y = fn(xr)
    (gx,) = torch.autograd.grad(y, xr, g)
    return y.detach(), gx


# --------------------------------------------------------------------------------------------------------
# cases: each returns {label: err} (all <= 1 to pass) and runs identically on every rank
# --------------------------------------------------------------------------------------------------------

CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn

    return deco


def _normalize_case(log: bool, masked: bool):
    def run(ctx):
        out = {}
        for dtype in DTYPES:
            for sizes in SPLITS[ctx.world]:
                V = sum(sizes)
                x = _logits(f"norm{log}{masked}", 7, V, dtype)
                mask = None
                if masked:
                    mask = torch.rand(7, V, generator=_gen("mask")) > 0.3
                    mask[5] = False  # an all-masked row: softmax 0, log_softmax -inf, gradient 0
                    mask[0, 0] = True
                gy = torch.randn(7, V, generator=_gen("gy"), dtype=dtype)
                single = logitkit.log_softmax if log else logitkit.softmax
                dist_fn = lkd.log_softmax if log else lkd.softmax
                y_ref, gx_ref = _grad_through(lambda t: single(t, -1, mask=mask), x, gy)
                m_loc = None if mask is None else ctx.split(mask, sizes)
                y, gx = _grad_through(lambda t: dist_fn(t, -1, mask=m_loc), ctx.split(x, sizes), ctx.split(gy, sizes))
                tag = f"{dtype}{sizes}"
                out[f"y {tag}"] = err(y, ctx.split(y_ref, sizes))
                out[f"dx {tag}"] = err(gx, ctx.split(gx_ref, sizes), True)
        return out

    return run


case("softmax")(_normalize_case(False, False))
case("log_softmax")(_normalize_case(True, False))
case("softmax_masked")(_normalize_case(False, True))
case("log_softmax_masked")(_normalize_case(True, True))


@case("logsumexp")
def _lse(ctx):
    out = {}
    for dtype in DTYPES:
        for sizes in SPLITS[ctx.world]:
            V = sum(sizes)
            x = _logits("lse", 6, V, dtype).reshape(2, 3, V)
            g = torch.randn(2, 3, generator=_gen("glse"), dtype=dtype)
            y_ref, gx_ref = _grad_through(lambda t: logitkit.logsumexp(t, -1), x, g)
            y, gx = _grad_through(lambda t: lkd.logsumexp(t, -1), ctx.split(x, sizes), g)
            out[f"y {dtype}{sizes}"] = err(y, y_ref)
            out[f"dx {dtype}{sizes}"] = err(gx, ctx.split(gx_ref, sizes), True)
    return out


# Cross-entropy options: every reduction; weights none / full / local slice; smoothing off / on; ignored rows.
CE_OPTIONS = [
    dict(reduction=r, weight=w, label_smoothing=ls)
    for r in ("none", "mean", "sum")
    for w in (None, "full", "local")
    for ls in (0.0, 0.1)
]


@case("cross_entropy")
def _ce(ctx):
    out = {}
    M = 9
    for dtype in DTYPES:
        for sizes in SPLITS[ctx.world]:
            V = sum(sizes)
            x = _logits("ce", M, V, dtype)
            t = torch.randint(0, V, (M,), generator=_gen("t"))
            t[0], t[1], t[2] = 0, V - 1, 3
            t[6] = -100  # ignored
            cw = torch.rand(V, generator=_gen("cw"), dtype=dtype) + 0.5
            for opt in CE_OPTIONS:
                w_ref = None if opt["weight"] is None else cw
                w_loc = {None: None, "full": cw, "local": ctx.split(cw, sizes)}[opt["weight"]]
                kw = dict(reduction=opt["reduction"], label_smoothing=opt["label_smoothing"])
                g = torch.randn(M, generator=_gen("gce"), dtype=dtype) if kw["reduction"] == "none" else None
                g = torch.tensor(0.7, dtype=dtype) if g is None else g
                y_ref, gx_ref = _grad_through(lambda s: logitkit.cross_entropy(s, t, w_ref, **kw), x, g)
                y, gx = _grad_through(lambda s: lkd.cross_entropy(s, t, w_loc, **kw), ctx.split(x, sizes), g)
                tag = f"{dtype}{sizes}{opt}"
                out[f"loss {tag}"] = err(y, y_ref)
                out[f"dx {tag}"] = err(gx, ctx.split(gx_ref, sizes), True)
    return out


@case("cross_entropy_zloss_softcap_3d")
def _ce_extra(ctx):
    out = {}
    for dtype in DTYPES:
        sizes = SPLITS[ctx.world][0]
        V = sum(sizes)
        x = _logits("ce3", 6, V, dtype).reshape(2, 3, V).transpose(1, 2).contiguous()  # (N, C, d1)
        t = torch.randint(0, V, (2, 3), generator=_gen("t3"))
        t[0, 1] = -100
        for kw in (dict(z_loss=1e-3), dict(softcap=5.0), dict(reduction="none", label_smoothing=0.2)):
            g = torch.randn(2, 3, dtype=dtype, generator=_gen("g3")) if kw.get("reduction") else torch.tensor(1.3, dtype=dtype)
            y_ref, gx_ref = _grad_through(lambda s: logitkit.cross_entropy(s, t, **kw), x, g)
            y, gx = _grad_through(lambda s: lkd.cross_entropy(s, t, **kw), ctx.split(x, sizes, 1), g)
            out[f"loss {dtype}{kw}"] = err(y, y_ref)
            out[f"dx {dtype}{kw}"] = err(gx, ctx.split(gx_ref, sizes, 1), True)
    return out


@case("cross_entropy_vocab_start")
def _ce_vs(ctx):
    out = {}
    sizes = SPLITS[ctx.world][0]
    V = sum(sizes)
    for dtype in DTYPES:
        x = _logits("cevs", 5, V, dtype)
        t = torch.randint(0, V, (5,), generator=_gen("tvs"))
        y_ref, gx_ref = _grad_through(lambda s: logitkit.cross_entropy(s, t, label_smoothing=0.05), x, torch.tensor(1.0, dtype=dtype))
        y, gx = _grad_through(
            lambda s: lkd.cross_entropy(s, t, label_smoothing=0.05, vocab_start=sum(sizes[: ctx.rank])),
            ctx.split(x, sizes), torch.tensor(1.0, dtype=dtype),
        )
        out[f"loss {dtype}"] = err(y, y_ref)
        out[f"dx {dtype}"] = err(gx, ctx.split(gx_ref, sizes), True)
    return out


@case("selective_log_softmax")
def _sel(ctx):
    out = {}
    for dtype in DTYPES:
        for sizes in SPLITS[ctx.world]:
            V = sum(sizes)
            x = _logits("sel", 6, V, dtype)
            idx = torch.randint(0, V, (6, 4), generator=_gen("idx"))
            idx[0, 0], idx[1, 1] = 0, V - 1
            g = torch.randn(6, 4, generator=_gen("gsel"), dtype=dtype)
            y_ref, gx_ref = _grad_through(lambda s: logitkit.selective_log_softmax(s, idx), x, g)
            y, gx = _grad_through(lambda s: lkd.selective_log_softmax(s, idx), ctx.split(x, sizes), g)
            out[f"y {dtype}{sizes}"] = err(y, y_ref)
            out[f"dx {dtype}{sizes}"] = err(gx, ctx.split(gx_ref, sizes), True)
    return out


@case("entropy")
def _ent(ctx):
    out = {}
    for dtype in DTYPES:
        for sizes in SPLITS[ctx.world]:
            V = sum(sizes)
            x = _logits("ent", 6, V, dtype)
            g = torch.randn(6, generator=_gen("gent"), dtype=dtype)
            y_ref, gx_ref = _grad_through(logitkit.entropy, x, g)
            y, gx = _grad_through(lkd.entropy, ctx.split(x, sizes), g)
            out[f"y {dtype}{sizes}"] = err(y, y_ref)
            out[f"dx {dtype}{sizes}"] = err(gx, ctx.split(gx_ref, sizes), True)
    return out


def run_worker(rank: int, world: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    ctx = Ctx(rank, world)
    results = {}
    try:
        for name in names:
            try:
                results[name] = ("ok", CASES[name](ctx))
            except Exception:  # noqa: BLE001 - reported to the parent, which fails that case
                results[name] = ("error", traceback.format_exc())
                break  # the other ranks may be inside a collective of this case: stop, do not cascade
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, names: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run_worker, args=(world, _free_port(), d, names), nprocs=world, join=True)
        return {r: torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)}


_REPORTS: dict[int, dict] = {}


@pytest.fixture(scope="module", params=WORLDS)
def report(request):
    world = request.param
    if world not in _REPORTS:
        _REPORTS[world] = spawn(world, list(CASES))
    return _REPORTS[world]


@pytest.mark.parametrize("name", list(CASES))
def test_case(report, name):
    failures = []
    for rank, res in report.items():
        status, val = res.get(name, ("error", "not run: an earlier case failed on this rank"))
        if status != "ok":
            failures.append(f"rank {rank}:\n{val}")
            continue
        bad = {k: v for k, v in val.items() if not v <= 1.0}
        if bad:
            failures.append(f"rank {rank}: " + "; ".join(f"{k}: {v:.3g}" for k, v in bad.items()))
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # calibration: print every case's worst errors
    for world in WORLDS:
        rep = spawn(world, list(CASES))
        for name in CASES:
            for rank, (status, val) in rep[world if False else rank].items() if False else []:
                pass
        for rank, res in rep.items():
            for name, (status, val) in res.items():
                if status != "ok":
                    print(world, rank, name, val)
                else:
                    for k, v in sorted(val.items(), key=lambda kv: -kv[1])[:3]:
                        print(world, rank, name, f"{v:.3g} at {k}")
