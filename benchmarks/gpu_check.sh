#!/usr/bin/env bash
# One-call check on the lent GPU machine (see /work/shared/gpu.md). From the repository root:
#
#   OUT=/some/dir benchmarks/gpu_check.sh [AREA ...]
#
# Stages, most important first, each under its share of one time budget (GPU_CHECK_BUDGET
# seconds, default 540) so that a run cut short still leaves the measurements that matter most.
# $OUT/summary.md is rewritten after EVERY stage, and the benchmarks write their results after
# every case, so whatever ran before a kill is on disk:
#  0. env:      $OUT/logs/env.txt; installs any *.whl in $WHEELS (default: shared/wheels, else
#               .whl/, when present; there is no network there: bring nibabel/MONAI wheels along,
#               benchmarks/gpu_wheels.sh fetches them);
#  1. build:    installs the wheel benchmarks/gpu_prebuild.sh built beforehand ($PREBUILT, default
#               .whl/prebuilt/) when it matches this tree's extension sources and passes a smoke
#               test here; otherwise builds and installs med3d_ext with CUDA for sm_90
#               (logs/build.log). Either way it makes the
#               repository's own med3d_ext/ load that build (tests and benchmarks import from the
#               repo root, which would otherwise shadow the installed package);
#  2. tests:    pytest python_tests -m cuda -v (under pytest-xdist when installed: a crashing
#               test fails alone instead of ending the run; XDIST=0 turns it off);
#  3. sanitizer (opt-in, COMPUTE_SANITIZER=1): compute-sanitizer memcheck over $SANITIZER_TESTS;
#  4. targets:  python -m benchmarks --quick --device cuda train_step stem augment loss (the
#               issue's target rows: ResNet-50/10 steps, the stem, the augmentation pair, the
#               8-head loss) into $OUT/bench;
#  then, in this order (ORDER="..." changes it; stages not named are skipped):
#     throughput (THROUGHPUT=1, default): python -m benchmarks.train_throughput --device cuda,
#               the CLI's pretraining fused vs --no-fused, into $OUT/bench/throughput, with
#               4 profiled steps per arm after the measured ones (THROUGHPUT_ARGS, default
#               --profile --profile-stacks: kernel time, launches and costliest ops per step of
#               the real loop, and the package's Python functions by host time per step);
#     convergence: the convergence area (quick study), appended to $OUT/bench;
#     pipeline: the pipeline area (loader + augmentation, data-wait share), appended;
#     profile:  the target areas with --profile-only (each row's CUDA kernels per call, not
#               timed) into $OUT/bench_profile (BENCH_PROFILE=0 drops it);
#     kernels:  bn_stats conv_bn_relu resample, appended to $OUT/bench;
#     study (only when ORDER names it): the full-size convergence study on the GPU
#               (python -m benchmarks.convergence_study, 3 seeds; STUDY_ARGS adds options, e.g.
#               "--pretrain-steps 1000 --transfer-steps 300") into $OUT/bench/convergence_study,
#               written after every seed (a timeout keeps the finished seeds, marked partial);
#     compile (only when ORDER names it): train_step --with-compile (the plain and fused models
#               under torch.compile beside eager, the fused one also in reduce-overhead mode; ResNet-50 only unless COMPILE_DEPTHS="10 50")
#               into $OUT/bench_compile;
#     memory (only when ORDER names it): python -m benchmarks.memory_peak (the ResNet-50 step's
#               peak GPU memory, eager / fused / memory-saving, by where it was allocated) into
#               $OUT/memory;
#     ncu (only when ORDER names it): Nsight Compute over one call of each target kernel
#               (python -m benchmarks.ncu_kernels run $NCU_CASES: loss augment augment_cli augment_pairs augment_cli_pairs layer stem stem_lines stem_hw_lines stem_tiles) into
#               $OUT/ncu (the report, its details page as CSV and text, and a one-line-per-kernel
#               table: time, throughput, registers, occupancy);
#  then packs logs and results into $OUT/gpu_check.tar.gz and prints the summary LAST.
# throughput, convergence and pipeline need nibabel, pyyaml and tqdm (the package's
# dependencies, which the --no-deps install does not bring) and are skipped without them.
# With AREA arguments, stage 4 runs exactly those areas (profile profiles them) and kernels,
# pipeline and convergence are skipped. No stage stops the script; it exits non-zero when the
# build or the tests failed.
# Knobs: PYTHON, GPU_CHECK_BUDGET, BUILD_TIMEOUT, TEST_TIMEOUT, SANITIZER_TIMEOUT,
# TARGETS_TIMEOUT, PROFILE_TIMEOUT, KERNELS_TIMEOUT, PIPELINE_TIMEOUT, THROUGHPUT_TIMEOUT,
# CONVERGENCE_TIMEOUT, STUDY_TIMEOUT, COMPILE_TIMEOUT, MEMORY_TIMEOUT, NCU_TIMEOUT, NCU_CASES, NCU_LAUNCHES, NCU_SECTIONS (extra ncu flags, e.g. "--section SourceCounters"), THROUGHPUT_ARGS, ORDER, SKIP (any of build tests targets: e.g. a second call on a warm
# machine, SKIP="build tests targets" ORDER="convergence profile", reuses the first's build), WHEELS, BENCH_DEVICE (default cuda), BENCH_ARGS (extra options for the
# timed benchmark calls, e.g. --with-compile: then raise TARGETS_TIMEOUT, compiling ResNet-50 twice
# takes minutes), PROFILE_ARGS (for the profile call; --with-compile profiles the compiled rows
# too), PYTEST_ARGS, MAXFAIL, XDIST (workers, default 4),
# GIT_COMMIT (recorded; the copied tree on the GPU machine has no .git), PREBUILT, STUDY_ARGS.
set -u
cd "$(dirname "$0")/.." || exit 2
REPO="$(pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/benchmarks/results/latest}"
mkdir -p "$OUT/logs" "$OUT/bench" || exit 2
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
BENCH="$OUT/bench"
DEV="${BENCH_DEVICE:-cuda}"
T0=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-540}"
GIT_COMMIT="${GIT_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)}"
export GIT_COMMIT  # benchmarks/common.py records it when git cannot tell
# the synthetic 3DSeg-8 of the throughput and convergence stages: generated once, outside $OUT
# (whose files are all sent back)
export MED3D_EXT_CACHE="${MED3D_EXT_CACHE:-${TMPDIR:-/tmp}/med3d_ext_cache}"
# every benchmark stage appends to one results.json: a file left by an earlier run must not mix in
[ -f "$BENCH/results.json" ] && mv -f "$BENCH/results.json" "$BENCH/results.json.prev"
rm -rf "$OUT/bench_profile"

now() { date +%s; }
say() { echo "[gpu_check $(($(now) - T0))s] $*"; }
# seconds of the budget left, minus 15 s kept for the summary and the archive
left() { echo $((BUDGET - ($(now) - T0) - 15)); }
# stage_limit WANT MIN: prints min(WANT, what is left); fails when less than MIN is left
stage_limit() {
    local l
    l=$(left)
    [ "$l" -lt "$2" ] && return 1
    if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}

STAGES=(wheels build tests sanitizer targets throughput convergence pipeline profile kernels study compile ncu memory)
declare -A ST_STATUS ST_TIME
for s in "${STAGES[@]}"; do ST_STATUS[$s]="not reached"; ST_TIME[$s]=""; done
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

bench_table() {  # the benchmark rows as short lines: counts, speed-ups, failures, profiles
    "$PY" - "$BENCH/results.json" "$OUT/bench_profile/results.json" <<'EOF' 2>&1
import json, os, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:
    print(f"no benchmark results yet ({type(exc).__name__})"); d = None
if d is not None:
    n = {}
    for r in d["rows"]:
        n[r["status"]] = n.get(r["status"], 0) + 1
    print("rows: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())) + f" (areas: {', '.join(d['areas'])})")
    for r in d["rows"]:
        if r.get("baseline") or r["status"] != "ok" or not r.get("speedup") or r.get("median_ms") is None:
            continue
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
        mem = f", {r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") is not None else ""
        note = r.get("note") or ""
        note = f" [{note}]" if note and not note.startswith("compiled (") else ""
        wait = f", data wait {100 * r['data_wait']:.0f}%" if r.get("data_wait") is not None else ""
        print(f"  {r['area']}/{r['case']} {r['impl']}{note}: {r['median_ms']:.3f} ms{mem}; {sp}{wait}")
    for r in d["rows"]:
        if r.get("final_dice") is not None:  # the convergence area: one row per arm
            print(f"  {r['area']}/{r['impl']}: final Dice {r['final_dice']:.3f} +- {r.get('final_dice_std') or 0:.3f}, "
                  f"target reached at step {r.get('steps_to_target')}")
    for r in d["rows"]:
        if r["status"] in ("FAILED", "error"):
            print(f"  {r['status']}: {r['area']}/{r['case']} {r['impl']}: {str(r.get('reason'))[:150]}")
if os.path.isfile(sys.argv[2]):
    try:
        p = json.load(open(sys.argv[2]))
    except Exception as exc:
        p = {"rows": []}; print(f"profile unreadable ({type(exc).__name__})")
    for r in p["rows"]:
        k = r.get("kernels") or {}
        if "per_call_us" in k:
            top = k["top"][0] if k.get("top") else {"name": "-", "us": 0}
            n = "" if k.get("launches") is None else f"{k['launches']:.0f} launches, "
            h = "" if k.get("host_us") is None else f"host {k['host_us']:.0f}/{k['wall_us']:.0f} us wall, "
            print(f"  profile {r['area']}/{r['case']} {r['impl']}: {k['per_call_us']:.0f} us, "
                  f"{n}{h}top {top['us']:.0f} us {top['name'][:60]}")
EOF
}

write_summary() {  # after every stage: a run killed later still has this
    {
        echo "# gpu_check summary"
        echo
        echo "$GPU_NAME; $(grep -m1 '^torch' "$LOGS/env.txt" 2>/dev/null); git ${GIT_COMMIT:-?}; $(($(now) - T0))s so far of ${BUDGET}s"
        echo
        echo "| stage | status | time |"
        echo "|---|---|---|"
        for s in "${STAGES[@]}"; do echo "| $s | ${ST_STATUS[$s]} | ${ST_TIME[$s]} |"; done
        echo
        echo '```'
        bench_table
        echo '```'
    } > "$OUT/summary.md.tmp" && mv -f "$OUT/summary.md.tmp" "$OUT/summary.md"
}
status() {  # status STAGE TEXT [TIME]
    ST_STATUS[$1]="$2"
    ST_TIME[$1]="${3:-}"
    say "$1: $2${3:+ ($3)}"
    write_summary
}

# ---------------------------------------------------------------- 0. environment, wheels
{
    echo "date: $(date -u +%FT%TZ)"; echo "repo: $REPO"; echo "git: ${GIT_COMMIT:-?}"
    nvidia-smi -L 2>&1; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
} > "$LOGS/env.txt" 2>&1
say "$(grep -m1 '^torch' "$LOGS/env.txt")"

WHEELS="${WHEELS:-}"
[ -z "$WHEELS" ] && [ -d "$REPO/shared/wheels" ] && WHEELS="$REPO/shared/wheels"
[ -z "$WHEELS" ] && [ -d "$REPO/.whl" ] && WHEELS="$REPO/.whl"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    NWHL=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
    # resolve dependencies among the carried wheels; fall back to --no-deps if one is missing
    if "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1 ||
       "$PY" -m pip install --no-index --no-deps "$WHEELS"/*.whl >> "$LOGS/wheels.log" 2>&1; then
        status wheels "ok ($NWHL wheels)"
    else
        status wheels "FAILED (see logs/wheels.log)"
    fi
else
    status wheels "none"
fi
# the data stages (pipeline, throughput, convergence) write NIfTI volumes (nibabel) and train
# through med3d_ext.train (pyyaml, tqdm): the package's own dependencies, which
# `pip install --no-deps` does not bring
DATA_MISSING="$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("nibabel", "yaml", "tqdm") if u.find_spec(m) is None))' 2>&1)"

# ---------------------------------------------------------------- 1. build + install
# skipping STAGE: SKIP="build tests targets" reruns later stages on a still-warm machine
skipping() { case " ${SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# The wheel benchmarks/gpu_prebuild.sh built beforehand on the CPU machine (against this
# machine's Python 3.12 + torch 2.11.0+cu130) saves the ~150 s compile. It is used only when it
# was built from this tree's extension sources and loads and runs here; otherwise the build below
# compiles from source as before.
PREBUILT="${PREBUILT:-$REPO/.whl/prebuilt}"
EXT_COPIED=0
install_ext_beside_sources() {  # see below: tests and benchmarks import the repo's med3d_ext/
    local site
    site="$(cd /tmp && "$PY" -c 'import os, med3d_ext; print(os.path.dirname(med3d_ext.__file__))')" || return 1
    if [ -n "$site" ] && [ "$site" != "$REPO/med3d_ext" ]; then
        cp -f "$site"/_C*.so "$site"/_build_config.py "$REPO/med3d_ext/" || return 1
        EXT_COPIED=1
    fi
}
try_prebuilt() {  # exit 0 when the prebuilt wheel is installed and passed its smoke test
    local whl want have
    whl="$(find "$PREBUILT" -maxdepth 1 -name 'med3d_ext-*cp312*.whl' 2>/dev/null | head -1)"
    if [ -z "$whl" ] || [ ! -f "$PREBUILT/BUILD_INFO" ]; then echo "no prebuilt wheel"; return 1; fi
    cat "$PREBUILT/BUILD_INFO"
    want="$(sed -n 's/^source_hash=//p' "$PREBUILT/BUILD_INFO")"
    have="$(bash "$REPO/benchmarks/gpu_prebuild.sh" --hash)"
    if [ "$want" != "$have" ]; then echo "prebuilt wheel is stale (sources $want, tree $have)"; return 1; fi
    "$PY" -m pip install --no-deps --no-index --force-reinstall "$whl" || { echo "prebuilt wheel: install failed"; return 1; }
    install_ext_beside_sources || { echo "prebuilt wheel: copy failed"; return 1; }
    # loads with CUDA, computes what the reference computes, and survives a C++ error path (an
    # iostream error message once segfaulted a module built with another g++; common/checks.h)
    # (on failure the module copied from it is removed: a failed source build must not leave it
    # in use)
    timeout -k 5 120 "$PY" - <<'PY' || { [ $EXT_COPIED = 1 ] && rm -f "$REPO"/med3d_ext/_C*.so "$REPO/med3d_ext/_build_config.py"; echo "prebuilt wheel: smoke test failed"; return 1; }
import torch, torch.nn.functional as F
from med3d_ext import _extension as e, ops
assert e.available(), e.LOAD_ERROR
assert torch.cuda.is_available(), "no CUDA device"
x = torch.randn(2, 3, 6, 7, 5, device="cuda", dtype=torch.float64)
w = torch.randn(4, 3, 3, 3, 3, device="cuda", dtype=torch.float64)
g, b = torch.rand(4, device="cuda", dtype=torch.float64) + 0.5, torch.randn(4, device="cuda", dtype=torch.float64)
rm, rv = torch.randn(4, device="cuda", dtype=torch.float64), torch.rand(4, device="cuda", dtype=torch.float64) + 0.5
y = ops.conv_bn_relu3d(x, w, g, b, rm, rv, padding=1, training=False)
ref = F.relu(F.batch_norm(F.conv3d(x, w, padding=1), rm, rv, g, b, False))
assert (y - ref).abs().max().item() < 1e-9, (y - ref).abs().max().item()
try:
    ops.conv_bn_relu3d(x, w[:, :2], g, b, rm, rv, training=False)
except (RuntimeError, ValueError) as exc:
    assert "conv_bn_relu3d" in str(exc) or "weight" in str(exc), str(exc)
else:
    raise AssertionError("a channel mismatch was not refused")
torch.cuda.synchronize()
print("prebuilt wheel: smoke test ok")
PY
}
BUILD_HOW=""
B0=$(now)
if skipping build; then
    # the build an earlier call left (med3d_ext/_C*.so beside the sources) must load with CUDA
    say "build: skipped (SKIP); using the existing build"
    "$PY" -c 'import torch; from med3d_ext import _extension as e; assert e.available() and torch.cuda.is_available(), e.LOAD_ERROR' \
        > "$LOGS/build.log" 2>&1
    BUILD_RC=$?
elif try_prebuilt > "$LOGS/build.log" 2>&1; then
    BUILD_RC=0
    BUILD_HOW="prebuilt wheel ($(sed -n 's/^git=//p' "$PREBUILT/BUILD_INFO"))"
else
    say "build: $(tail -1 "$LOGS/build.log"); pip install with CUDA (log: logs/build.log)"
    BLIM=$(stage_limit "${BUILD_TIMEOUT:-330}" 30) || BLIM=30
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}" \
        timeout -k 10 "$BLIM" "$PY" -m pip install --no-build-isolation --no-deps --no-index --force-reinstall . \
        -Ccmake.define.WITH_CUDA=ON >> "$LOGS/build.log" 2>&1
    BUILD_RC=$?
    BUILD_HOW="built from source"
fi
EXT="not loaded"
if [ $BUILD_RC -eq 0 ]; then
    # The installed package lives in site-packages; tests and benchmarks run from the repo root,
    # where the source folder med3d_ext/ comes first on sys.path. Put the built module next to
    # the sources (what .ci/dev_build.sh does), so both import the same, installed build.
    install_ext_beside_sources >> "$LOGS/build.log" 2>&1
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
    status build "ok${BUILD_HOW:+ ($BUILD_HOW)}; extension $EXT" "$(($(now) - B0))s"
else
    echo "---- tail of logs/build.log ----"; tail -40 "$LOGS/build.log"
    status build "FAILED (rc $BUILD_RC$( [ $BUILD_RC -eq 124 ] && echo ', timeout')); benchmarks time the reference fallback" "$(($(now) - B0))s"
fi

# ---------------------------------------------------------------- 2. CUDA tests
junit_counts() {  # junit file, log file -> "passed P failed F errors E skipped S"
    "$PY" - "$1" <<'EOF' 2>/dev/null && return
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(f"passed {t - f - e - k} failed {f} errors {e} skipped {k}")
EOF
    # no junit report (killed or crashed): count the per-test result words of pytest -v
    echo "no junit report; from the log: passed $(grep -cE ' PASSED( |$)' "$2") failed $(grep -cE ' FAILED( |$)' "$2") errors $(grep -cE ' ERROR( |$)' "$2") skipped $(grep -cE ' SKIPPED( |$)' "$2")"
}
TEST_OK=0
if skipping tests; then
    status tests "skipped (SKIP)"; TEST_OK=1
elif [ $BUILD_RC -ne 0 ]; then
    status tests "not run (build failed)"
elif ! TLIM=$(stage_limit "${TEST_TIMEOUT:-150}" 30); then
    status tests "skipped (budget: $(left)s left)"
else
    XDIST_ARGS=()
    if [ "${XDIST:-4}" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
        XDIST_ARGS=(-n "${XDIST:-4}")
    fi
    say "tests: pytest python_tests -m cuda ${XDIST_ARGS[*]:-} (log: logs/pytest.log)"
    S0=$(now)
    rm -f "$LOGS/pytest.xml"  # counts must not come from an earlier run's report
    # shellcheck disable=SC2086
    # --continue-on-collection-errors: a test module importing a package missing there (e.g.
    # pyyaml) must not stop every CUDA test from running
    timeout -k 10 "$TLIM" "$PY" -m pytest python_tests -m cuda -v -rfE --tb=short --maxfail="${MAXFAIL:-30}" \
        --continue-on-collection-errors -p no:cacheprovider --junitxml="$LOGS/pytest.xml" ${XDIST_ARGS[@]+"${XDIST_ARGS[@]}"} \
        ${PYTEST_ARGS:-} > "$LOGS/pytest.log" 2>&1
    TEST_RC=$?
    COUNTS="$(junit_counts "$LOGS/pytest.xml" "$LOGS/pytest.log")"
    case $TEST_RC in
        0) ST="ok"; TEST_OK=1 ;;
        5) ST="ok (no cuda tests collected)"; TEST_OK=1 ;;
        124|137) ST="FAILED (timeout after ${TLIM}s)" ;;
        1) ST="FAILED" ;;
        *) # a signal (e.g. 139 = SIGSEGV) ends pytest itself: name the test that was running
           LAST="$(grep -oE '^python_tests/[^ ]+::[^ ]+' "$LOGS/pytest.log" | tail -1)"
           ST="CRASHED (rc $TEST_RC) in ${LAST:-?}" ;;
    esac
    [ $TEST_OK -eq 0 ] && { echo "---- tail of logs/pytest.log ----"; tail -30 "$LOGS/pytest.log"; }
    status tests "$ST; $COUNTS" "$(($(now) - S0))s"
fi

# ---------------------------------------------------------------- 3. compute-sanitizer (opt-in)
if [ "${COMPUTE_SANITIZER:-0}" != 1 ]; then
    status sanitizer "skipped (COMPUTE_SANITIZER=1 to run)"
elif [ $BUILD_RC -ne 0 ]; then
    status sanitizer "not run (build failed)"
elif ! command -v compute-sanitizer >/dev/null; then
    status sanitizer "compute-sanitizer not found"
elif ! SLIM=$(stage_limit "${SANITIZER_TIMEOUT:-120}" 30); then
    status sanitizer "skipped (budget: $(left)s left)"
else
    say "sanitizer: compute-sanitizer memcheck on ${SANITIZER_TESTS:-python_tests/ops}"
    S0=$(now)
    # shellcheck disable=SC2086
    timeout -k 10 "$SLIM" compute-sanitizer --tool memcheck --error-exitcode 99 \
        "$PY" -m pytest ${SANITIZER_TESTS:-python_tests/ops} -m cuda -q -x -p no:cacheprovider \
        -k "${SANITIZER_K:-not compile and not opcheck}" > "$LOGS/sanitizer.log" 2>&1
    SAN_RC=$?
    case $SAN_RC in
        0) ST="ok ($(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log" || echo 'no errors'))" ;;
        99) ST="FAILED: $(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log")" ;;
        124|137) ST="timeout (partial log)" ;;
        *) ST="rc $SAN_RC (see logs/sanitizer.log)" ;;
    esac
    status sanitizer "$ST" "$(($(now) - S0))s"
fi

# ---------------------------------------------------------------- 4.-9. benchmarks
# bench STAGE WANT MIN ARGS...: one `python -m benchmarks --quick --device $DEV ARGS...` under
# min(WANT, budget left) seconds; skipped when less than MIN seconds are left
bench() {
    local stage=$1 want=$2 min=$3 lim s0 rc st
    shift 3
    if ! lim=$(stage_limit "$want" "$min"); then status "$stage" "skipped (budget: $(left)s left)"; return; fi
    say "$stage: python -m benchmarks --quick --device $DEV $* (log: logs/$stage.log)"
    s0=$(now)
    timeout -k 10 "$lim" "$PY" -m benchmarks --quick --device "$DEV" "$@" > "$LOGS/$stage.log" 2>&1
    rc=$?
    case $rc in
        0) st="ok" ;;
        124|137) st="timeout after ${lim}s (results up to the last finished case kept)" ;;
        *) st="rc $rc (see logs/$stage.log)"; tail -15 "$LOGS/$stage.log" ;;
    esac
    status "$stage" "$st" "$(($(now) - s0))s"
}
NO_NIB="skipped (not installed: ${DATA_MISSING}; carry the wheels in WHEELS)"
# shellcheck disable=SC2086  # BENCH_ARGS and the area lists are word lists
if [ $# -gt 0 ]; then
    PROFILE_AREAS="$*"
else
    PROFILE_AREAS="train_step stem augment loss"
fi
if skipping targets; then
    status targets "skipped (SKIP)"
else
    # shellcheck disable=SC2086
    bench targets "${TARGETS_TIMEOUT:-$([ $# -gt 0 ] && echo 240 || echo 200)}" 30 --out "$BENCH" \
        --append ${BENCH_ARGS:-} $PROFILE_AREAS
fi
stage_profile() {
    if [ "${BENCH_PROFILE:-1}" = 1 ]; then
        # shellcheck disable=SC2086
        bench profile "${PROFILE_TIMEOUT:-90}" 30 --out "$OUT/bench_profile" --profile-only ${PROFILE_ARGS:-} $PROFILE_AREAS
    else
        status profile "skipped (BENCH_PROFILE=0)"
    fi
}
stage_kernels() {
    if [ $NAREAS -gt 0 ]; then status kernels "skipped (areas given)"; return; fi
    # shellcheck disable=SC2086
    bench kernels "${KERNELS_TIMEOUT:-90}" 20 --out "$BENCH" --append ${BENCH_ARGS:-} bn_stats conv_bn_relu resample
}
stage_pipeline() {
    if [ $NAREAS -gt 0 ]; then status pipeline "skipped (areas given)"; return; fi
    if [ -z "$DATA_MISSING" ]; then
        # shellcheck disable=SC2086
        bench pipeline "${PIPELINE_TIMEOUT:-90}" 30 --out "$BENCH" --append ${BENCH_ARGS:-} pipeline
    else
        status pipeline "$NO_NIB"
    fi
}
stage_throughput() {
    if [ "${THROUGHPUT:-1}" != 1 ]; then
        status throughput "skipped (THROUGHPUT=0)"
    elif [ -n "$DATA_MISSING" ]; then
        status throughput "$NO_NIB"
    elif ! TPLIM=$(stage_limit "${THROUGHPUT_TIMEOUT:-150}" 60); then
        status throughput "skipped (budget: $(left)s left)"
    else
        say "throughput: python -m benchmarks.train_throughput --device $DEV (log: logs/throughput.log)"
        local s0 rc st
        s0=$(now)
        # shellcheck disable=SC2086  # THROUGHPUT_ARGS is a word list (default: --profile
        # --profile-stacks: the package's Python functions ranked by host time per step)
        timeout -k 10 "$TPLIM" "$PY" -m benchmarks.train_throughput --device "$DEV" \
            --out "$BENCH/throughput" ${THROUGHPUT_ARGS---profile --profile-stacks} > "$LOGS/throughput.log" 2>&1
        rc=$?
        case $rc in
            0) st="ok: $(grep -m1 'fused / plain' "$BENCH/throughput/throughput.md")" ;;
            124|137) st="timeout after ${TPLIM}s" ;;
            *) st="rc $rc (see logs/throughput.log)"; tail -15 "$LOGS/throughput.log" ;;
        esac
        status throughput "$st" "$(($(now) - s0))s"
    fi
}
stage_convergence() {
    if [ $NAREAS -gt 0 ]; then status convergence "skipped (areas given)"; return; fi
    if [ -z "$DATA_MISSING" ]; then
        # shellcheck disable=SC2086
        bench convergence "${CONVERGENCE_TIMEOUT:-120}" 40 --out "$BENCH" --append ${BENCH_ARGS:-} convergence
    else
        status convergence "$NO_NIB"
    fi
}
stage_study() {  # the full-size convergence study (GPU sizes, 3 seeds; a few minutes)
    if [ -n "$DATA_MISSING" ]; then status study "$NO_NIB"; return; fi
    local lim s0 rc st
    if ! lim=$(stage_limit "${STUDY_TIMEOUT:-300}" 90); then
        status study "skipped (budget: $(left)s left)"; return
    fi
    say "study: python -m benchmarks.convergence_study --device $DEV (log: logs/study.log)"
    s0=$(now)
    # shellcheck disable=SC2086
    timeout -k 10 "$lim" "$PY" -m benchmarks.convergence_study --device "$DEV" \
        --out "$BENCH/convergence_study" ${STUDY_ARGS:-} > "$LOGS/study.log" 2>&1
    rc=$?
    case $rc in
        0) st="ok: $(tail -3 "$LOGS/study.log" | tr '\n' ' ' | cut -c1-200)" ;;
        124|137) st="timeout after ${lim}s$( [ -f "$BENCH/convergence_study/convergence.json" ] && echo '; the finished seeds are in bench/convergence_study (marked partial)')" ;;
        *) st="rc $rc (see logs/study.log)"; tail -15 "$LOGS/study.log" ;;
    esac
    status study "$st" "$(($(now) - s0))s"
}
stage_compile() {  # train_step with the torch.compile rows (ResNet-50 compiles take minutes)
    # shellcheck disable=SC2086
    MED3D_BENCH_TRAIN_DEPTHS="${COMPILE_DEPTHS:-50}" \
        bench compile "${COMPILE_TIMEOUT:-420}" 150 --out "$OUT/bench_compile" --with-compile \
        ${BENCH_ARGS:-} train_step
}
stage_ncu() {  # Nsight Compute: occupancy, throughput and stalls of the target kernels
    local lim s0 rc st
    if ! command -v ncu >/dev/null; then status ncu "skipped (no ncu on PATH)"; return; fi
    if ! lim=$(stage_limit "${NCU_TIMEOUT:-240}" 60); then
        status ncu "skipped (budget: $(left)s left)"; return
    fi
    mkdir -p "$OUT/ncu"
    say "ncu: ncu over python -m benchmarks.ncu_kernels run ${NCU_CASES:-} (log: logs/ncu.log)"
    s0=$(now)
    # only med3d_ext's own kernels, one call of each case (the driver brackets them with
    # cudaProfilerStart/Stop after a warm-up); clocks left alone (../shared/gpu.md)
    # shellcheck disable=SC2086
    timeout -k 10 "$lim" ncu --clock-control none --profile-from-start off \
        --kernel-name-base demangled --kernel-name regex:med3d_ext --launch-count "${NCU_LAUNCHES:-60}" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats ${NCU_SECTIONS:-} \
        -f -o "$OUT/ncu/kernels" "$PY" -m benchmarks.ncu_kernels run ${NCU_CASES:-} > "$LOGS/ncu.log" 2>&1
    rc=$?
    if [ -f "$OUT/ncu/kernels.ncu-rep" ]; then
        ncu --import "$OUT/ncu/kernels.ncu-rep" --page details --csv > "$OUT/ncu/details.csv" 2>>"$LOGS/ncu.log"
        ncu --import "$OUT/ncu/kernels.ncu-rep" --page details > "$OUT/ncu/details.txt" 2>>"$LOGS/ncu.log"
        "$PY" -m benchmarks.ncu_kernels summary "$OUT/ncu/details.csv" > "$OUT/ncu/summary.md" 2>>"$LOGS/ncu.log"
        case " ${NCU_SECTIONS:-} " in  # with SourceCounters: the stall samples per SASS line
            *SourceCounters*) ncu --import "$OUT/ncu/kernels.ncu-rep" --page source --csv \
                --print-source sass > "$OUT/ncu/source_sass.csv" 2>>"$LOGS/ncu.log" ;;
        esac
    fi
    case $rc in
        0) st="ok: $(($(wc -l < "$OUT/ncu/summary.md" 2>/dev/null || echo 2) - 2)) kernels (ncu/summary.md)" ;;
        124|137) st="timeout after ${lim}s" ;;
        *) st="rc $rc (see logs/ncu.log)"; tail -15 "$LOGS/ncu.log" ;;
    esac
    status ncu "$st" "$(($(now) - s0))s"
}
stage_memory() {  # where the ResNet-50 step's peak memory goes (the 2.5 GiB target)
    local lim s0 rc st
    if ! lim=$(stage_limit "${MEMORY_TIMEOUT:-150}" 45); then
        status memory "skipped (budget: $(left)s left)"; return
    fi
    say "memory: python -m benchmarks.memory_peak (log: logs/memory.log)"
    s0=$(now)
    timeout -k 10 "$lim" "$PY" -m benchmarks.memory_peak --out "$OUT/memory" > "$LOGS/memory.log" 2>&1
    rc=$?
    case $rc in
        0) st="ok: $(grep '^## ' "$OUT/memory/peak.md" | sed 's/^## //' | tr '\n' ';' | cut -c1-200)" ;;
        124|137) st="timeout after ${lim}s (finished arms in memory/)" ;;
        *) st="rc $rc (see logs/memory.log)"; tail -15 "$LOGS/memory.log" ;;
    esac
    status memory "$st" "$(($(now) - s0))s"
}
# After the targets, the measurements that issues still wait for (the CLI's throughput, the GPU
# convergence study, the data wait), then the diagnostics (profile, single kernels).
# ORDER overrides it (any of: throughput convergence pipeline profile kernels study compile ncu
# memory).
NAREAS=$#
RUN_ORDER="${ORDER-throughput convergence pipeline profile kernels}"
for s in $RUN_ORDER; do
    case $s in
        throughput|convergence|pipeline|profile|kernels|study|compile|ncu|memory) "stage_$s" ;;
        *) say "ORDER: unknown stage '$s' (ignored)" ;;
    esac
done
for s in throughput convergence pipeline profile kernels study compile ncu memory; do
    case " $RUN_ORDER " in *" $s "*) ;; *) status "$s" "skipped (not in ORDER)" ;; esac
done

# ---------------------------------------------------------------- summary, archive
write_summary
PACK=(logs bench summary.md)
[ -d "$OUT/bench_profile" ] && PACK+=(bench_profile)
[ -d "$OUT/bench_compile" ] && PACK+=(bench_compile)
[ -d "$OUT/ncu" ] && PACK+=(ncu)
[ -d "$OUT/memory" ] && PACK+=(memory)
tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" "${PACK[@]}" 2>/dev/null
echo
echo "==== gpu_check: $GPU_NAME, $(($(now) - T0))s; archive $OUT/gpu_check.tar.gz ===="
for s in "${STAGES[@]}"; do printf '%-12s %s %s\n' "$s" "${ST_STATUS[$s]}" "${ST_TIME[$s]}"; done
bench_table
[ -s "$OUT/ncu/summary.md" ] && cat "$OUT/ncu/summary.md"
FAIL=0
[ $BUILD_RC -ne 0 ] && FAIL=1
[ $TEST_OK -eq 1 ] || FAIL=1
exit $FAIL
