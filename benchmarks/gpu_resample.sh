#!/usr/bin/env bash
# One GPU run for the resample family: build (sm_90), CUDA tests, benchmark, memcheck.
set -uo pipefail
OUT="${OUT:-benchmarks/results/latest}"; mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-python3}"
t0=$(date +%s)
PYTHON="$PY" BUILD_DIR=build/gpu .ci/dev_build.sh -DWITH_CUDA=ON > "$OUT/build.log" 2>&1 \
  || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -m pytest -q -x -m cuda -p no:cacheprovider python_tests/ops/test_resample.py \
  python_tests/transforms 2>&1 | tail -30 | tee "$OUT/pytest_cuda.txt"
echo "tests: $(( $(date +%s) - t0 )) s"
PYTHONPATH=. "$PY" benchmarks/gpu_resample_timing.py 2>&1 | tail -12
echo "bench: $(( $(date +%s) - t0 )) s"
if [ "${SANITIZE:-1}" = 1 ]; then
  compute-sanitizer --tool memcheck --print-limit 5 "$PY" -m pytest -q -x -m cuda \
    -p no:cacheprovider python_tests/ops/test_resample.py -k "pair_matches or integer or resize" \
    2>&1 | tail -8
fi
echo "total: $(( $(date +%s) - t0 )) s"
