"""Segmentation metrics on label volumes: Dice per class and HD95 in millimetres; and
classification metrics (confusion matrix, per-class rates, ROC AUC; see below).

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

__all__ = ["dice_per_class", "hd95", "surface", "batch_dice", "nanmean", "confusion_matrix",
           "class_rates", "balanced_accuracy", "roc_auc", "roc_auc_ovr",
           "classification_metrics"]


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


# --- classification -------------------------------------------------------------------------
# Conventions (those of sklearn's / MONAI's metrics, written out with numpy): class indices
# 0..C-1 in the run's class order; a confusion matrix has one row per true class and one column
# per predicted class; a rate whose denominator is 0 (sensitivity of a class no case has,
# precision of a class never predicted) is NaN, never 0, so that it cannot pass for a measured
# value and is left out of means.

def _indices(x, name: str, num_classes: int) -> np.ndarray:
    """A 1-D array of class indices in 0..num_classes-1 (numpy, torch or a list)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of class indices, got shape {a.shape}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{name}: expected integer class indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    bad = a[(a < 0) | (a >= num_classes)]
    if bad.size:
        raise ValueError(f"{name}: class index {int(bad[0])} is outside 0..{num_classes - 1} "
                         f"({num_classes} classes)")
    return a


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: ``cm[i, j]`` cases of true class i predicted as class j."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"confusion_matrix: num_classes must be a positive integer, got "
                         f"{num_classes!r}")
    y = _indices(labels, "labels", num_classes)
    p = _indices(preds, "preds", num_classes)
    if len(y) != len(p):
        raise ValueError(f"confusion_matrix: {len(y)} labels but {len(p)} predictions")
    c = int(num_classes)
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c)


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else float("nan")


def class_rates(cm) -> dict[str, list[float]]:
    """Per-class one-vs-rest rates of a confusion matrix (rows: truth, columns: prediction):
    ``support`` (cases of the class), ``sensitivity`` = recall = TP / (TP + FN) (NaN: no case
    of the class), ``specificity`` = TN / (TN + FP) (NaN: every case is of the class) and
    ``precision`` = TP / (TP + FP) (NaN: the class is never predicted)."""
    cm = np.asarray(cm, np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"class_rates: expected a square confusion matrix, got shape "
                         f"{cm.shape}")
    n = int(cm.sum())
    tp = np.diag(cm)
    pos, called = cm.sum(1), cm.sum(0)  # cases of each class, predictions of each class
    out = {"support": [int(v) for v in pos], "sensitivity": [], "specificity": [],
           "precision": []}
    for c in range(cm.shape[0]):
        fp = int(called[c] - tp[c])
        tn = n - int(pos[c]) - fp
        out["sensitivity"].append(_ratio(tp[c], pos[c]))
        out["specificity"].append(_ratio(tn, n - pos[c]))
        out["precision"].append(_ratio(tp[c], called[c]))
    return out


def balanced_accuracy(cm) -> float:
    """Mean sensitivity (recall) over the classes present in the labels (rows with cases);
    an absent class is left out rather than counted as 0. NaN without cases."""
    return nanmean(class_rates(cm)["sensitivity"])


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of ``scores`` (1-D, higher: more likely positive) for the
    boolean ``positive`` (1-D): the Mann-Whitney U statistic over n_pos * n_neg, i.e. the share
    of (positive, negative) pairs where the positive scores higher, a tie counting half. Exact:
    2U is an integer count (from sorted negatives, no pair loop), divided once. NaN when there is
    no positive or no negative (the ROC curve is undefined)."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    t = positive.detach().cpu().numpy() if isinstance(positive, torch.Tensor) \
        else np.asarray(positive)
    if s.ndim != 1 or t.shape != s.shape:
        raise ValueError(f"roc_auc: scores and positive must be 1-D of one length, got shapes "
                         f"{s.shape} and {t.shape}")
    if t.size and not (t.dtype == bool or np.isin(t, (0, 1)).all()):
        raise ValueError(f"roc_auc: positive must be booleans (or 0/1), got values "
                         f"{np.unique(t)[:5].tolist()}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():  # a NaN sorts anywhere: the AUC would be silently arbitrary
        raise ValueError(f"roc_auc: scores must be finite, got {s[~np.isfinite(s)][0]}")
    t = t.astype(bool)
    pos, neg = s[t], np.sort(s[~t])
    if not len(pos) or not len(neg):
        return float("nan")
    below = np.searchsorted(neg, pos, "left")  # negatives scoring lower than each positive
    not_above = np.searchsorted(neg, pos, "right")  # ... lower or tied
    twice_u = int(below.sum()) + int(not_above.sum())  # 2U = 2 * lower + tied
    return twice_u / (2 * len(pos) * len(neg))


def roc_auc_ovr(probs, labels) -> list[float]:
    """One-vs-rest AUC of each class c: ``roc_auc(probs[:, c], labels == c)``; ``probs`` is
    (N, C) scores, ``labels`` N class indices. NaN for a class with no case, or every case."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"roc_auc_ovr: probs must be (cases, classes), got shape {p.shape}")
    y = _indices(labels, "labels", p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"roc_auc_ovr: {len(y)} labels but {len(p)} rows of probs")
    return [roc_auc(p[:, c], y == c) for c in range(p.shape[1])]


def classification_metrics(labels, probs, classes, preds=None) -> dict:
    """Every metric of a classification evaluation, from the true class indices (N,) and the
    softmax probabilities (N, C) in the order of ``classes`` (C names); the predictions are
    ``preds`` (N class indices: the caller's own, so that the metrics describe the predictions
    it wrote) or else the argmax (first of tied maxima). ``auc``: binary, the AUC of
    ``classes[1]`` (the positive class), ranked by p1 - p0 (the other class's, ranked by
    p0 - p1, is the same number exactly); multi-class, the macro mean of the
    one-vs-rest AUCs of the classes with both positives and negatives. Per-class values are
    ``{class: value}``; NaN where undefined, and ``notes`` says why, in words."""
    classes = [str(c) for c in classes]
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim != 2 or p.shape[1] != len(classes):
        raise ValueError(f"classification_metrics: probs must be (cases, {len(classes)}) for "
                         f"classes {classes}, got shape {p.shape}")
    if len(classes) < 2:
        raise ValueError(f"classification_metrics: needs at least two classes, got {classes}")
    cm = confusion_matrix(labels, p.argmax(1) if preds is None else preds, len(classes))
    rates = class_rates(cm)
    n = int(cm.sum())
    binary = len(classes) == 2
    notes = []
    bad = int((~np.isfinite(p).all(1)).sum()) if p.size else 0
    if bad:  # a diverged model (NaN logits): no ranking to score, but the counts still stand
        aucs = [float("nan")] * len(classes)
        notes.append(f"{bad} case(s) have non-finite probabilities (a diverged model?): AUC "
                     "undefined (nan)")
    elif binary:
        # ranked by p1 - p0 (in float64), not by p1 alone: a confident model's p1 rounds to
        # exactly 1.0 in float32 where p0 (1e-9 vs 1e-12) still orders the cases, and the two
        # classes' AUCs then disagreed; this way they are equal, as in exact arithmetic
        d = p[:, 1].astype(np.float64) - p[:, 0].astype(np.float64)
        y = _indices(labels, "labels", 2)
        aucs = [roc_auc(-d, y == 0), roc_auc(d, y == 1)]
    else:
        aucs = roc_auc_ovr(p, labels)
    for c, name in enumerate(classes):
        if rates["support"][c] == 0:
            notes.append(f"class {name}: no case has this label: sensitivity and AUC undefined "
                         "(nan), left out of the balanced accuracy"
                         + ("" if binary else " and the macro AUC"))
        elif rates["support"][c] == n:
            notes.append(f"class {name}: every case has this label (no negatives): specificity "
                         "and AUC undefined (nan)")
    never = [name for c, name in enumerate(classes) if cm[:, c].sum() == 0]
    if never and n:
        notes.append(f"precision undefined (nan) for class(es) never predicted: "
                     f"{', '.join(never)}")
    per = lambda v: dict(zip(classes, v))  # noqa: E731
    scored = [a for a in aucs if not math.isnan(a)]
    return {
        "balanced_accuracy": balanced_accuracy(cm),
        # binary: the positive class's AUC (the other's is its mirror); else macro one-vs-rest
        "auc": aucs[1] if binary else nanmean(aucs),
        "auc_averaging": (f"binary: class {classes[1]} (positive) vs {classes[0]}" if binary
                          else f"macro one-vs-rest over {len(scored)} of {len(classes)} classes"),
        "auc_per_class": per(aucs),
        "support": per(rates["support"]),
        "sensitivity": per(rates["sensitivity"]),
        "specificity": per(rates["specificity"]),
        "precision": per(rates["precision"]),
        "confusion_matrix": {"classes": classes, "counts": cm.tolist()},
        "notes": notes,
    }
