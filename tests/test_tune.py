"""benchmarks/tune.py (the blocks-and-warps sweep) in its CPU mode, and the forcing hooks of triton/_tuning.py.

The sweep is meant for a GPU; here it runs ``--device cpu --quick`` under Triton's interpreter on tiny shapes so
that its code cannot rot: the JSON's structure, the guard, errors recorded per candidate, the budget, and the
CUDA plan (candidate generation for a 132-SM device, which needs no GPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the sweep's CPU mode runs the kernels under TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # benchmarks/ sits in the checkout's root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tune  # noqa: E402

from logitkit.triton import _tuning  # noqa: E402

CPU = torch.device("cpu")
ROW_KEYS = {"family", "op", "direction", "dtype", "layout", "M", "N", "label", "candidate", "is_default", "spec",
            "config", "config_label"}


def _run(tmp_path, *args):
    out = tmp_path / "tune.json"
    payload = tune.main(["--device", "cpu", "--quick", "--out", str(out), *args])
    on_disk = json.loads(out.read_text())
    assert on_disk["status"] == json.loads(json.dumps(payload["status"]))
    return on_disk


def test_quick_cpu_run_writes_the_table_and_a_proposal(tmp_path):
    d = _run(tmp_path)
    assert {"meta", "copy", "rows", "cases", "status", "proposal"} <= set(d)
    assert d["meta"]["device"] == "cpu" and d["meta"]["git_commit"] is not None and d["meta"]["triton"]
    assert d["copy"]["tb_s"] > 0
    assert not d["status"]["stopped_early"] and d["status"]["cases_done"] == d["status"]["cases_total"] > 0
    assert {"cross_entropy", "softmax"} == {r["family"] for r in d["rows"]}
    assert {"softmax", "log_softmax"} <= {r["op"] for r in d["rows"]}
    assert {"fwd", "bwd", "fwd+bwd"} == {r["direction"] for r in d["rows"]}
    assert {"last", "non-last", "rows"} == {r["layout"] for r in d["rows"]}
    for r in d["rows"]:
        assert ROW_KEYS <= set(r), r
        assert r.get("error") is None, r
        assert r["median_ms"] > 0 and r["tb_s"] > 0 and r["frac_copy"] > 0
        if not r["is_default"]:  # every forced candidate was guarded against the default, and passed
            assert r["check"]["ok"] and r["check"]["nonfinite_mismatch"] == 0, r
            case = tune.Case(*(r[k] for k in ("family", "op", "direction", "dtype", "layout", "M", "N")))
            assert r["spec"] is not None and tune.resolved_config(case, CPU, r["spec"]) == r["config"]
    # a forced candidate resolves to a config other than the default's, so it ran something else
    for label in {r["label"] for r in d["rows"]}:
        rs = [r for r in d["rows"] if r["label"] == label and not r.get("repeat_of_default")]
        assert rs[0]["is_default"] and sum(r["is_default"] for r in rs) == 1
        assert len({r["config_label"] for r in rs}) == len(rs)
        assert any(r.get("repeat_of_default") for r in d["rows"] if r["label"] == label)
    cases = d["proposal"]["cases"]
    assert len(cases) == d["status"]["cases_done"]
    for c in cases:
        assert c["default_over_best"] >= 1.0 and c["best"]["ms"] <= c["default"]["ms"]
    entries = d["proposal"]["table_entries"]
    softmax_entries = [e for e in entries if e["family"] == "softmax"]
    assert softmax_entries and all(len(e["cases"]) == 4 for e in softmax_entries)  # fwd and bwd of both ops
    assert all(e["best"]["total_ms"] <= e["default"]["total_ms"] for e in entries)


def test_second_pass_order_is_swept_where_the_default_loops(tmp_path, monkeypatch):
    # rows of 512 past a 128 block: the default loops, so the sweep times it in the other order too
    monkeypatch.setattr(_tuning, "CE_MAX_BLOCK_V_CPU", 128)
    d = _run(tmp_path, "--only", "cross_entropy", "--jobs", "1")
    rows = [r for r in d["rows"] if not r.get("repeat_of_default")]
    default = [r for r in rows if r["is_default"]]
    flipped = [r for r in rows if r["spec"] and "reverse" in r["spec"]]
    assert len(default) == len(flipped) == d["status"]["cases_total"] == 1
    assert default[0]["config"] == {"BLOCK_V": 128, "num_warps": 4, "reverse": False}  # no cache model here
    assert flipped[0]["config"] == {**default[0]["config"], "reverse": True}
    assert flipped[0]["config_label"].endswith(" R") and flipped[0]["check"]["ok"]
    (order,) = d["proposal"]["order"]
    assert order["model_reverse"] is False and order["model_over_flipped"] > 0
    info = d["cases"][0]["precompile"]  # the pinned specs (order included) ran in the worker
    assert info["compiled"] == info["of"] == d["cases"][0]["candidates"] and info["errors"] == 0
    assert "order " in tune.summary(d)


def test_pinned_specs_carry_the_full_shape_order(monkeypatch):
    """A compile worker runs 16 rows: the spec it gets names the order the full case takes (model: reverse)."""
    monkeypatch.setattr(_tuning, "_sm_count", lambda idx: 132)
    monkeypatch.setattr(_tuning, "_l2_bytes", lambda idx: 50 << 20)
    cuda = torch.device("cuda", 0)
    case = tune.Case("cross_entropy", "cross_entropy", "fwd+bwd", "bf16", "rows", 4096, 262144)
    assert tune._pinned(case, cuda, None) == dict(block_v=16384, num_warps=16, exact=True, reverse=True)
    assert tune._pinned(case, cuda, dict(block_v=8192, num_warps=8, exact=True))["reverse"] is True
    small = tune.Case("cross_entropy", "cross_entropy", "fwd+bwd", "bf16", "rows", 16, 262144)
    assert tune.resolved_config(small, cuda, None)["reverse"] is False  # what the 16-row copy would take
    specs = tune.candidates(case, cuda, quick=True)
    assert specs[0] is None and specs[1] == dict(block_v=16384, num_warps=16, exact=True, reverse=False)
    sm = tune.Case("softmax", "softmax", "bwd", "bf16", "last", 256, 1 << 20)
    assert tune.resolved_config(sm, cuda, None)["regime"] == "split"
    assert tune.candidates(sm, cuda, quick=False)[-1]["reverse"] is False  # the model reverses: flipped forward


def test_budget_zero_writes_a_valid_json_without_rows(tmp_path):
    d = _run(tmp_path, "--budget-s", "0")
    assert d["rows"] == [] and d["status"]["stopped_early"] and d["status"]["cases_done"] == 0
    assert d["proposal"] == {"cases": [], "table_entries": [], "order": []}


def test_budget_stops_between_candidates(tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    real = tune._now
    # the clock runs out at its sixth reading: after the default and one candidate of the first case
    monkeypatch.setattr(tune, "_now", lambda: real() if next(ticks) < 5 else 1e12)
    d = _run(tmp_path, "--only", "softmax fwd bf16 last")
    assert d["status"]["stopped_early"] and "budget" in d["status"]["stopped"]
    assert 0 < len(d["rows"]) < 4


def test_a_failing_candidate_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    plain = tune.candidates
    bad = dict(regime="loop", block_n=48, block_m=1, split=1, num_warps=4)  # not a power of two: tl.arange refuses

    def with_a_bad_one(case, device, quick):
        specs = plain(case, device, quick)
        return specs + [bad] if case.family == "softmax" else specs

    monkeypatch.setattr(tune, "candidates", with_a_bad_one)
    d = _run(tmp_path, "--only", "softmax fwd bf16 last,cross_entropy")
    failed = [r for r in d["rows"] if r["spec"] == bad]
    assert failed and all(r["error"] and "median_ms" not in r for r in failed)
    assert d["status"]["cases_done"] == d["status"]["cases_total"]
    assert all(c.get("error") is None for c in d["proposal"]["cases"])


def test_compile_workers_run_the_candidates_ahead(tmp_path):
    d = _run(tmp_path, "--jobs", "1", "--only", "softmax fwd bf16 last M=4")
    info = d["cases"][0]["precompile"]
    assert info["compiled"] == info["of"] == d["cases"][0]["candidates"] and info["errors"] == 0


def test_guard_catches_unwritten_and_wrong_values():
    case = tune.Case("softmax", "softmax", "fwd", "bf16", "non-last", 3, 5)
    want = torch.softmax(torch.randn(5, 3), 0).bfloat16()
    one_ulp = want.view(torch.int16).add(1).view(torch.bfloat16)  # a different reduction order's rounding
    assert tune.guard([one_ulp], [want], case)["ok"]
    assert tune.guard([want.clone()], [want], case)["bitwise_equal"]
    unwritten = want.clone()
    unwritten[2, 1] = float("nan")
    check = tune.guard([unwritten], [want], case)
    assert not check["ok"] and check["nonfinite_mismatch"] == 1
    swapped = want.flip(1)  # rows (columns of this (N, M) layout) mixed up
    assert not tune.guard([swapped], [want], case)["ok"]


def test_cuda_plan_needs_no_gpu(capsys):
    plan = tune.main(["--plan", "--jobs", "12"])
    assert plan["cases"] == 2 * (3 + 4 * len(tune.NS) * 2)  # two dtypes: CE shapes, softmax last and non-last
    assert 10 * plan["cases"] < plan["runs"] < 40 * plan["cases"]  # a bounded set per shape
    assert "estimate" in capsys.readouterr().out


def test_forced_softmax_configs_change_the_choice():
    geometry = (4096, 32768, 2, False, CPU)  # rows, N, bf16, contiguous
    default = _tuning.softmax_config(*geometry)
    with _tuning.force_softmax(num_warps=2):
        assert _tuning.softmax_config(*geometry) == default._replace(num_warps=2)
    with _tuning.force_softmax("loop", block_n=1024, block_m=2, num_warps=32):
        cfg = _tuning.softmax_config(*geometry)
        assert (cfg.regime, cfg.BLOCK_M, cfg.BLOCK_N, cfg.split, cfg.num_warps) == ("loop", 2, 1024, 1, 32)
    with _tuning.force_softmax("split", block_n=1024, block_m=1, split=4, num_warps=8):
        cfg = _tuning.softmax_config(*geometry)
        assert (cfg.regime, cfg.split, cfg.segment, cfg.num_warps) == ("split", 4, 8192, 8)
    assert _tuning.softmax_config(*geometry) == default  # the hook is gone after the block


def test_forced_cross_entropy_configs_change_the_choice():
    # the tables as they stand: capped at 16384 on CUDA (4096 in the interpreter), warps by block size
    assert _tuning.cross_entropy_config(128256, "cuda") == (16384, 16)
    assert _tuning.cross_entropy_config(1000, "cuda") == (1024, 4)
    assert _tuning.cross_entropy_config(128256, "cpu") == (4096, 8)
    with _tuning.force_cross_entropy(num_warps=4):
        assert _tuning.cross_entropy_config(128256, "cuda") == (16384, 4)
    with _tuning.force_cross_entropy(8192):  # a cap, as the tests use it
        assert _tuning.cross_entropy_config(128256, "cuda") == (8192, 8)
        assert _tuning.cross_entropy_config(100, "cuda") == (128, 4)
    with _tuning.force_cross_entropy(32768, num_warps=32, exact=True):  # past the device cap, past V too
        assert _tuning.cross_entropy_config(128256, "cuda") == (32768, 32)
        assert _tuning.cross_entropy_config(100, "cuda") == (32768, 32)
    assert _tuning.cross_entropy_config(128256, "cuda") == (16384, 16)


# not powers of two from 1 to 32, or not ints
BAD_WARPS = [0, 3, 64, -4, 2.0, True, "8"]


@pytest.mark.parametrize("num_warps", BAD_WARPS)
def test_num_warps_is_validated(num_warps):
    with pytest.raises(ValueError, match="num_warps"):
        with _tuning.force_softmax(num_warps=num_warps):
            pass
    with pytest.raises(ValueError, match="num_warps"):
        with _tuning.force_cross_entropy(1024, num_warps=num_warps):
            pass


def test_exact_block_needs_a_block():
    with pytest.raises(ValueError, match="exact"):
        with _tuning.force_cross_entropy(exact=True):
            pass
