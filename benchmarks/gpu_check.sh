#!/usr/bin/env bash
# One-call check on the lent GPU machine (see /work/shared/gpu.md). From the repository root:
#
#   OUT=/some/dir benchmarks/gpu_check.sh [AREA ...]
#
#  0. installs any *.whl in $WHEELS (default: shared/wheels when present; no network there);
#  1. builds and installs med3d_ext with CUDA for sm_90 (log in $OUT/logs/build.log), makes the
#     repository's own med3d_ext/ load that build (tests and benchmarks import from the repo
#     root, which would otherwise shadow the installed package), prints `python -m med3d_ext.info`;
#  2. runs the CUDA tests: pytest python_tests -m cuda -q -x (tests needing a missing package skip);
#  3. with COMPUTE_SANITIZER=1, compute-sanitizer memcheck over $SANITIZER_TESTS (default
#     python_tests/ops) -m cuda;
#  4. runs `python -m benchmarks --quick --profile --device cuda --out $OUT/bench [AREA ...]`
#     (--profile: each row's CUDA kernels per call, in results.md; BENCH_PROFILE=0 drops it);
#  4b. with THROUGHPUT=1 (default), `python -m benchmarks.train_throughput --device cuda`: the
#     CLI's pretraining, fused vs --no-fused, at the perf-baselines shape (only if time is left);
#  5. packs logs and results into $OUT/gpu_check.tar.gz, writes $OUT/summary.md;
#  6. prints a short summary table LAST.
# No stage stops the script; it exits non-zero when the build or the tests failed. The stage
# time limits share one budget, GPU_CHECK_BUDGET seconds (default 540), so the whole call ends
# in time. Knobs: PYTHON, BUILD_TIMEOUT, TEST_TIMEOUT, SANITIZER_TIMEOUT, BENCH_TIMEOUT, WHEELS,
# BENCH_DEVICE (default cuda), BENCH_ARGS (extra options for the benchmarks, e.g. --with-compile), PYTEST_ARGS.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/benchmarks/results/latest}"
mkdir -p "$OUT/logs" "$OUT/bench"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-540}"

now() { date +%s; }
# limit DEFAULT: the stage's time limit, at most what is left of the budget minus 20 s for packing
limit() {
    local left=$((BUDGET - ($(now) - T0) - 20))
    [ "$left" -lt 10 ] && left=10
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
say() { echo "[gpu_check $(($(now) - T0))s] $*"; }

# ---------------------------------------------------------------- 0. environment, wheels
{
    echo "date: $(date -u +%FT%TZ)"; echo "repo: $REPO"; echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi -L 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$LOGS/env.txt" 2>&1
say "$(grep -m1 '^torch' "$LOGS/env.txt")"

WHEELS="${WHEELS:-}"
[ -z "$WHEELS" ] && [ -d "$REPO/shared/wheels" ] && WHEELS="$REPO/shared/wheels"
WHEEL_STATUS="none"
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # resolve dependencies among the carried wheels; fall back to --no-deps if one is missing
    if "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1 ||
       "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl >> "$LOGS/wheels.log" 2>&1; then
        WHEEL_STATUS="ok ($(ls "$WHEELS"/*.whl | wc -l) wheels)"
    else
        WHEEL_STATUS="FAILED (see logs/wheels.log)"
    fi
    say "wheels: $WHEEL_STATUS"
fi

# ---------------------------------------------------------------- 1. build + install
say "build: pip install with CUDA (log: logs/build.log)"
B0=$(now)
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" \
    timeout "$(limit "${BUILD_TIMEOUT:-330}")" "$PY" -m pip install --no-build-isolation --no-deps --no-index . \
    -Ccmake.define.WITH_CUDA=ON > "$LOGS/build.log" 2>&1
BUILD_RC=$?
BUILD_S=$(($(now) - B0))
EXT="not loaded"
if [ $BUILD_RC -eq 0 ]; then
    BUILD_STATUS="ok"
    # The installed package lives in site-packages; tests and benchmarks run from the repo root,
    # where the source folder med3d_ext/ comes first on sys.path. Put the built module next to
    # the sources (what .ci/dev_build.sh does), so both import the same, installed build.
    SITE_PKG="$(cd /tmp && "$PY" -c 'import os, med3d_ext; print(os.path.dirname(med3d_ext.__file__))' 2>>"$LOGS/build.log")"
    if [ -n "$SITE_PKG" ] && [ "$SITE_PKG" != "$REPO/med3d_ext" ]; then
        cp -f "$SITE_PKG"/_C*.so "$SITE_PKG"/_build_config.py "$REPO/med3d_ext/" 2>>"$LOGS/build.log"
    fi
    "$PY" -m med3d_ext.info > "$LOGS/info.txt" 2>&1
    # which libstdc++ the process really maps next to our .so, and the compiler that built it:
    # a C++ runtime older than the build's headers crashed iostream code in our .so before
    {
        echo "---- C++ runtime in a process that imported med3d_ext ----"
        "$PY" -c 'import med3d_ext._extension as e, re; e.available(); print("\n".join(sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(r"libstdc\+\+|libgcc_s|_C\.cpython", l)})))' 2>&1
        (c++ --version || g++ --version) 2>&1 | head -1
        strings -a "$REPO"/med3d_ext/_C*.so 2>/dev/null | grep -m3 "GCC: ("
    } >> "$LOGS/info.txt" 2>&1
    cat "$LOGS/info.txt"
    EXT="$("$PY" -c 'from med3d_ext import _extension as e; b = e.build_info(); print("loaded, CUDA %s, archs %s" % (b.get("cuda_version"), b.get("cuda_archs")) if e.available() else "NOT loaded: %s" % e.LOAD_ERROR)' 2>&1 | tail -1)"
else
    BUILD_STATUS="FAILED (rc $BUILD_RC$([ $BUILD_RC -eq 124 ] && echo ', timeout'))"
    echo "---- tail of logs/build.log ----"; tail -40 "$LOGS/build.log"
fi
say "build: $BUILD_STATUS in ${BUILD_S}s; extension $EXT"

# ---------------------------------------------------------------- 2. CUDA tests
junit_counts() {  # file -> "passed P failed F errors E skipped S"
    "$PY" - "$1" <<'EOF' 2>/dev/null || echo "no junit report"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"passed {t - f - e - k} failed {f} errors {e} skipped {k}")
EOF
}
TEST_STATUS="not run (build failed)"; TEST_COUNTS=""; TEST_S=0
if [ $BUILD_RC -eq 0 ]; then
    say "tests: pytest python_tests -m cuda -q -x (log: logs/pytest.log)"
    S0=$(now)
    # shellcheck disable=SC2086
    timeout "$(limit "${TEST_TIMEOUT:-150}")" "$PY" -m pytest python_tests -m cuda -q --maxfail="${MAXFAIL:-30}" -p no:cacheprovider \
        --junitxml="$LOGS/pytest.xml" ${PYTEST_ARGS:-} > "$LOGS/pytest.log" 2>&1
    TEST_RC=$?
    TEST_S=$(($(now) - S0))
    TEST_COUNTS="$(junit_counts "$LOGS/pytest.xml")"
    case $TEST_RC in
        0) TEST_STATUS="ok" ;;
        5) TEST_STATUS="ok (no cuda tests collected)" ;;
        124) TEST_STATUS="FAILED (timeout)" ;;
        *) TEST_STATUS="FAILED (rc $TEST_RC)" ;;
    esac
    [ $TEST_RC -ne 0 ] && [ $TEST_RC -ne 5 ] && { echo "---- tail of logs/pytest.log ----"; tail -30 "$LOGS/pytest.log"; }
    say "tests: $TEST_STATUS in ${TEST_S}s: $TEST_COUNTS"
fi

# ---------------------------------------------------------------- 3. compute-sanitizer (opt-in)
SAN_STATUS="skipped (COMPUTE_SANITIZER=1 to run)"
if [ "${COMPUTE_SANITIZER:-0}" = 1 ] && [ $BUILD_RC -eq 0 ]; then
    if command -v compute-sanitizer >/dev/null; then
        say "compute-sanitizer memcheck on ${SANITIZER_TESTS:-python_tests/ops}"
        # shellcheck disable=SC2086
        timeout "$(limit "${SANITIZER_TIMEOUT:-120}")" compute-sanitizer --tool memcheck --error-exitcode 99 \
            "$PY" -m pytest ${SANITIZER_TESTS:-python_tests/ops} -m cuda -q -x -p no:cacheprovider \
            -k "${SANITIZER_K:-not compile and not opcheck}" > "$LOGS/sanitizer.log" 2>&1
        SAN_RC=$?
        case $SAN_RC in
            0) SAN_STATUS="ok ($(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log" || echo 'no errors'))" ;;
            99) SAN_STATUS="FAILED: $(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log")" ;;
            124) SAN_STATUS="timeout (partial log)" ;;
            *) SAN_STATUS="rc $SAN_RC (see logs/sanitizer.log)" ;;
        esac
    else
        SAN_STATUS="compute-sanitizer not found"
    fi
    say "sanitizer: $SAN_STATUS"
fi

# ---------------------------------------------------------------- 4. benchmarks
PROFILE_ARG=""
[ "${BENCH_PROFILE:-1}" = 1 ] && PROFILE_ARG="--profile"
say "benchmarks: python -m benchmarks --quick $PROFILE_ARG --device ${BENCH_DEVICE:-cuda} ${BENCH_ARGS:-} $* (log: logs/bench.log)"
Q0=$(now)
# shellcheck disable=SC2086
timeout "$(limit "${BENCH_TIMEOUT:-270}")" "$PY" -m benchmarks --quick $PROFILE_ARG --device "${BENCH_DEVICE:-cuda}" --out "$OUT/bench" \
    ${BENCH_ARGS:-} "$@" > "$LOGS/bench.log" 2>&1
BENCH_RC=$?
BENCH_S=$(($(now) - Q0))
case $BENCH_RC in
    0) BENCH_STATUS="ok" ;;
    124) BENCH_STATUS="timeout (partial results kept)" ;;
    *) BENCH_STATUS="rc $BENCH_RC"; tail -20 "$LOGS/bench.log" ;;
esac

# ---------------------------------------------------------------- 4b. CLI pretraining throughput
TP_STATUS="skipped (THROUGHPUT=0)"
if [ "${THROUGHPUT:-1}" = 1 ] && [ $BUILD_RC -eq 0 ]; then
    TP_LIMIT="$(limit "${THROUGHPUT_TIMEOUT:-150}")"
    if [ "$TP_LIMIT" -ge 60 ]; then
        say "throughput: python -m benchmarks.train_throughput --device ${BENCH_DEVICE:-cuda} (log: logs/throughput.log)"
        timeout "$TP_LIMIT" "$PY" -m benchmarks.train_throughput --device "${BENCH_DEVICE:-cuda}" \
            --out "$OUT/bench/throughput" > "$LOGS/throughput.log" 2>&1
        TP_RC=$?
        case $TP_RC in
            0) TP_STATUS="ok: $(grep -m1 'fused / plain' "$OUT/bench/throughput/throughput.md")" ;;
            124) TP_STATUS="timeout" ;;
            *) TP_STATUS="rc $TP_RC (see logs/throughput.log)" ;;
        esac
    else
        TP_STATUS="skipped (only ${TP_LIMIT}s of the budget left)"
    fi
    say "throughput: $TP_STATUS"
fi

# ---------------------------------------------------------------- 5./6. summary, archive
BENCH_TABLE="$("$PY" - "$OUT/bench/results.json" <<'EOF' 2>&1
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"no benchmark results ({exc})"); sys.exit()
n = {}
for r in d["rows"]:
    n[r["status"]] = n.get(r["status"], 0) + 1
print("rows: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())))
for r in d["rows"]:
    if r.get("baseline") or r["status"] != "ok" or not r.get("speedup"):
        continue
    sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
    mem = f", {r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") is not None else ""
    note = r.get("note") or ""
    note = f" [{note}]" if note and not note.startswith("compiled (") else ""
    print(f"  {r['area']}/{r['case']} {r['impl']}{note}: {r['median_ms']:.3f} ms{mem}; {sp}")
for r in d["rows"]:
    if r["status"] in ("FAILED", "error"):
        print(f"  {r['status']}: {r['area']}/{r['case']} {r['impl']}: {str(r.get('reason'))[:150]}")
EOF
)"
TOTAL_S=$(($(now) - T0))
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
{
    echo "# gpu_check summary"
    echo
    echo "$GPU_NAME; $(grep -m1 '^torch' "$LOGS/env.txt"); git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); total ${TOTAL_S}s"
    echo
    echo "| stage | status | time |"
    echo "|---|---|---|"
    echo "| wheels | $WHEEL_STATUS | |"
    echo "| build | $BUILD_STATUS; extension $EXT | ${BUILD_S}s |"
    echo "| CUDA tests | $TEST_STATUS; $TEST_COUNTS | ${TEST_S}s |"
    echo "| sanitizer | $SAN_STATUS | |"
    echo "| benchmarks | $BENCH_STATUS | ${BENCH_S}s |"
    echo "| CLI throughput | $TP_STATUS | |"
    echo
    echo '```'
    echo "$BENCH_TABLE"
    echo '```'
} > "$OUT/summary.md"
tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs bench summary.md 2>/dev/null
echo
echo "==== gpu_check: $GPU_NAME, ${TOTAL_S}s; archive $OUT/gpu_check.tar.gz ===="
echo "build       $BUILD_STATUS (${BUILD_S}s); extension $EXT"
echo "tests       $TEST_STATUS (${TEST_S}s): $TEST_COUNTS"
echo "sanitizer   $SAN_STATUS"
echo "benchmarks  $BENCH_STATUS (${BENCH_S}s)"
echo "throughput  $TP_STATUS"
echo "$BENCH_TABLE"
FAIL=0
[ $BUILD_RC -ne 0 ] && FAIL=1
case "$TEST_STATUS" in ok*) ;; *) FAIL=1 ;; esac
exit $FAIL
