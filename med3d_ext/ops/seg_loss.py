"""``multihead_seg_loss``: CE + soft Dice for every decoder head in one pass (csrc/seg_loss/)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .. import reference
from ._common import check_bool, check_real, compiled, register_fake

__all__ = ["multihead_seg_loss", "SegLabelError"]


# Limits of the CUDA kernel (csrc/seg_loss/seg_loss.h: kMaxHeadsCuda, kMaxClassesCuda).
_CUDA_MAX_HEADS, _CUDA_MAX_CLASSES = 48, 32

# The op, looked up once. Its autograd is registered in C++ (csrc/seg_loss/seg_loss_autograd.cpp),
# not from Python: for this launch-bound op the Python route was most of a call's host time.
_OP = None if compiled("multihead_seg_loss") is None else torch.ops.med3d_ext.multihead_seg_loss.default


class SegLabelError(ValueError):
    """A target holds a label outside [0, C_h) that is not ``ignore_index``."""


def multihead_seg_loss(
    logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    head_weights=None,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1e-5,
    ignore_index: int = -100,
    class_weights=None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy + soft Dice loss of several segmentation heads, all heads in one kernel.

    Args:
        logits: one tensor per head, (n_h, C_h, *spatial_h), C_h >= 2; all float32, bfloat16,
            float16 or float64 (one dtype for all heads) on one device. Any strides.
        targets: one tensor per head, (n_h, *spatial_h), uint8 or int64 class indices.
        head_weights: one weight per head (1-D tensor or sequence); default all 1.
        ce_weight, dice_weight: weights of the two terms inside each head's loss.
        smooth: added to the numerator and denominator of every Dice ratio.
        ignore_index: voxels with this label count in neither term.
        class_weights: ``None`` or a list with, per head, ``None`` or a (C_h,) tensor of CE class
            weights (the CE is then the weighted mean, as ``F.cross_entropy(weight=...)``).
            They get no gradient.
        validate: check for labels outside [0, C_h) (other than ``ignore_index``) and raise
            :class:`SegLabelError` naming the head, the value and C_h. Costs one host sync.
            Bad voxels are ignored by the kernel either way, so ``validate=False`` never reads
            out of bounds.

    Returns:
        ``(total, per_head)``: ``sum_h head_weights[h] * per_head[h]`` (a scalar) and the (H,)
        unweighted per-head losses, float32 (float64 for float64 logits). Per head:
        ``ce_weight * CE + dice_weight * mean_{s,c} (1 - (2 I + smooth) / (P + T + smooth))``
        over valid voxels; this is MONAI's ``DiceCELoss(softmax=True, to_onehot_y=True,
        smooth_nr=smooth, smooth_dr=smooth, lambda_ce=ce_weight, lambda_dice=dice_weight)``
        when nothing is ignored or class-weighted. A head with no sample (n_h = 0) contributes
        0; a head with no valid voxel has CE 0. NaN logits give a NaN loss for their head.
        Differentiable with respect to every logits tensor and to ``head_weights``.

    On CUDA the fused kernel takes up to 48 heads of up to 32 classes; beyond that the call
    runs the PyTorch reference (:func:`med3d_ext.reference.multihead_seg_loss`) instead.
    """
    # Eager calls of a small loss are host-bound, so this path does only what it must: no
    # tensor op unless head_weights / class_weights need converting, and the op itself (its
    # autograd is C++, csrc/seg_loss/seg_loss_autograd.cpp).
    check_bool("multihead_seg_loss", "validate", validate)
    for name, v in (("ce_weight", ce_weight), ("dice_weight", dice_weight), ("smooth", smooth)):
        check_real("multihead_seg_loss", name, v)
    logits = _tensor_list("logits", logits)
    targets = _tensor_list("targets", targets)
    if not logits:
        raise ValueError("med3d_ext.multihead_seg_loss: no heads (logits is an empty list)")
    ignore_index = _int64("ignore_index", ignore_index)
    first = logits[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    hw = None
    if head_weights is not None:
        if isinstance(head_weights, torch.Tensor):
            # a tensor already on the logits' device avoids a blocking host-to-device copy
            hw = head_weights if head_weights.device == first.device \
                else head_weights.to(device=first.device)
        elif any(isinstance(w, torch.Tensor) for w in head_weights):
            # a list of weight tensors (e.g. learnt ones): stacked, so that each keeps its
            # gradient (torch.as_tensor would copy their values and detach them)
            hw = torch.stack([torch.as_tensor(w, device=first.device).to(acc).reshape(())
                              for w in head_weights])
        else:
            try:
                hw = torch.as_tensor(head_weights, dtype=acc, device=first.device)
            except (TypeError, ValueError, RuntimeError):  # e.g. "abc": torch's "new(): invalid
                # data type 'str'" named no argument
                raise TypeError(f"med3d_ext.multihead_seg_loss: argument 'head_weights' must be "
                                f"a tensor or a sequence of numbers, one per head, got "
                                f"{head_weights!r}") from None
    cw = None
    if class_weights is not None:
        if len(class_weights) != len(logits):
            raise ValueError(f"med3d_ext.multihead_seg_loss: class_weights has {len(class_weights)}"
                             f" entries for {len(logits)} heads")
        if any(w is not None for w in class_weights):
            cw = torch.cat([
                torch.ones(x.shape[1], dtype=acc, device=first.device) if w is None
                else _head_class_weights(h, w, x, acc)
                for h, (x, w) in enumerate(zip(logits, class_weights))])
    op = _OP
    if op is not None and first.is_cuda and (
            len(logits) > _CUDA_MAX_HEADS
            or max(x.shape[1] if x.dim() > 1 else 0 for x in logits) > _CUDA_MAX_CLASSES):
        op = None  # beyond the CUDA kernel's register budget: the PyTorch reference, same math
    if op is None:
        _check_inputs(logits, targets, hw, cw)
        bad = reference.seg_loss_bad_labels(logits, targets, ignore_index) if validate else None
        per_cw = None if cw is None else list(cw.split([x.shape[1] for x in logits]))
        total, per_head = reference.multihead_seg_loss(
            logits, targets, hw, ce_weight, dice_weight, smooth, ignore_index, per_cw)
    else:
        total, per_head, bad, _ = op(logits, targets, hw, cw, float(ce_weight),
                                     float(dice_weight), float(smooth), int(ignore_index))
    if validate:
        if torch.compiler.is_compiling():
            # The check runs inside an opaque op, so a compiled graph keeps it without a break.
            # Both outputs pass through it: a graph that used only per_head dropped the
            # (side-effect free) op whose output it did not need, and the check with it.
            total, per_head = _check_labels(total, per_head, bad,
                                            [int(x.shape[1]) for x in logits])
        else:
            _raise_bad_labels(bad, logits)
    return total, per_head


def _tensor_list(name: str, value) -> list:
    """``value`` as a list of tensors, or a TypeError naming the argument (a bare tensor would
    otherwise be iterated over its first dimension as if it were a list of heads)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"med3d_ext.multihead_seg_loss: argument '{name}' must be a list of "
                        f"tensors, one per head, got {type(value).__name__}"
                        + (f" of shape {tuple(value.shape)} (wrap one head as [tensor])"
                           if isinstance(value, torch.Tensor) else ""))
    value = value if isinstance(value, list) else list(value)
    for h, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"med3d_ext.multihead_seg_loss: argument '{name}[{h}]' must be a "
                            f"tensor, got {type(t).__name__}")
    return value


def _int64(name: str, v) -> int:
    """An int64 integer via operator.index, not int(): int(1.5) would silently give 1."""
    try:
        i = operator.index(v)
    except TypeError:
        i = None
    if i is None or not -2**63 <= i < 2**63:
        raise TypeError(f"med3d_ext.multihead_seg_loss: argument '{name}' must be an int64 "
                        f"integer, got {v!r}")
    return i


def _head_class_weights(h: int, w, x: torch.Tensor, acc) -> torch.Tensor:
    """Head ``h``'s CE class weights as a (C_h,) tensor; checked per head, as the concatenation
    of all heads' weights could have the right total length with the wrong split."""
    w = torch.as_tensor(w, device=x.device)
    c = x.shape[1] if x.dim() > 1 else 0
    if w.dim() != 1 or w.shape[0] != c or w.is_complex():
        raise ValueError(f"med3d_ext.multihead_seg_loss: argument 'class_weights[{h}]' must be "
                         f"a 1-D real tensor of C_h = {c} class weights, got shape "
                         f"{tuple(w.shape)}, dtype {w.dtype}")
    return w.to(acc)


def _raise_bad_labels(bad: torch.Tensor, classes) -> None:
    """Raises :class:`SegLabelError` for the heads whose row of ``bad`` counts bad labels;
    ``classes``: the heads' class counts, or their logits (read only on error)."""
    rows = bad.tolist()  # the one host sync
    if not any(cnt > 0 for cnt, _, _ in rows):
        return
    classes = [c if isinstance(c, int) else int(c.shape[1]) for c in classes]
    msgs = [f"head {h}: {cnt} voxel(s) with labels in [{lo}, {hi}] outside [0, {classes[h]}) "
            f"(C_h = {classes[h]}; e.g. label {lo})"
            for h, (cnt, lo, hi) in enumerate(rows) if cnt > 0]
    raise SegLabelError("med3d_ext.multihead_seg_loss: bad target labels (not ignore_index): "
                        + "; ".join(msgs))


# Its host sync (bad.tolist()) cannot run while a CUDA graph is captured: the tag makes
# torch.compile's CUDA graphs (mode="reduce-overhead") leave it out of the captured graph.
_CHECK_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("med3d_ext::seg_loss_check_labels", mutates_args=(), tags=_CHECK_TAGS)
def _check_labels(total: torch.Tensor, per_head: torch.Tensor, bad: torch.Tensor,
                  classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(total, per_head)`` unchanged after raising on bad labels (used under
    torch.compile)."""
    _raise_bad_labels(bad, classes)
    return total.clone(), per_head.clone()


@_check_labels.register_fake
def _check_labels_fake(total, per_head, bad, classes):
    return torch.empty_like(total), torch.empty_like(per_head)


_check_labels.register_autograd(
    lambda ctx, g_total, g_per_head: (g_total, g_per_head, None, None),
    setup_context=lambda ctx, inputs, output: None)


def _check_inputs(logits, targets, head_weights, class_weights) -> None:
    """The C++ entry checks, for the fake kernel and the reference fallback."""
    name = "med3d_ext.multihead_seg_loss"
    torch._check(len(logits) > 0, lambda: f"{name}: no heads (argument 'logits' is an empty list)")
    torch._check(len(logits) == len(targets), lambda: (
        f"{name}: got {len(logits)} logits tensors but {len(targets)} targets tensors"))
    first = logits[0]
    for h, (x, t) in enumerate(zip(logits, targets)):
        torch._check(x.dim() >= 2 and x.is_floating_point(), lambda: (
            f"{name}: argument 'logits[{h}]' must be floating (n, C, *spatial), got shape "
            f"{tuple(x.shape)}, dtype {x.dtype}"))
        torch._check(x.dtype == first.dtype and x.device == first.device, lambda: (
            f"{name}: argument 'logits[{h}]' must have the dtype and device of logits[0] "
            f"({first.dtype}, {first.device}), got {x.dtype}, {x.device}"))
        torch._check(x.shape[1] >= 2, lambda: (
            f"{name}: argument 'logits[{h}]' must be of at least 2 classes, got shape "
            f"{tuple(x.shape)}"))
        torch._check(t.dtype in (torch.uint8, torch.int64) and t.device == first.device,
                     lambda: f"{name}: argument 'targets[{h}]' must be uint8 or int64 class "
                             f"indices on {first.device}, got {t.dtype} on {t.device}")
        expect = (x.shape[0],) + tuple(x.shape[2:])
        torch._check(tuple(t.shape) == expect, lambda: (
            f"{name}: head {h}: targets shape {tuple(t.shape)} does not match logits shape "
            f"{tuple(x.shape)} (expected targets {expect})"))
    if head_weights is not None:
        torch._check(head_weights.dim() == 1 and head_weights.shape[0] == len(logits), lambda: (
            f"{name}: argument 'head_weights' must be 1-D with one weight per head "
            f"({len(logits)}), got shape {tuple(head_weights.shape)}"))
    if class_weights is not None:
        total = sum(x.shape[1] for x in logits)
        torch._check(class_weights.dim() == 1 and class_weights.shape[0] == total, lambda: (
            f"{name}: argument 'class_weights' must hold {total} values, got shape "
            f"{tuple(class_weights.shape)}"))


@register_fake("multihead_seg_loss")
def _fake(logits, targets, head_weights, class_weights, ce_weight, dice_weight, smooth,
          ignore_index):
    _check_inputs(logits, targets, head_weights, class_weights)
    first = logits[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    H = len(logits)
    slots = sum(x.shape[0] * x.shape[1] for x in logits)
    return (first.new_empty((), dtype=acc), first.new_empty((H,), dtype=acc),
            first.new_empty((H, 3), dtype=torch.int64), first.new_empty((3 * slots + H,), dtype=acc))


@register_fake("multihead_seg_loss_backward")
def _fake_backward(logits, targets, saved, grad_total, grad_per_head, head_weights,
                   class_weights, ignore_index):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in logits]

