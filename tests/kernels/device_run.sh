#!/usr/bin/env bash
# One batched device call: GPU tests + benchmarks, everything logged under $OUT.
# usage (on the device machine, repo root): bash tests/kernels/device_run.sh "tests attention gemm e2e fused engine"
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
    # the one-launch W4Ax linear: its GPU tests, then both paths timed at decode M (eager and graph, vs cuBLAS)
    fused) timeout ${T_FUSED:-120} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_w4ax_fused.py 2>&1 | tail -5
           timeout ${T_GEMM:-300} python3 -m lowbit.cli bench gemm --m ${FUSED_M:-1,16} --no-tune -q --json "$OUT/gemm-fused.json" 2>&1 | tee "$OUT/gemm-fused.log" | tail -12 ;;
    # the engine: GPU tests, decode step with the engine's whole step (host overhead), decode-bound workload
    engine) timeout ${T_ENG_TESTS:-150} python3 -m pytest -q -p no:cacheprovider tests/engine/test_engine_gpu.py 2>&1 | tail -3
            timeout ${T_ENGINE:-300} python3 -m lowbit.cli bench engine --json "$OUT/engine.json" --layers 32 --requests ${ENG_REQ:-40} --prompt 1024 --output 1024 --kv-budget-gb 2 --max-batch 32 --decode-batch 64 --decode-context 8192 --decode-layers 8 --steps 20 --repeats 3 --no-baseline -q ${ENGINE_ARGS} 2>&1 | tee "$OUT/engine.log" | tail -10 ;;
  esac
  echo "=== $s done rc=$? $(date -u +%FT%TZ)"
done
