"""Recomputing a fused block's inner activations in backward instead of keeping them.

Inside a fused ResNet block, the output of conv1 (and conv2 in a bottleneck) is
``relu(bn(y))`` and is kept for backward only as the next convolution's input (its weight
gradient needs it). The layer that produced it already keeps ``y`` and its statistics, so the
next convolution can keep a *recipe* instead and rebuild the tensor, bit for bit, with the same
epilogue kernel (``torch.ops.med3d_ext.bn_act``) when its backward runs. This drops one full
activation per inner layer for one extra element-wise pass each in backward: a ResNet-50 step
at the perf-baselines shape (bf16 autocast, channels_last_3d, 8 x 1 x 64 x 128 x 128) keeps
2.45 GiB at the end of its forward instead of 2.78, and peaks at 2.66 GiB instead of 2.98
(allocator timeline of the step on the CPU, ``python -m benchmarks.memory_peak --device cpu``,
whose fused arm agrees with the H100's 3.01 GiB within 1%).

Implemented with ``torch.autograd.graph.saved_tensors_hooks`` around the next layer's call, so
the fused ops and their C++ autograd are unchanged. Off by default until measured on a GPU
(``med3d_ext.nn.fused.RECOMPUTE_BLOCK_INPUTS``); never under ``torch.compile`` (which traces
its own graph) nor inside other saved-tensor hooks (e.g. activation checkpointing).
"""

from __future__ import annotations

import contextlib

import torch

from ..ops._common import compiled

__all__ = ["recompute_input", "can_recompute"]


class _Recipe:
    """What rebuilds a saved activation: bn_act's arguments and their versions at save time."""

    __slots__ = ("args", "versions", "shape")

    def __init__(self, args, shape):
        self.args = args
        self.versions = tuple(t._version for t in args)
        self.shape = shape

    def build(self) -> torch.Tensor:
        if tuple(t._version for t in self.args) != self.versions:
            raise RuntimeError(
                "med3d_ext.nn (RECOMPUTE_BLOCK_INPUTS): a BatchNorm parameter or statistic "
                "needed to recompute a fused block's activation was modified in place between "
                "forward and backward; call backward before changing parameters, or set "
                "med3d_ext.nn.fused.RECOMPUTE_BLOCK_INPUTS = False")
        y, mean, invstd, w, b = self.args
        return torch.ops.med3d_ext.bn_act(y, mean, invstd, w, b, True)


def can_recompute(x: torch.Tensor) -> bool:
    """Whether a forward that produces gradients may use :func:`recompute_input` now."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if compiled("bn_act") is None:
        return False
    try:  # someone else's saved-tensor hooks (checkpointing) must keep control
        if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            return False
    except (AttributeError, TypeError, RuntimeError):
        return False
    return True


def recompute_input(t: torch.Tensor, recipe):
    """Context for the call that consumes ``t`` (a fused layer's output with ``recipe`` from
    ``ops.conv_bn_relu._conv_bn_relu3d``): tensors saved for backward that are ``t`` itself are
    kept as the recipe and rebuilt when backward needs them. No recipe: nothing changes."""
    if recipe is None:
        return contextlib.nullcontext()
    # Only t's identity and shape are captured, never t: every tensor saved under these hooks
    # keeps the hooks (and their closures) until backward, so a closure holding t kept the
    # very activation this is meant to drop alive (measured: no memory saved at all).
    key, shape = t._cdata, t.shape

    def pack(s):
        if s._cdata == key and s.shape == shape:
            return _Recipe(recipe, tuple(s.shape))
        return s

    def unpack(s):
        return s.build() if isinstance(s, _Recipe) else s

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
