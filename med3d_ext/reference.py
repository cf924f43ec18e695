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


def conv_bn_relu3d(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                   padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5, residual=None,
                   relu=True):
    """relu(batch_norm(conv3d(x, weight, None, stride, padding, dilation)) [+ residual]).

    Updates running_mean / running_var in place when training, as F.batch_norm does."""
    import torch.nn.functional as F

    y = F.conv3d(x, weight, None, stride, padding, dilation)
    out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def conv_bias_relu3d(x, weight, bias, *, stride=1, padding=0, dilation=1, residual=None,
                     relu=True):
    """relu(conv3d(x, weight, bias, stride, padding, dilation) [+ residual]): the epilogue of a
    convolution with BatchNorm folded into its weight and bias."""
    import torch.nn.functional as F

    out = F.conv3d(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out
