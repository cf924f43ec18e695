"""Pure-PyTorch references for every med3d_ext op.

They define the semantics that the kernels must reproduce: tests compare against them,
benchmarks use them as the eager baseline, and the ops fall back to them when the compiled
extension is not available. Keep them simple and obviously right, not fast.
"""

from __future__ import annotations

import torch


# --------------------------------------------------------------------------- conv_bn_relu/


def bn_stats(x: torch.Tensor, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, var) over every dim but 1; float32 out (float64 for float64 in)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.to(acc), dim=dims, correction=1 if unbiased else 0)
    return mean, var
