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


@pytest.fixture(scope="session")
def kidney_run(tiny_data, tmp_path_factory):
    """One finished tiny segmentation transfer run (from scratch, one step) on the synthetic
    kidney set, for tests that only read it (evaluate)."""
    from med3d_ext.train.cli import main

    out = tmp_path_factory.mktemp("kidney_run") / "kidney"
    assert main(["transfer", *tiny_args(tiny_data["transfer"], out, "--from-scratch", "--epochs",
                                        1, "--steps", 1, "--cache", tiny_data["cache"])]) == 0
    return out


@pytest.fixture(scope="session")
def cls_run(tiny_data, tmp_path_factory):
    """One finished tiny classification transfer run (from scratch, one step), for tests that
    only read it (evaluate, predict)."""
    from med3d_ext.train.cli import main

    run = tmp_path_factory.mktemp("cls_run") / "cls"
    assert main(["transfer", *tiny_args(tiny_data["cls"], run, "--task", "cls",
                                        "--from-scratch", "--epochs", 1, "--steps", 1)]) == 0
    return run


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


class ToyLoader:
    """A resumable loader of n random (4, 3) batches (its position is in state_dict), for
    run_training tests with a toy model."""

    def __init__(self, n):
        self.n, self.position = n, 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, s):
        self.position = s["position"]

    def __iter__(self):
        import torch

        while self.position < self.n:
            self.position += 1
            yield {"x": torch.randn(4, 3)}


def train_step_logged(path) -> int:
    """The last optimizer step with a train row in metrics.jsonl ``path`` (0: none yet)."""
    from med3d_ext.train.runlog import read_metrics

    try:
        return max((r["step"] for r in read_metrics(path) if r["kind"] == "train"), default=0)
    except (OSError, ValueError):
        return 0


def wait_for_train_step(p, metrics, step: int, timeout: float = 300) -> None:
    """Wait until CLI subprocess ``p`` has logged train step ``step`` in ``metrics``; it must
    still be running then (a test about to interrupt it)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and train_step_logged(metrics) < step:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"


def default_sigint() -> None:
    """preexec_fn of interrupted CLI subprocesses: a terminal's Ctrl-C reaches Python's handler
    even where the tests run with SIGINT ignored (a background job)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
