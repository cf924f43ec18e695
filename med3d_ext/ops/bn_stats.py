"""``bn_stats``: per-channel BatchNorm statistics in one pass (csrc/conv_bn_relu/bn_stats.h)."""

from __future__ import annotations

import torch

from .. import reference
from ._common import check_bool, check_tensor, compiled, register_autograd, register_fake

__all__ = ["bn_stats"]


def bn_stats(x: torch.Tensor, *, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of ``x`` over every dimension but 1.

    Args:
        x: (N, C, *spatial) float32/bfloat16/float16/float64, contiguous or channels_last_3d.
        unbiased: divide by n - 1 instead of n (BatchNorm normalises with the biased variance
            and updates its running variance with the unbiased one).

    Returns:
        ``(mean, var)``, each (C,), float32 (float64 for a float64 input). Accumulation is one
        Welford pass in fp32 whatever the input dtype. Differentiable with respect to ``x``.
    """
    check_tensor("bn_stats", "x", x)
    check_bool("bn_stats", "unbiased", unbiased)
    op = compiled("bn_stats")
    if op is None:
        if x.dim() < 2 or not x.is_floating_point():  # the compiled op's check, repeated
            raise RuntimeError(f"med3d_ext.bn_stats: argument 'x' must be a floating point "
                               f"(N, C, ...) tensor, got shape {tuple(x.shape)}, dtype {x.dtype}")
        return reference.bn_stats(x, unbiased)
    return op(x, unbiased)


@register_fake("bn_stats")
def _bn_stats_fake(x, unbiased=False):
    torch._check(x.dim() >= 2, lambda: f"bn_stats: x must be at least 2-D, got {tuple(x.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    return x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _setup_context(ctx, inputs, output):
    x, unbiased = inputs
    mean, _ = output
    ctx.unbiased = unbiased
    ctx.save_for_backward(x, mean)


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = x.numel() // max(x.shape[1], 1)
    acc = mean.dtype
    grad = torch.zeros((), dtype=acc, device=x.device)
    if grad_mean is not None:
        grad = grad + grad_mean.view(shape) / n
    if grad_var is not None:
        denom = n - 1 if ctx.unbiased else n
        # denom <= 0 (an empty input, or one value with unbiased=True): the variance is NaN and
        # so is its gradient, as torch.var's (an empty x gets an empty gradient either way)
        scale = 2.0 / denom if denom > 0 else float("nan")
        grad = grad + grad_var.view(shape) * scale * (x.to(acc) - mean.view(shape))
    return grad.expand(x.shape).to(x.dtype), None


register_autograd("bn_stats", _backward, _setup_context)
