#!/usr/bin/env bash
# In-place developer build: compiles med3d_ext._C against the torch of $PYTHON (default: python on
# PATH) into build/dev (incremental, ninja) and copies the module next to the sources, so that
# `PYTHONPATH=. pytest` works without reinstalling. Extra arguments go to CMake, e.g.
#   .ci/dev_build.sh -DWITH_CUDA=OFF
# CUDA compile check (torch 2.14.1+cu130 venv, no GPU needed):
#   PYTHON=/path/to/venv-cu/bin/python BUILD_DIR=build/cuda DEV_BUILD_NO_COPY=1 .ci/dev_build.sh -DWITH_CUDA=ON
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(command -v "${PYTHON:-python}")"
BUILD="${BUILD_DIR:-build/dev}"
# CMake >= 3.26 is needed; prefer the one pip installs next to the interpreter.
CMAKE="$(dirname "$PY")/cmake"; [ -x "$CMAKE" ] || CMAKE=cmake
"$CMAKE" -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
"$CMAKE" --build "$BUILD"
# DEV_BUILD_NO_COPY=1: compile/link check only (e.g. the CUDA build against another torch).
# copy then rename: a process that has the old .so mapped keeps a valid file (cp in place
# would rewrite the pages under it and crash it)
if [ "${DEV_BUILD_NO_COPY:-0}" != 1 ]; then
  # An editable install (pip install -e .) makes `import med3d_ext._C` load the copy in
  # site-packages, not the one next to the sources: update that one too, or the tests would run
  # the extension of the last `pip install -e .`.
  PURELIB="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  DESTS=(med3d_ext)
  if [ -f "$PURELIB/_editable_skbc_med3d_ext.pth" ] && compgen -G "$PURELIB/med3d_ext/_C*.so" >/dev/null; then
    DESTS+=("$PURELIB/med3d_ext")
    echo "dev_build: also updating the editable install's extension in $PURELIB/med3d_ext"
  fi
  for d in "${DESTS[@]}"; do
    for f in "$BUILD"/_C*.so "$BUILD"/_build_config.py; do
      cp "$f" "$d/.$(basename "$f").new" && mv -f "$d/.$(basename "$f").new" "$d/$(basename "$f")"
    done
  done
fi
