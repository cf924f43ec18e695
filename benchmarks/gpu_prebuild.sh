#!/usr/bin/env bash
# Build med3d_ext's CUDA wheel for the lent GPU machine *here*, before a GPU session, so that
# gpu_check.sh installs it in seconds instead of compiling for ~150 s of the session's 15 minutes.
#
#   benchmarks/gpu_prebuild.sh [DIR]    (default .whl/prebuilt: git-ignored, sent with the run's
#                                        `carry: [".whl"]` beside gpu_wheels.sh's wheels)
#   benchmarks/gpu_prebuild.sh --hash   (prints the hash of the extension's sources; gpu_check.sh
#                                        uses a prebuilt wheel only when its hash is this tree's)
#
# The GPU machine runs CPython 3.12 with torch 2.11.0+cu130 (../shared/gpu.md), and an extension
# only loads into the torch it was compiled against. PyPI's torch 2.11.0 is that build
# (torch.version.cuda 13.0), so the wheel is compiled here against it, in a throwaway venv of a
# Python 3.12 interpreter, with this machine's nvcc 13.0, for sm_90. About 4 minutes on 2 cores
# and ~4 GB of downloads (torch and its CUDA libraries); the venv is removed afterwards.
# gpu_check.sh still builds from source when the wheel is missing, stale (sources changed since),
# built for another torch, or fails its smoke test there.
# Knobs: PYTHON312 (interpreter; default python3.12 on PATH), GPU_TORCH (2.11.0),
# TORCH_CUDA_ARCH_LIST (9.0), CMAKE_BUILD_PARALLEL_LEVEL (2), PREBUILD_CACHE (see below).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every file that goes into the compiled module; the Python sources are not part of it (gpu_check
# runs the tree's own med3d_ext/ with the wheel's _C*.so beside it).
source_hash() {
    find csrc CMakeLists.txt pyproject.toml med3d_ext/_build_config.py.in -type f \
        ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--hash" ]; then
    source_hash
    exit 0
fi

DIR="${1:-.whl/prebuilt}"
# a Python 3.12: $PYTHON312, python3.12 on PATH (a pyenv shim may not run), or pyenv's own copies
PY312=""
for c in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
        PY312="$c"; break
    fi
done
if [ -z "$PY312" ]; then
    echo "gpu_prebuild: needs a Python 3.12 interpreter (the GPU machine's); set PYTHON312" >&2
    exit 2
fi
command -v nvcc >/dev/null || { echo "gpu_prebuild: nvcc not found" >&2; exit 2; }
TORCH_V="${GPU_TORCH:-2.11.0}"
# PREBUILD_CACHE=DIR keeps the venv and the build folder there (a rebuild after a small change
# then compiles only what changed); by default both are temporary
if [ -n "${PREBUILD_CACHE:-}" ]; then
    TMP="$PREBUILD_CACHE"; mkdir -p "$TMP"
else
    TMP="$(mktemp -d /tmp/med3d_prebuild.XXXXXX)"
    trap 'rm -rf "$TMP"' EXIT
fi

echo "[gpu_prebuild] venv: Python $("$PY312" -c 'import platform; print(platform.python_version())'), torch==$TORCH_V"
if [ ! -x "$TMP/venv/bin/python" ]; then
    "$PY312" -m venv "$TMP/venv"
    "$TMP/venv/bin/pip" install -q "torch==$TORCH_V" numpy scikit-build-core ninja "cmake>=3.26"
fi
"$TMP/venv/bin/python" -c 'import torch; print("[gpu_prebuild] torch", torch.__version__, "cuda", torch.version.cuda)'
HASH="$(source_hash)"
rm -rf "$DIR"
mkdir -p "$DIR"
echo "[gpu_prebuild] building (sources $HASH)"
PATH="$TMP/venv/bin:$PATH" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$TMP/venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps . -w "$DIR" \
    -Ccmake.define.WITH_CUDA=ON -Cbuild-dir="$TMP/build"
# what it was built from: gpu_check.sh compares the hash with the tree it runs on
{
    echo "source_hash=$HASH"
    echo "torch=$("$TMP/venv/bin/python" -c 'import torch; print(torch.__version__)')"
    echo "git=$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- csrc CMakeLists.txt 2>/dev/null || echo '+changes')"
    echo "built=$(date -u +%FT%TZ) on $(uname -n), $(c++ --version | head -1), $(nvcc --version | tail -1)"
} > "$DIR/BUILD_INFO"
ls -l "$DIR"
cat "$DIR/BUILD_INFO"
