#!/usr/bin/env bash
# One GPU run for the conv_bn_relu family: build with CUDA, run its CUDA tests, time it.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_check_conv_bn_relu.sh [pytest -k expr]
set -uo pipefail
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
t0=$(date +%s)
PYTHON="$PY" .ci/dev_build.sh -DWITH_CUDA=ON > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -c "import med3d_ext as m; print(m._extension.build_info())"
t0=$(date +%s)
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m cuda -rf --maxfail=15 ${1:+-k "$1"} \
  python_tests/ops/test_conv_bn_relu.py python_tests/ops/test_bn_stats.py python_tests/nn \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -20
[ "${SKIP_BENCH:-0}" = 1 ] || timeout "${BENCH_TIMEOUT:-200}" "$PY" -m benchmarks.bm_conv_bn_relu --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tail -12
