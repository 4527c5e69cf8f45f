#!/usr/bin/env bash
# One GPU round in as few device calls as possible (../shared/gpu/README.md's routine), run from the repo root:
#
#   bash benchmarks/gpu_round.sh check      # ~2-4 min: versions, kernel correctness on CUDA tensors
#   bash benchmarks/gpu_round.sh softmax    # the gpu-softmax grid (issue 3)
#   bash benchmarks/gpu_round.sh ce         # the gpu-cross-entropy shapes (issue 4)
#   bash benchmarks/gpu_round.sh lce        # linear cross-entropy (issue 5)
#   bash benchmarks/gpu_round.sh tune       # ~8 min: blocks/warps sweep of the kernels, a proposal for _tuning.py
#                                           #   (TUNE_BUDGET_S=420 by default; TUNE_ONLY="fp32 non-last,cross"
#                                           #   keeps cases whose label has one of these; TUNE_ARGS="--quick")
#
# Each phase fits one device call (10 min) and writes its log and JSON under $OUT (default ./gpu-out).
# Peer wheels (Liger, cut-cross-entropy) are used when `.whl/` was carried (`bash ../shared/gpu/peer_wheels.sh`
# here, then carry ".whl"); every benchmark still runs without them and says which columns it skipped.
set -uo pipefail
phase=${1:-check}
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
check)
    # The kernel test files run on CUDA tensors when a GPU is present (no interpreter); slow marks excluded.
    python3 -m pytest -q -x -m "not slow" -p no:cacheprovider \
        tests/test_triton_softmax.py tests/test_triton_cross_entropy.py tests/test_triton_linear_cross_entropy.py \
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
tune)
    # Stops itself at the budget and rewrites the JSON after every case; the summary table prints last.
    # shellcheck disable=SC2086  # TUNE_ARGS is word-split on purpose
    python3 -m benchmarks.tune --device cuda --budget-s "${TUNE_BUDGET_S:-420}" --out "$OUT/tune-cuda-$stamp.json" \
        ${TUNE_ONLY:+--only "$TUNE_ONLY"} ${TUNE_ARGS:-} 2>&1 | tee -a "$log" | tail -60
    ;;
*)
    echo "unknown phase '$phase': check | softmax | ce | lce | tune" >&2
    exit 2
    ;;
esac
