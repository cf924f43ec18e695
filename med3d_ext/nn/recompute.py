"""Recomputing activations in backward instead of keeping them (the memory-saving mode).

Inside a fused ResNet block, the output of conv1 (and conv2 in a bottleneck) is
``relu(bn(y))`` and is kept for backward only as the next convolution's input (its weight
gradient needs it). The layer that produced it already keeps ``y`` and its statistics, so the
next convolution can keep a *recipe* instead and rebuild the tensor, bit for bit, with the same
epilogue kernel (``torch.ops.med3d_ext.bn_act``) when its backward runs: one extra element-wise
pass per inner layer. The fused stem's convolution input and pre-BatchNorm output are kept as
recipes over the batch the same way (:func:`recompute_stem`). A bf16 ResNet-50 step at the
perf-baselines shape (channels_last_3d, 8 x 1 x 64 x 128 x 128, SGD momentum) then peaks at
2.40 GiB instead of 2.92 (the step's memory timeline on the CPU with the GPU's stem algorithm,
``python -m benchmarks.memory_peak --device cpu``, whose fused arm agreed with the H100's
allocator to 0.3%).

Implemented with ``torch.autograd.graph.saved_tensors_hooks`` around the next layer's call, so
the fused ops and their C++ autograd are unchanged. Off by default until measured on a GPU
(``med3d_ext.nn.fused.RECOMPUTE_BLOCK_INPUTS``); never under ``torch.compile`` (which traces
its own graph) nor inside other saved-tensor hooks (e.g. activation checkpointing).
"""

from __future__ import annotations

import contextlib

import torch

from ..ops._common import compiled

__all__ = ["recompute_input", "recompute_stem", "can_recompute", "Recipe", "bn_act_recipe",
           "usable"]


class Recipe:
    """How to make a saved tensor again: ``fn(*args)`` from tensors kept anyway, and the
    versions of those tensors at save time (an in-place change before backward is refused
    rather than rebuilding something else). ``what`` names them in that error."""

    __slots__ = ("fn", "args", "versions", "what")

    def __init__(self, fn, args, what: str):
        self.fn, self.args, self.what = fn, tuple(args), what
        self.versions = tuple(t._version for t in self.args)

    def build(self) -> torch.Tensor:
        if tuple(t._version for t in self.args) != self.versions:
            raise RuntimeError(
                f"med3d_ext.nn (RECOMPUTE_BLOCK_INPUTS): {self.what} needed to recompute a "
                "saved activation was modified in place between forward and backward; call "
                "backward before changing it, or set "
                "med3d_ext.nn.fused.RECOMPUTE_BLOCK_INPUTS = False")
        return self.fn(*self.args)


def _bn_act_relu(y, mean, invstd, w, b):
    return torch.ops.med3d_ext.bn_act(y, mean, invstd, w, b, True)


def usable(*tensors) -> bool:
    """Whether tensors can be a recipe's arguments: inference tensors (made under
    torch.inference_mode) have no version counter to check."""
    return not any(t.is_inference() for t in tensors)


def bn_act_recipe(args) -> Recipe | None:
    """A fused layer's output from its ``(y, mean, invstd, bn_weight, bn_bias)`` (the recipe
    ``ops.conv_bn_relu._conv_bn_relu3d`` returns), rebuilt by the same epilogue kernel; None
    stays None, and so do arguments that cannot be checked (:func:`usable`)."""
    if args is None or not usable(*args):
        return None
    return Recipe(_bn_act_relu, args, "a BatchNorm parameter or statistic")


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


def _unpack(s):
    return s.build() if isinstance(s, Recipe) else s


def recompute_input(t: torch.Tensor, recipe: Recipe | None):
    """Context for the call that consumes ``t``: tensors saved for backward that are ``t``
    itself are kept as ``recipe`` and rebuilt when backward needs them. No recipe: nothing
    changes."""
    if recipe is None:
        return contextlib.nullcontext()
    # Only t's identity and shape are captured, never t: every tensor saved under these hooks
    # keeps the hooks (and their closures) until backward, so a closure holding t kept the
    # very activation this is meant to drop alive (measured: no memory saved at all).
    key, shape = t._cdata, t.shape

    def pack(s):
        if s._cdata == key and s.shape == shape:
            return recipe
        return s

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)


def recompute_stem(x_op: torch.Tensor, y_shape, w_op: torch.Tensor, x_recipe: Recipe,
                   y_recipe: Recipe):
    """Context for the fused stem's op call: its convolution input ``x_op`` (by identity) is
    kept as ``x_recipe`` and its pre-BatchNorm output -- made inside the op, so recognised as
    the saved tensor of ``y_shape`` in x_op's dtype that is not the weight ``w_op`` (which can
    have the same shape) -- as ``y_recipe``, rebuilt in the layout it had."""
    key, x_shape, dtype, y_shape = x_op._cdata, x_op.shape, x_op.dtype, tuple(y_shape)
    w_key = w_op._cdata

    def pack(s):
        if s._cdata == key and s.shape == x_shape:
            return x_recipe
        if tuple(s.shape) == y_shape and s.dtype == dtype and s._cdata != w_key:
            cl = s.is_contiguous(memory_format=torch.channels_last_3d) and not s.is_contiguous()
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            return Recipe(_in_format(y_recipe.fn, fmt), y_recipe.args, y_recipe.what)
        return s

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)


def _in_format(fn, fmt):
    return lambda *args: fn(*args).contiguous(memory_format=fmt)
