#!/usr/bin/env bash
# Fetch the wheels that gpu_check.sh installs on the GPU machine (which has no network, Python
# 3.12 and no nibabel/MONAI; see ../shared/gpu.md) into .whl/ (git-ignored), ready to send with
# the run's `carry: [".whl"]`. Run it here, where the package index is reachable; a few MB.
#   benchmarks/gpu_wheels.sh [DIR]     (default: .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY="$(command -v "${PYTHON:-python3}")"
mkdir -p "$DIR"
# pure-Python wheels: the data layer (nibabel), the MONAI baselines, the CLI (tqdm)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" nibabel monai tqdm
# binary wheels built for the GPU machine's CPython 3.12 (manylinux x86_64): the CLI's config
# files (PyYAML) and the encoder export (safetensors, abi3)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 pyyaml safetensors
ls -1 "$DIR"
