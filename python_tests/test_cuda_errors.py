"""Bad input to a CUDA kernel raises a Python exception and never kills the process.

Each case runs in its own interpreter, so a crash (segfault, abort, a dead CUDA context) shows
up as that case's failure instead of taking the whole test session down.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "bn_stats_1d": "m3d.ops.bn_stats(torch.randn(5, device='cuda'))",
    "bn_stats_int": "m3d.ops.bn_stats(torch.ones(2, 3, 4, dtype=torch.int64, device='cuda'))",
    "bn_stats_cpu_path": "m3d.ops.bn_stats(torch.randn(5))",
    "resize_rank": "m3d.ops.resize(torch.randn(2, 3, 4, device='cuda'), (2, 2, 2))",
    "affine_theta": ("m3d.ops.affine_resample(torch.randn(1, 1, 4, 4, 4, device='cuda'), "
                     "torch.randn(1, 2, 3, device='cuda'), (1, 1, 4, 4, 4))"),
    "loss_bad_label": ("m3d.ops.multihead_seg_loss([torch.randn(1, 3, 4, 4, 4, device='cuda')], "
                       "[torch.full((1, 4, 4, 4), 7, device='cuda', dtype=torch.int64)])"),
    "conv_bn_relu_channels": (
        "w = torch.randn(4, 3, 3, 3, 3, device='cuda'); c = torch.ones(4, device='cuda');"
        "m3d.ops.conv_bn_relu3d(torch.randn(2, 5, 6, 6, 6, device='cuda'), w, c, c, c.clone(), c.clone())"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_cleanly_on_cuda(name):
    code = ("import torch, med3d_ext as m3d\n"
            "try:\n"
            f"    {CASES[name]}\n"
            "except (RuntimeError, ValueError, TypeError) as e:\n"
            "    print('RAISED', type(e).__name__, str(e).splitlines()[0][:200])\n"
            "    torch.cuda.synchronize()  # the context must still be usable\n"
            "    print('CONTEXT_OK', torch.ones(2, device='cuda').sum().item())\n"
            "else:\n"
            "    print('NO_ERROR')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, f"{name}: process died with rc {r.returncode}\n{r.stderr[-2000:]}"
    assert "RAISED" in r.stdout and "CONTEXT_OK 2.0" in r.stdout, r.stdout + r.stderr[-1000:]
