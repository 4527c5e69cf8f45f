#!/usr/bin/env bash
# One GPU round in as few device calls as possible (../shared/gpu/README.md's routine), run from the repo root:
#
#   bash benchmarks/gpu_round.sh round      # everything below in ONE call, each part under its own time
#                                           #   budget (ROUND_BUDGET_S=420 by default, split check 18%,
#                                           #   softmax 32%, ce 22%, lce 16%, resident 12%); the benchmarks put the headline
#                                           #   cases first, stop between cases and rewrite their JSON after every
#                                           #   row: made for a 15-minute device budget (start included) with
#                                           #   room for a rerun
#   bash benchmarks/gpu_round.sh check      # ~2-4 min: versions, kernel correctness on CUDA tensors
#   bash benchmarks/gpu_round.sh softmax    # the gpu-softmax grid (issue 3)
#   bash benchmarks/gpu_round.sh ce         # the gpu-cross-entropy shapes (issue 4)
#   bash benchmarks/gpu_round.sh lce        # linear cross-entropy (issue 5)
#   bash benchmarks/gpu_round.sh resident   # the resident softmax regime against the default, N >= 32768
#   bash benchmarks/gpu_round.sh tune       # ~8 min: blocks/warps sweep of the kernels, a proposal for _tuning.py
#                                           #   (TUNE_BUDGET_S=420 by default; TUNE_ONLY="fp32 non-last,cross"
#                                           #   keeps cases whose label has one of these; TUNE_ARGS="--quick")
#
# Each phase fits one device call (10 min) and writes its log and JSON under $OUT (default ./gpu-out).
# Peer wheels (Liger, cut-cross-entropy) are used when `.whl/` was carried (`bash ../shared/gpu/peer_wheels.sh`
# here, then carry ".whl"); every benchmark still runs without them and says which columns it skipped.
set -uo pipefail
phase=${1:-round}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=src
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target "$HOME/peers" .whl/*.whl && export PYTHONPATH="src:$HOME/peers"
fi
log="$OUT/$phase.log"
stamp=$(date -u +%Y%m%d)
{
    echo "== $phase $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$log"

case "$phase" in
round)
    total=${ROUND_BUDGET_S:-420}
    t_check=$((total * 18 / 100)); t_sm=$((total * 32 / 100)); t_ce=$((total * 22 / 100)); t_lce=$((total * 16 / 100))
    t_res=$((total * 12 / 100))
    echo "== round: budget ${total}s (check ${t_check}s, softmax ${t_sm}s, ce ${t_ce}s, lce ${t_lce}s," \
        "resident ${t_res}s)" | tee -a "$log"
    # correctness first, cut off at its share (the kernels' compile dominates on a fresh machine); its verdict
    # is in the log either way
    timeout "$t_check" python3 -m pytest -q -x -m "not slow" -p no:cacheprovider \
        tests/test_triton_softmax.py tests/test_triton_cross_entropy.py tests/test_triton_linear_cross_entropy.py \
        tests/test_triton_second_pass.py tests/test_autocast.py \
        >"$OUT/round-check.log" 2>&1
    echo "== check rc=$? (124: cut at ${t_check}s) $(tail -1 "$OUT/round-check.log")" | tee -a "$log"
    # each suite stops itself between cases; `timeout` (budget + 60 s) only guards against a case that hangs
    timeout $((t_sm + 60)) python3 -m logitkit bench --device cuda --suite gpu-softmax --budget-s "$t_sm" \
        --json "$OUT/gpu-softmax-cuda-$stamp.json" >"$OUT/round-softmax.log" 2>&1
    echo "== softmax rc=$?" | tee -a "$log"
    timeout $((t_ce + 60)) python3 -m logitkit bench --device cuda --suite gpu-cross-entropy --budget-s "$t_ce" \
        --json "$OUT/gpu-cross-entropy-cuda-$stamp.json" >"$OUT/round-ce.log" 2>&1
    echo "== ce rc=$?" | tee -a "$log"
    timeout $((t_lce + 90)) python3 -m benchmarks.linear_ce --device cuda --shape llama3-8k --budget-s "$t_lce" \
        --json "$OUT/linear_ce-cuda-$stamp.json" >"$OUT/round-lce.log" 2>&1
    echo "== lce rc=$?" | tee -a "$log"
    # last: the resident softmax regime (one read, a barrier between the programs of a row; not the default)
    # against the default. Never run on a GPU before 2026-12-07: a hang here is cut by `timeout` (rc 124)
    timeout $((t_res + 30)) python3 -m benchmarks.gpu_softmax --resident --budget-s "$t_res" \
        --out "$OUT/gpu-softmax-resident-cuda-$stamp.json" >"$OUT/round-resident.log" 2>&1
    echo "== resident rc=$? (124: cut, a hang if no row came back)" | tee -a "$log"
    # the short table last (only the tail of a device call's output comes back)
    python3 - "$OUT" "$stamp" <<'PY' 2>&1 | tee -a "$log"
import json, os, sys
out, stamp = sys.argv[1], sys.argv[2]
def load(name):
    path = os.path.join(out, f"{name}-cuda-{stamp}.json")
    return json.load(open(path)) if os.path.exists(path) else None
sm = load("gpu-softmax")
if sm:
    print(f"softmax: copy {sm['copy_tbs']:.2f} TB/s; fraction of copy fwd/fwd+bwd "
          "(lk logitkit, t torch, tc torch.compile, lg liger)")
    tag = {"logitkit": "lk", "torch": "t", "torch.compile": "tc", "liger": "lg"}
    cells = {}
    for r in sm["rows"]:
        key = (r["dtype"], r["N"], r["layout"], r["op"])
        val = "err" if "error" in r else f"{r['fwd_frac']:.2f}/{r['fwdbwd_frac']:.2f}"
        cells.setdefault(key, []).append(f"{tag.get(r['provider'], r['provider'])} {val}")
    for (d, n, lay, op), c in cells.items():
        print(f"  {d:4} {n:>7} {lay:8} {op:11} " + "  ".join(c))
    if sm.get("truncated"):
        print(f"  (budget: {len(sm['truncated']['cases_left'])} cases not run)")
ce = load("gpu-cross-entropy")
if ce:
    print(f"cross-entropy fwd+bwd: copy {ce['copy_tb_s']:.2f} TB/s")
    for r in ce["rows"]:
        cell = r.get("error", "")[:60] or (f"{r['median_ms']:.3f} ms {r['tb_s']:.2f} TB/s {r['frac_copy']:.2f}x "
                                           f"extra {r['extra_peak_bytes'] / 2**20:.0f} MiB")
        print(f"  {r['dtype']:4} {r['M']}x{r['V']} {r['provider']:13} {cell}")
    if ce.get("truncated"):
        print(f"  (budget: {len(ce['truncated']['cases_left'])} cases not run)")
res = load("gpu-softmax-resident")
if res:
    print("softmax resident vs default (fraction of copy fwd/fwd+bwd):")
    for r in res["rows"]:
        val = r["error"][:60] if "error" in r else f"{r['fwd_frac']:.2f}/{r['fwdbwd_frac']:.2f}"
        print(f"  {r['dtype']:4} {r['N']:>7} {r['layout']:8} {r['op']:11} {r['provider']:17} {val}")
lce = load("linear_ce")
if lce:
    print("linear CE fwd+bwd:")
    for r in lce["rows"]:
        cell = r.get("skipped") or (f"{r['median_ms']:.1f} ms {r['tflop_s']:.0f} TFLOP/s "
                                    f"extra {(r.get('peak_extra_bytes') or 0) / 2**20:.0f} MiB")
        print(f"  {r['shape']} {r['provider']:28} {str(cell)[:90]}")
    if lce.get("truncated"):
        print(f"  (budget: {len(lce['truncated']['cases_left'])} cases not run)")
PY
    ;;
check)
    # The kernel test files run on CUDA tensors when a GPU is present (no interpreter); slow marks excluded.
    python3 -m pytest -q -x -m "not slow" -p no:cacheprovider \
        tests/test_triton_softmax.py tests/test_triton_cross_entropy.py tests/test_triton_linear_cross_entropy.py \
        tests/test_triton_second_pass.py \
        tests/test_linear_cross_entropy.py \
        tests/test_compile.py 2>&1 | tee -a "$log" | tail -15
    ;;
softmax)
    python3 -m logitkit bench --device cuda --suite gpu-softmax --json "$OUT/gpu-softmax-cuda-$stamp.json" 2>&1 \
        | tee -a "$log" | tail -40
    ;;
ce)
    python3 -m logitkit bench --device cuda --suite gpu-cross-entropy \
        --json "$OUT/gpu-cross-entropy-cuda-$stamp.json" 2>&1 | tee -a "$log" | tail -30
    ;;
lce)
    python3 -m logitkit bench --device cuda --suite linear-ce --json "$OUT/linear_ce-cuda-$stamp.json" 2>&1 \
        | tee -a "$log" | tail -30
    ;;
resident)
    timeout "${RESIDENT_TIMEOUT_S:-300}" python3 -m benchmarks.gpu_softmax --resident \
        --out "$OUT/gpu-softmax-resident-cuda-$stamp.json" 2>&1 | tee -a "$log" | tail -40
    ;;
tune)
    # Stops itself at the budget and rewrites the JSON after every case; the summary table prints last.
    # shellcheck disable=SC2086  # TUNE_ARGS is word-split on purpose
    python3 -m benchmarks.tune --device cuda --budget-s "${TUNE_BUDGET_S:-420}" --out "$OUT/tune-cuda-$stamp.json" \
        ${TUNE_ONLY:+--only "$TUNE_ONLY"} ${TUNE_ARGS:-} 2>&1 | tee -a "$log" | tail -60
    ;;
*)
    echo "unknown phase '$phase': round | check | softmax | ce | lce | resident | tune" >&2
    exit 2
    ;;
esac
