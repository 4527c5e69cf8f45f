"""The ``logitkit`` command end to end, in-process: quick accuracy and bench runs, their JSON and PNG files."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from logitkit.cli import main

# What every JSON file must say about where and with what it was measured.
META_KEYS = {"date", "git_commit", "device", "gpu", "cpu", "python", "torch", "triton"}


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory):
    """One quick accuracy run shared by the tests below: (exit code, printed text, JSON payload, PNG path)."""
    tmp = tmp_path_factory.mktemp("accuracy")
    json_path, png_path = tmp / "accuracy.json", tmp / "accuracy.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["accuracy", "--quick", "--json", str(json_path), "--plot", str(png_path)])
    return code, out.getvalue(), json.loads(json_path.read_text()), png_path


def test_accuracy_quick_report(accuracy_run):
    code, out, payload, png_path = accuracy_run
    assert code in (0, 1), out
    assert "headline:" in out
    assert png_path.stat().st_size > 0
    assert payload["kind"] == "accuracy" and payload["quick"] is True
    assert META_KEYS <= payload["meta"].keys()
    ops = {e["op"] for e in payload["summary"]}
    assert ops == {"softmax", "log_softmax", "logsumexp", "cross_entropy"}
    assert {e["dtype"] for e in payload["summary"]} == {"float32", "bfloat16", "float16"}
    for entry in payload["summary"]:
        assert {"logitkit", "torch"} <= entry["impl"].keys()
        assert entry["target"] in (1.0, 2.0, 4.0)
        assert entry["pass"] == (entry["impl"]["logitkit"]["max"] <= entry["target"])
    # Naive log(softmax) is measured where it applies, SciPy in float32 only.
    naive_ops = {e["op"] for e in payload["summary"] if "naive" in e["impl"]}
    assert naive_ops == {"log_softmax", "cross_entropy"}
    assert {e["dtype"] for e in payload["summary"] if "scipy" in e["impl"]} == {"float32"}
    assert all({"op", "dtype", "family", "V", "M", "impl", "target", "pass"} <= r.keys() for r in payload["rows"])
    # The exit code is the verdict: 1 exactly when a cell misses its target.
    assert code == (0 if all(e["pass"] for e in payload["summary"]) else 1)


def test_accuracy_headline(accuracy_run):
    # The rest-sum and log1p keep log_softmax([0, -20])[0], its loss and gradient sum within 2 ulps.
    h = accuracy_run[2]["headline"]
    assert h["log_softmax_logitkit"] == pytest.approx(h["log_softmax_truth"], rel=2 * 2.0**-23)
    assert h["cross_entropy_logitkit"] == pytest.approx(h["cross_entropy_truth"], rel=2 * 2.0**-23)
    assert abs(h["grad_sum_logitkit"]) <= 2 * 2.0**-24 * 2.0**-28  # a couple of ulps of the 2e-9 entries
    assert h["log_softmax_torch"] == 0.0  # the failure logitkit exists to fix; if torch fixes it, update this


def test_accuracy_quick_meets_targets(accuracy_run):
    code, _, payload, _ = accuracy_run
    failed = [
        (e["op"], e["dtype"], e["family"], e["impl"]["logitkit"]["max"], e["target"])
        for e in payload["summary"]
        if not e["pass"]
    ]
    assert not failed, f"logitkit over its NUMERICS.md target (op, dtype, family, max ulps, target): {failed}"
    assert code == 0


def test_bench_quick_writes_rows(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(png_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert png_path.stat().st_size > 0
    payload = json.loads(json_path.read_text())
    assert payload["kind"] == "bench"
    assert META_KEYS <= payload["meta"].keys()
    assert payload["copy"]["tb_s"] > 0
    rows = payload["rows"]
    assert {r["provider"] for r in rows} >= {"logitkit", "torch"}
    assert {(r["op"], r["mode"]) for r in rows if r["provider"] == "logitkit"} >= {
        ("softmax", "fwd"),
        ("softmax", "fwd+bwd"),
        ("cross_entropy", "fwd"),
        ("cross_entropy", "fwd+bwd"),
    }
    for r in rows:
        assert r["error"] is None, r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["ideal_bytes"] > 0 and r["tb_s"] > 0
        assert r["ratio_vs_torch"] is not None
        if r["provider"] == "torch":
            assert r["ratio_vs_torch"] == 1.0
    # Peak memory comes from a subprocess reading the kernel's peak RSS; a forward writes at least its output.
    softmax_fwd = [r for r in rows if (r["op"], r["mode"], r["provider"]) == ("softmax", "fwd", "logitkit")]
    assert all(r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0 for r in softmax_fwd)


def test_bench_op_filter(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    code = main(
        ["bench", "--quick", "--device", "cpu", "--op", "logsumexp", "--provider", "logitkit", "--json", str(json_path)]
    )
    assert code == 0, capsys.readouterr().out
    rows = json.loads(json_path.read_text())["rows"]
    assert {r["op"] for r in rows} == {"logsumexp"}
    assert {r["provider"] for r in rows} == {"logitkit", "torch"}  # torch is kept for the ratio


def test_unknown_subcommand_errors(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_subcommand_errors(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cuda_without_device(capsys):
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_linear_ce_suite_quick(tmp_path, capsys):
    """The linear cross-entropy suite runs on the CPU: time and peak memory for torch and logitkit."""
    json_path = tmp_path / "lce.json"
    code = main(["bench", "--suite", "linear-ce", "--quick", "--device", "cpu", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    payload = json.loads(json_path.read_text())
    assert META_KEYS <= payload["meta"].keys()
    measured = {r["provider"]: r for r in payload["rows"] if "median_ms" in r}
    assert {"torch", "logitkit"} <= measured.keys()
    for r in measured.values():
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["tflop_s"] > 0
        assert r["error"] is None and r["peak_extra_bytes"] is not None, r
    skipped = [r for r in payload["rows"] if "skipped" in r]
    assert all(r["skipped"] for r in skipped)  # a missing peer says why


def test_gpu_softmax_suite_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--suite", "gpu-softmax", "--device", "cpu"]) == 2


def test_bench_budget_stops_between_cases_and_lists_the_rest(tmp_path, capsys):
    """--budget-s 0: the budget is checked before each case, so none starts; every case is listed as left out,
    and the JSON is still written."""
    json_path = tmp_path / "lce.json"
    code = main(["bench", "--suite", "linear-ce", "--quick", "--device", "cpu", "--json", str(json_path),
                 "--budget-s", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == [] and payload["truncated"]["budget_s"] == 0
    from benchmarks import linear_ce

    assert len(payload["truncated"]["cases_left"]) == len(linear_ce.PROVIDERS)
    assert "cases not run" in out


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "soon"])
def test_bench_budget_must_be_seconds(bad, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "linear-ce", "--budget-s", bad])
    assert "--budget-s" in capsys.readouterr().err


def test_deadline_and_case_orders():
    from benchmarks import gpu_cross_entropy, gpu_softmax, harness

    assert not harness.Deadline(None).expired() and harness.Deadline(0).expired()
    assert not harness.Deadline(3600).expired() and harness.Deadline(5).truncation([]) is None
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="budget_s"):
            harness.Deadline(bad)
    grid = gpu_softmax.cases()
    # the full grid, each case once, with the spread of row lengths first
    assert sorted(grid) == sorted((d, n, lay) for d in gpu_softmax.DTYPES for n in gpu_softmax.NS
                                  for lay in ("last", "non-last"))
    assert [n for _, n, _ in grid[:12:4]] == [4096, 131072, 1048576]
    assert {n for _, n, _ in gpu_softmax.cases(quick=True)} == set(gpu_softmax.NS[:2])
    assert gpu_softmax.cases(ns=[1024], dtypes=["fp32"]) == [("fp32", 1024, "last"), ("fp32", 1024, "non-last")]
    with pytest.raises(ValueError, match="ns"):
        gpu_softmax.cases(ns=[1000])
    with pytest.raises(ValueError, match="dtypes"):
        gpu_softmax.cases(dtypes=["fp8"])
    ce = gpu_cross_entropy.cases()
    assert ce[0] == ("bf16", 8192, 128256) and len(ce) == len(set(ce)) == 6


def test_suite_reports_every_row_as_it_lands():
    from benchmarks import linear_ce

    seen = []
    payload = linear_ce.run("cpu", True, providers=["torch", "logitkit"], on_row=lambda p: seen.append(len(p["rows"])))
    assert seen == [1, 2] and payload["truncated"] is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or torch.cuda.is_available(),
                    reason="the CPU smoke run of the resident comparison needs Triton's interpreter")
def test_gpu_softmax_resident_comparison_smoke(monkeypatch):
    # benchmarks/gpu_softmax.py --resident on small CPU tensors: tiles of 16 (fp32) / 32 (bf16) columns, so a
    # 64-long row is a group of 4 / 2 programs; the resident rows must equal the default's to within rounding.
    pytest.importorskip("triton")
    from benchmarks import gpu_softmax

    from logitkit.triton import _tuning

    monkeypatch.setattr(_tuning, "SOFTMAX_ROW_TILE", {2: 32, 4: 16, 8: 8})
    payload = gpu_softmax.run_resident(device="cpu", ns=(64,), elems=64 * 16, bench=lambda fn: (fn(), 1.0)[1],
                                       copy_tbs=1.0)
    rows = payload["rows"]
    assert len(rows) == 16 and not any("error" in r for r in rows), rows
    for r in rows:
        want = ("resident",) if r["provider"] == "logitkit-resident" else ("loop", "split")  # the default: 2 reads
        assert r["config"]["regime"] in want, r
        if r["provider"] == "logitkit-resident":
            assert r["max_abs_diff_vs_default"] <= (2e-2 if r["dtype"] == "bf16" else 1e-6), r
