"""Shared fixtures of the training tests: one tiny synthetic 3DSeg-8 per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Synthetic 3DSeg-8 at 16 voxels, 2 cases per pretraining dataset, with its own cache."""
    pytest.importorskip("med3d_ext.data")
    from med3d_ext.data.synthetic import synth

    root = tmp_path_factory.mktemp("synth")
    dirs = synth(root, cases=2, size=16, seed=0)
    return {"root": root, "pretrain": root / "pretrain", "transfer": Path(dirs["transfer"]),
            "cls": Path(dirs["transfer_cls"]), "cache": root / "cache"}


def cli_env() -> dict:
    """Environment for CLI subprocesses: this checkout first on the path, no GPU, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "med3d_ext.train", *map(str, args)]


def tiny_args(data, out, *extra) -> list:
    """Options of a tiny CPU run (depth 10, 16^3 patches, few steps)."""
    return ["--data", *([data] if not isinstance(data, (list, tuple)) else data),
            "--out", out, "--patch", 16, "--batch-size", 2, "--epochs", 2, "--steps", 2,
            "--device", "cpu", "--no-progress", "--threads", 1, "--log-every", 1, *extra]
