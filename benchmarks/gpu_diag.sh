#!/usr/bin/env bash
# Second GPU call of a session: build, then the CUDA tests under pytest-xdist (a crashing test
# fails alone instead of ending the run), a host backtrace of the first crashing case under
# cuda-gdb, and a short summary printed last. Usage: OUT=dir benchmarks/gpu_diag.sh
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/gpu_diag}"; mkdir -p "$OUT"
PY=python3
T0=$(date +%s)
[ -n "${WHEELS:-}" ] && $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1
TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 200 $PY -m pip install --no-build-isolation \
  --no-deps --no-index . -Ccmake.define.WITH_CUDA=ON > "$OUT/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - T0 ))s"
SITE="$(cd /tmp && $PY -c 'import os, med3d_ext; print(os.path.dirname(med3d_ext.__file__))')"
cp -f "$SITE"/_C*.so "$SITE"/_build_config.py med3d_ext/
timeout "${TEST_TIMEOUT:-130}" $PY -m pytest python_tests -m cuda -q -n "${XDIST:-8}" -p no:cacheprovider \
  --tb=line -rfE > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - T0 ))s"
if command -v cuda-gdb >/dev/null; then
  timeout 60 cuda-gdb -batch -ex run -ex bt --args $PY -c \
    "import torch, med3d_ext as m3d; m3d.ops.bn_stats(torch.randn(5, device='cuda'))" > "$OUT/gdb.log" 2>&1
  echo "---- cuda-gdb backtrace (bn_stats 1-D on CUDA) ----"
  grep -E "^#[0-9]+|signal|SIGSEGV|RuntimeError" "$OUT/gdb.log" | head -25
fi
echo "---- pytest summary ----"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | cut -c1-300 | tail -60
