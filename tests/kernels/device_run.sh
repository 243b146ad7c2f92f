#!/usr/bin/env bash
# One batched device call: GPU tests + benchmarks, everything logged under $OUT.
# usage (on the device machine, repo root): bash tests/kernels/device_run.sh "tests attention gemm e2e"
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STAGES=${1:-"tests attention gemm e2e"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/nvsmi.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/nvsmi.txt"
for s in $STAGES; do
  echo "=== $s $(date -u +%FT%TZ)"
  case $s in
    tests) timeout ${T_TESTS:-240} python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    attention) timeout ${T_ATTN:-240} python3 -m lowbit.cli bench attention --json "$OUT/attention.json" ${ATTN_ARGS} 2>&1 | tee "$OUT/attention.log" | grep -v sweep ;;
    gemm) timeout ${T_GEMM:-240} python3 -m lowbit.cli bench gemm --json "$OUT/gemm.json" ${GEMM_ARGS} 2>&1 | tee "$OUT/gemm.log" | tail -25 ;;
    e2e) timeout ${T_E2E:-300} python3 -m lowbit.cli bench e2e --json "$OUT/e2e.json" ${E2E_ARGS} 2>&1 | tee "$OUT/e2e.log" | tail -20 ;;
  esac
  echo "=== $s done rc=$? $(date -u +%FT%TZ)"
done
