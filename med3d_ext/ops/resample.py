"""Affine resampling, fused augmentation and resizing (csrc/resample/resample.h).

``affine_resample`` equals ``F.grid_sample(image, F.affine_grid(theta, size))`` without ever
building the grid; ``affine_resample_pair`` resamples an image (trilinear) and its label map
(nearest) with the same per-sample matrix in one launch, optionally composed with a coarse
elastic field and followed by an intensity epilogue; ``resize`` equals ``F.interpolate``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import torch

from .. import reference
from .._args import ArgumentTypeError
from ._common import (call_without_grad, check_bool, check_same_device, compiled,
                      register_autograd, register_fake)

__all__ = ["affine_resample", "affine_resample_pair", "resize", "resample_to_spacing",
           "pack_intensity"]

_MODES = {"bilinear": 0, "nearest": 1}
_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
_RESIZE_MODES = {"trilinear": 0, "nearest": 1}


def _choice(name: str, value: str, table: dict) -> int:
    if value not in table:
        raise ValueError(f"med3d_ext: argument '{name}' must be one of {sorted(table)}, got {value!r}")
    return table[value]


# Outputs of more elements than this are refused with the argument's name (PyTorch's own
# "Storage size calculation overflowed" named neither; nothing of 2^60 elements is allocatable).
_MAX_ELEMENTS = 2**60


def _ints(name: str, value, rank: int, per_element: int = 1) -> list[int]:
    """``value`` as ``rank`` non-negative ints; ``per_element``: the elements of the output per
    element of this size (N * C for a spatial size), for the overflow check."""
    if isinstance(value, torch.Size):
        value = list(value)
    if not isinstance(value, Sequence) or isinstance(value, str):  # None, 4, "128"
        raise ArgumentTypeError(f"med3d_ext: argument '{name}' must be {rank} ints, got "
                                f"{value!r}")
    if len(value) != rank:
        raise ValueError(f"med3d_ext: argument '{name}' must be {rank} ints, got {value!r}")
    try:  # operator.index, not int(): a size of 4.5 is refused, not truncated to 4
        out = [operator.index(v) for v in value]
    except TypeError:
        raise TypeError(f"med3d_ext: argument '{name}' must be {rank} ints, got {value!r}") from None
    if any(v < 0 for v in out):
        raise ValueError(f"med3d_ext: argument '{name}' must be non-negative, got {out}")
    if math.prod(out) * max(per_element, 1) > _MAX_ELEMENTS:
        raise ValueError(f"med3d_ext: argument '{name}' = {out} is too large: "
                         f"{math.prod(out) * max(per_element, 1):.3g} output elements")
    return out


def _check_tensor(name: str, t, image: torch.Tensor, dim: int | None = None, what: str = ""):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"med3d_ext: argument '{name}' must be a tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"med3d_ext: argument '{name}' must be {what or f'{dim}-D'}, "
                         f"got shape {tuple(t.shape)}")
    if t.device != image.device:
        raise ValueError(f"med3d_ext: argument '{name}' is on {t.device} but image is on "
                         f"{image.device}")


def _check_theta(theta, image):
    _check_tensor("theta", theta, image, 3, "(N, 3, 4)")
    if tuple(theta.shape) != (image.shape[0], 3, 4):
        raise ValueError(f"med3d_ext: argument 'theta' must be (N, 3, 4) with N = "
                         f"{image.shape[0]}, got shape {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"med3d_ext: argument 'theta' must be floating point, got {theta.dtype}")


def _check_image(image, float_only: bool, mode_hint: str):
    if not isinstance(image, torch.Tensor):
        raise ArgumentTypeError(f"med3d_ext: argument 'image' must be a 5-D (N, C, D, H, W) "
                                f"tensor, got {type(image).__name__}")
    if image.dim() != 5:
        raise ValueError(f"med3d_ext: argument 'image' must be 5-D (N, C, D, H, W), got "
                         f"{tuple(image.shape)}")
    if float_only and not image.is_floating_point():
        raise TypeError(f"med3d_ext: argument 'image' must be floating point for {mode_hint}, "
                        f"got {image.dtype} (use mode='nearest' for integer label maps)")


# ----------------------------------------------------------------------------- affine_resample


def affine_resample(image: torch.Tensor, theta: torch.Tensor, size, *, mode: str = "bilinear",
                    padding_mode: str = "zeros", align_corners: bool = False) -> torch.Tensor:
    """Resample ``image`` through one affine matrix per sample.

    Equals ``F.grid_sample(image, F.affine_grid(theta, size, align_corners), mode, padding_mode,
    align_corners)`` to float rounding (nearest: except at exact rounding ties), without a grid.

    Args:
        image: (N, C, ID, IH, IW). float32/bfloat16/float16/float64 for ``"bilinear"``
            (trilinear); any dtype, integer label maps included, for ``"nearest"`` (values are
            copied, never converted, and returned in their own dtype).
        theta: (N, 3, 4) floating; maps the output's normalised (x, y, z, 1) to the input's.
            Coordinates are computed in float32 (float64 for float64 images).
        size: the full output size (N, C, D, H, W), as for ``F.affine_grid``.
        mode: ``"bilinear"`` or ``"nearest"`` (round half to even, like grid_sample).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        align_corners: as for ``F.affine_grid`` / ``F.grid_sample``.

    Returns:
        (N, C, D, H, W) in ``image``'s dtype, contiguous. Differentiable with respect to a
        floating ``image`` (both modes); not with respect to ``theta`` (raises if it is asked).
    """
    m = _choice("mode", mode, _MODES)
    p = _choice("padding_mode", padding_mode, _PADDINGS)
    check_bool("affine_resample", "align_corners", align_corners)  # "no" ran as True
    _check_image(image, m == 0, "mode='bilinear'")
    size = _ints("size", size, 5)
    if size[:2] != list(image.shape[:2]):
        raise ValueError(f"med3d_ext: argument 'size' must start with image's (N, C) = "
                         f"{tuple(image.shape[:2])}, got {size}")
    _check_theta(theta, image)
    op = compiled("affine_resample")
    if op is None:
        return reference.affine_resample(image, theta, size, mode, padding_mode, align_corners)
    return call_without_grad(op, (image, theta), image, theta, size, m, p, bool(align_corners))


@register_fake("affine_resample")
def _affine_resample_fake(image, theta, size, mode=0, padding_mode=0, align_corners=False):
    check_same_device("affine_resample", image, theta=theta)
    torch._check(theta.dim() == 3, lambda: "affine_resample: theta must be (N, 3, 4)")
    return image.new_empty(list(size))


def _affine_setup(ctx, inputs, output):
    image, theta, size, mode, padding_mode, align_corners = inputs
    ctx.mode, ctx.padding_mode, ctx.align_corners = mode, padding_mode, align_corners
    ctx.size = list(size)
    ctx.save_for_backward(image, theta)


def _affine_backward(ctx, grad):
    image, theta = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise NotImplementedError(
            "med3d_ext.affine_resample: the gradient with respect to 'theta' is not implemented; "
            "detach theta, or use reference.affine_resample for a differentiable matrix")
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    if grad.numel() == 0 or image.numel() == 0:
        # nothing sampled (the forward allows empty sizes; F.affine_grid refuses them)
        return torch.zeros_like(image), None, None, None, None, None
    import torch.nn.functional as F

    # The image gradient is the adjoint of the sampling: ATen's grid_sampler_3d_backward on the
    # same grid (built only in backward), in fp32/fp64 whatever the image dtype.
    acc = torch.float64 if image.dtype == torch.float64 else torch.float32
    grid = F.affine_grid(theta.detach().to(acc), ctx.size, align_corners=ctx.align_corners)
    gi, _ = torch.ops.aten.grid_sampler_3d_backward(
        grad.to(acc), image.detach().to(acc), grid, ctx.mode, ctx.padding_mode,
        ctx.align_corners, [True, False])
    return gi.to(image.dtype), None, None, None, None, None


register_autograd("affine_resample", _affine_backward, _affine_setup)


# ------------------------------------------------------------------------ affine_resample_pair


pack_intensity = reference.pack_intensity


def affine_resample_pair(image: torch.Tensor, label: torch.Tensor, theta: torch.Tensor, size,
                         label_size=None, *, elastic: torch.Tensor | None = None,
                         intensity: Mapping | None = None, padding_mode: str = "zeros",
                         align_corners: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment an image and its label map with one matrix per sample, in one pass.

    Args:
        image: (N, C, ID, IH, IW) float32/bfloat16/float16/float64; resampled trilinearly.
        label: (N, LD, LH, LW) or (N, 1, LD, LH, LW), any dtype; resampled nearest (padding
            ``"zeros"`` gives label 0). Its input grid may differ from the image's: both span
            the same normalised [-1, 1] field of view.
        theta: (N, 3, 4) floating, output -> input normalised coordinates (F.affine_grid's).
        size: the image output size (N, C, D, H, W).
        label_size: the label output grid, 3 ints (default ``size[2:]``); e.g. the 1/4 grid of
            the network's logits. It covers the same field of view (== F.affine_grid with the
            coarser size).
        elastic: optional (N, 3, gd, gh, gw) displacement in normalised units, components
            (x, y, z) like grid_sample's grid. At output voxel i of an axis of S voxels it is
            interpolated at coarse position i * (g - 1) / (S - 1) (i.e.
            ``F.interpolate(elastic, out_size, mode="trilinear", align_corners=True)``) and added
            to the affine-mapped normalised coordinate, for the image and label grids alike.
            No full-resolution field is formed.
        intensity: optional dict (see :func:`pack_intensity`) applied to the resampled image,
            per sample, in float32: ``v = sign(v) * |v| ** gamma``; ``v = v * scale + shift``;
            ``v += noise_std * z``; ``v = clip(v, min, max)``, with z a standard normal drawn
            from a counter-based hash of (seed, sample index, voxel index) and Box-Muller,
            identical on CPU and CUDA up to float rounding
            (:func:`med3d_ext.reference.noise_normal`).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"`` (image and label).
        align_corners: as for ``F.affine_grid``.

    Returns:
        ``(image_out (N, C, D, H, W), label_out)`` with label_out of label's rank and dtype on
        ``label_size``. Not differentiable (an augmentation step): a backward through it raises.
    """
    p = _choice("padding_mode", padding_mode, _PADDINGS)
    check_bool("affine_resample_pair", "align_corners", align_corners)
    _check_image(image, True, "affine_resample_pair")
    _check_tensor("label", label, image)
    if label.dim() not in (4, 5) or label.shape[0] != image.shape[0] or (
            label.dim() == 5 and label.shape[1] != 1):
        raise ValueError(f"med3d_ext: argument 'label' must be (N, D, H, W) or (N, 1, D, H, W) "
                         f"with N = {image.shape[0]}, got shape {tuple(label.shape)}")
    size = _ints("size", size, 5)
    if size[:2] != list(image.shape[:2]):
        raise ValueError(f"med3d_ext: argument 'size' must start with image's (N, C) = "
                         f"{tuple(image.shape[:2])}, got {size}")
    label_size = size[2:] if label_size is None else _ints("label_size", label_size, 3,
                                                           image.shape[0])
    _check_theta(theta, image)
    n = image.shape[0]
    if elastic is not None:
        _check_tensor("elastic", elastic, image, 5, "(N, 3, gd, gh, gw)")
        if elastic.shape[:2] != (n, 3) or min(elastic.shape[2:]) < 1:
            raise ValueError(f"med3d_ext: argument 'elastic' must be (N, 3, gd, gh, gw) with "
                             f"N = {n}, got shape {tuple(elastic.shape)}")
    op = compiled("affine_resample_pair")
    if op is None:
        return reference.affine_resample_pair(image, label, theta, size, label_size,
                                              elastic=elastic, intensity=intensity,
                                              padding_mode=padding_mode,
                                              align_corners=align_corners)
    params = seed = None
    if intensity is not None:
        params, seed = pack_intensity(intensity, n, image.device)
    lab5 = label if label.dim() == 5 else label.unsqueeze(1)
    img, lab = call_without_grad(op, (image, theta, elastic), image, lab5, theta, size, label_size,
                                 elastic, params, seed, p, bool(align_corners))
    return img, (lab if label.dim() == 5 else lab.squeeze(1))


@register_fake("affine_resample_pair")
def _pair_fake(image, label, theta, size, label_size, elastic=None, intensity=None, seed=None,
               padding_mode=0, align_corners=False):
    check_same_device("affine_resample_pair", image, label=label, theta=theta, elastic=elastic,
                      intensity=intensity, seed=seed)
    return (image.new_empty(list(size)),
            label.new_empty([label.shape[0], label.shape[1], *label_size]))


def _pair_setup(ctx, inputs, output):
    pass


def _pair_backward(ctx, grad_image, grad_label):
    # Without this, autograd's fallback would hand back no gradient with only a warning: a
    # network fed an image that requires grad would silently stop training it.
    raise NotImplementedError(
        "med3d_ext.affine_resample_pair is not differentiable (an augmentation step); detach "
        "its inputs, or use affine_resample for a gradient with respect to the image")


register_autograd("affine_resample_pair", _pair_backward, _pair_setup)


# ------------------------------------------------------------------------------------ resize


def resize(image: torch.Tensor, size, mode: str = "trilinear") -> torch.Tensor:
    """``F.interpolate(image, size, mode, align_corners=False)`` for 5-D images.

    Args:
        image: (N, C, D, H, W); floating for ``"trilinear"``, any dtype for ``"nearest"``
            (integer label maps keep their dtype and values).
        size: 3 ints, the output (D, H, W).
        mode: ``"trilinear"`` or ``"nearest"`` (PyTorch's legacy nearest: floor(i * in / out)).

    Returns:
        (N, C, *size) in image's dtype. Differentiable for ``"trilinear"``.
    """
    m = _choice("mode", mode, _RESIZE_MODES)
    _check_image(image, m == 0, "mode='trilinear'")
    size = _ints("size", size, 3, image.shape[0] * image.shape[1])
    op = compiled("resize")
    if op is None:
        return reference.resize(image, size, mode)
    return op(image, size, m)


@register_fake("resize")
def _resize_fake(image, size, mode=0):
    return image.new_empty([image.shape[0], image.shape[1], *size])


def _resize_setup(ctx, inputs, output):
    image, size, mode = inputs
    # the input's sizes as they are (symbolic under a dynamic-shape torch.compile: int() would
    # specialise the graph on the batch size; resize_backward takes SymInt[])
    ctx.mode, ctx.in_size, ctx.size = mode, list(image.shape), [int(s) for s in size]
    ctx.dtype = image.dtype


def _resize_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    if ctx.mode != 0:
        raise NotImplementedError("med3d_ext.resize: no gradient for mode='nearest'")
    if grad.numel() == 0:  # an empty output (upsample's backward refuses a 0 size)
        return grad.new_zeros(ctx.in_size, dtype=ctx.dtype), None, None
    op = compiled("resize_backward")
    if op is not None:
        # a gather per input element, accumulated in fp32 (fp64 for fp64) and rounded once:
        # bitwise reproducible, where upsample_trilinear3d_backward scatters with atomics
        # (nondeterministic on CUDA, refused under torch.use_deterministic_algorithms)
        return op(grad, ctx.in_size).to(ctx.dtype), None, None
    acc = torch.float64 if ctx.dtype == torch.float64 else torch.float32
    gi = torch.ops.aten.upsample_trilinear3d_backward(grad.to(acc), ctx.size, ctx.in_size, False)
    return gi.to(ctx.dtype), None, None


@register_fake("resize_backward")
def _resize_backward_fake(grad, input_size):
    torch._check(grad.dim() == 5 and len(input_size) == 5,
                 lambda: "med3d_ext.resize_backward: 5-D grad and input_size")
    return grad.new_empty(list(input_size))


register_autograd("resize", _resize_backward, _resize_setup)


def resample_to_spacing(image: torch.Tensor, spacing, new_spacing,
                        mode: str = "trilinear") -> torch.Tensor:
    """Resize a volume from voxel ``spacing`` to ``new_spacing`` (preprocessing, CPU or GPU).

    Args:
        image: (C, D, H, W) or (N, C, D, H, W).
        spacing, new_spacing: 3 positive floats each, in the order of the axes (D, H, W).
        mode: ``"trilinear"`` (images) or ``"nearest"`` (label maps, dtype kept).

    Returns:
        The resized volume of the same rank, spatial size
        ``floor(shape * spacing / new_spacing + 0.5)`` (at least 1) per axis.
    """
    if not isinstance(image, torch.Tensor):  # a numpy volume: say so, and how
        raise ArgumentTypeError(f"med3d_ext: argument 'image' must be a (C, D, H, W) or "
                                f"(N, C, D, H, W) tensor, got {type(image).__name__} (use "
                                "torch.from_numpy for an array)")
    if image.dim() not in (4, 5):
        raise ValueError(f"med3d_ext: argument 'image' must be (C, D, H, W) or (N, C, D, H, W), "
                         f"got {tuple(image.shape)}")
    sp, nsp = _spacing("spacing", spacing), _spacing("new_spacing", new_spacing)
    shape = image.shape[-3:]
    exact = [shape[k] * sp[k] / nsp[k] for k in range(3)]
    if max(exact) >= 2**31:  # a units mix-up (m against mm), not a volume: said before the op
        # fails on an int64 overflow or a petabyte allocation that names neither argument
        raise ValueError(f"med3d_ext.resample_to_spacing: spacing {sp} -> new_spacing {nsp} "
                         f"would resize {tuple(shape)} to {[f'{e:.3g}' for e in exact]} voxels "
                         "per axis; are both spacings in the same unit (mm)?")
    size = [max(1, int(math.floor(e + 0.5))) for e in exact]
    x = image if image.dim() == 5 else image.unsqueeze(0)
    out = resize(x, size, mode)
    return out if image.dim() == 5 else out.squeeze(0)


def _spacing(name: str, value) -> list[float]:
    """3 positive finite floats (a tensor or array of 3 works too), or an error naming ``name``."""
    try:
        if isinstance(value, (str, bytes)):  # '124' read as (1, 2, 4)
            raise TypeError
        v = [float(s) for s in value]
    except (TypeError, ValueError):
        raise TypeError(f"med3d_ext: argument '{name}' must be 3 positive floats, got "
                        f"{value!r}") from None
    if len(v) != 3 or any(not (s > 0 and math.isfinite(s)) for s in v):
        raise ValueError(f"med3d_ext: argument '{name}' must be 3 positive floats, got {v}")
    return v
