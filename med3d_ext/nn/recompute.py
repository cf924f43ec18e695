"""Recomputing a fused block's inner activations in backward instead of keeping them.

Inside a fused ResNet block, the output of conv1 (and conv2 in a bottleneck) is
``relu(bn(y))`` and is kept for backward only as the next convolution's input (its weight
gradient needs it). The layer that produced it already keeps ``y`` and its statistics, so the
next convolution can keep a *recipe* instead and rebuild the tensor, bit for bit, with the same
epilogue kernel (``torch.ops.med3d_ext.bn_act``) when its backward runs. This drops one full
activation per inner layer (about 0.34 GiB of a ResNet-50 step at the perf-baselines shape,
counted on meta tensors) for one extra element-wise pass each in backward.

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
    key = t._cdata

    def pack(s):
        if s._cdata == key and s.shape == t.shape:
            return _Recipe(recipe, tuple(s.shape))
        return s

    def unpack(s):
        return s.build() if isinstance(s, _Recipe) else s

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
