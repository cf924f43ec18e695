"""torchrun: a 2-process gloo (CPU) DDP pretraining run; rank 0 alone writes the run folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from med3d_ext.train.runlog import read_metrics

from .conftest import cli_env, tiny_args

pytest.importorskip("med3d_ext.models")
pytest.importorskip("med3d_ext.data")


def test_two_process_gloo_pretrain(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "med3d_ext.train", "pretrain",
           *map(str, tiny_args(tiny_data["pretrain"], out, "--cache", tiny_data["cache"]))]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "world size 2" in r.stdout
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 4
    rows = read_metrics(out / "metrics.jsonl")
    steps = [x["step"] for x in rows if x["kind"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # logged once (rank 0), not per rank
    # throughput counts both processes' samples
    assert all(x["samples_s"] > 0 for x in rows if x["kind"] == "train")
    assert not list(out.glob(".*.tmp"))
