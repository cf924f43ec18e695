#!/usr/bin/env bash
# Second GPU call of a session, when gpu_check.sh's tests crashed: build, then the CUDA tests
# under pytest-xdist (a crashing test fails alone instead of ending the run), optionally a host
# backtrace under cuda-gdb, and a short summary printed last. Usage:
#   OUT=dir benchmarks/gpu_diag.sh
# Knobs: PYTHON (default python3), WHEELS, XDIST (workers, default 8; 0 = no xdist),
# TEST_TIMEOUT (default 130), PYTEST_ARGS, GDB_PY (python code to run under cuda-gdb, e.g.
# "import torch, med3d_ext as m3d; m3d.ops.bn_stats(torch.randn(5, device='cuda'))"; unset: no gdb).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-/tmp/gpu_diag}"
mkdir -p "$OUT" || exit 2
PY="${PYTHON:-python3}"
T0=$(date +%s)
if [ -n "${WHEELS:-}" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1 ||
        "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl >> "$OUT/wheels.log" 2>&1
fi
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" \
    timeout -k 10 200 "$PY" -m pip install --no-build-isolation --no-deps --no-index . \
    -Ccmake.define.WITH_CUDA=ON > "$OUT/build.log" 2>&1
BUILD_RC=$?
echo "build rc=$BUILD_RC in $(( $(date +%s) - T0 ))s"
if [ $BUILD_RC -eq 0 ]; then
    # the repo root's med3d_ext/ shadows the installed package: put the build next to it
    SITE="$(cd /tmp && "$PY" -c 'import os, med3d_ext; print(os.path.dirname(med3d_ext.__file__))')"
    [ -n "$SITE" ] && [ "$SITE" != "$(pwd)/med3d_ext" ] && cp -f "$SITE"/_C*.so "$SITE"/_build_config.py med3d_ext/
else
    tail -30 "$OUT/build.log"
fi
XDIST_ARGS=()
if [ "${XDIST:-8}" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST_ARGS=(-n "${XDIST:-8}")
else
    echo "pytest-xdist not available (or XDIST=0): one process, a crash ends the run"
fi
# shellcheck disable=SC2086
timeout -k 10 "${TEST_TIMEOUT:-130}" "$PY" -m pytest python_tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    --tb=line -rfE ${XDIST_ARGS[@]+"${XDIST_ARGS[@]}"} ${PYTEST_ARGS:-} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - T0 ))s"
if [ -n "${GDB_PY:-}" ] && command -v cuda-gdb >/dev/null; then
    timeout -k 5 60 cuda-gdb -batch -ex run -ex bt --args "$PY" -c "$GDB_PY" > "$OUT/gdb.log" 2>&1
    echo "---- cuda-gdb backtrace of: $GDB_PY ----"
    grep -E "^#[0-9]+|signal|SIGSEGV|RuntimeError" "$OUT/gdb.log" | head -25
fi
echo "---- pytest summary ----"
grep -E "^(FAILED|ERROR)|passed|failed|crashed" "$OUT/pytest.log" | cut -c1-300 | tail -60
