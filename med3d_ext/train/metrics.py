"""Segmentation metrics on label volumes: Dice per class and HD95 in millimetres.

Conventions (those of MONAI's ``compute_dice`` / ``compute_hausdorff_distance`` with
``percentile=95``): Dice of a class absent from both prediction and truth is NaN (left out of
means); a class predicted but absent from the truth has Dice 0 (MONAI's ``ignore_empty=False``:
a spurious structure counts against the model, where ``ignore_empty=True`` would drop it);
HD95 is the larger of the two directed 95th percentiles of surface-to-surface
distances, measured in mm with the voxel spacing; NaN when either side is empty (with both
empty there is no boundary to compare), inf never.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["dice_per_class", "hd95", "surface", "batch_dice", "nanmean"]


def nanmean(values) -> float:
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    return sum(v) / len(v) if v else float("nan")


def dice_per_class(pred, target, num_classes: int) -> list[float]:
    """Dice of classes 1..num_classes-1 between two integer label volumes of one shape."""
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor)
                             else target)
    if pred.shape != target.shape:
        raise ValueError(f"dice: prediction shape {tuple(pred.shape)} != target shape "
                         f"{tuple(target.shape)}")
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        denom = int(p.sum()) + int(t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


def batch_dice(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean foreground Dice of argmax(logits) (N, C, ...) against target (N, ...), over the
    classes present in prediction or target: a cheap training-time signal."""
    pred = logits.argmax(1)
    vals = []
    for c in range(1, logits.shape[1]):
        p, t = pred == c, target == c
        den = float(p.sum() + t.sum())
        if den > 0:
            vals.append(2 * float((p & t).sum()) / den)
    return sum(vals) / len(vals) if vals else float("nan")


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: in the mask with a 6-neighbour outside it (the
    volume's border counts as outside)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m.copy()
    for ax in range(3):
        for sh in (1, -1):
            inner &= np.roll(m, sh, axis=ax)
    return mask & ~inner[1:-1, 1:-1, 1:-1]


def _directed(src: np.ndarray, dst: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``src`` to the nearest of ``dst``'s."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:  # exact brute force in chunks; fine for evaluation-sized volumes
        a = torch.from_numpy(np.argwhere(src) * np.asarray(spacing, np.float64))
        b = torch.from_numpy(np.argwhere(dst) * np.asarray(spacing, np.float64))
        return torch.cat([torch.cdist(a[i:i + 4096], b).min(1).values
                          for i in range(0, len(a), 4096)]).numpy()
    dist = distance_transform_edt(~dst, sampling=spacing)
    return dist[src]


def _spacing(spacing) -> tuple[float, float, float]:
    """Voxel spacing in mm: 3 positive finite numbers (one number: isotropic). A zero, negative
    or NaN spacing (e.g. a signed affine diagonal) gave wrong distances without an error."""
    try:
        v = [float(spacing)] * 3 if np.ndim(spacing) == 0 else [float(x) for x in spacing]
    except (TypeError, ValueError):
        v = []
    if len(v) != 3 or not all(math.isfinite(x) and x > 0 for x in v):
        raise ValueError(f"hd95: spacing must be 3 positive voxel sizes in mm (the column norms "
                         f"of the affine, not its signed diagonal), got {spacing!r}")
    return tuple(v)


def hd95(pred, target, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th-percentile Hausdorff distance in mm between two boolean masks (3-D)."""
    pred = np.asarray(pred, bool)
    target = np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"hd95: masks must be 3-D and of one shape, got {pred.shape} and "
                         f"{target.shape}")
    spacing = _spacing(spacing)
    if not pred.any() or not target.any():
        return float("nan")
    sp, st = surface(pred), surface(target)
    d1 = _directed(sp, st, spacing)
    d2 = _directed(st, sp, spacing)
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))
