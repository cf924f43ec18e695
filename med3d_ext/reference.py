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


# --------------------------------------------------------------------------- seg_loss/


def seg_loss_bad_labels(logits: list[torch.Tensor], targets: list[torch.Tensor],
                        ignore_index: int = -100) -> torch.Tensor:
    """(H, 3) int64 per head: count, min and max of labels outside [0, C_h) that are not
    ``ignore_index`` (min/max are int64 max/min when the count is 0)."""
    rows = []
    for x, t in zip(logits, targets):
        t = t.long()
        bad = (t != ignore_index) & ((t < 0) | (t >= x.shape[1]))
        vals = t[bad]
        big = torch.iinfo(torch.int64)
        rows.append(torch.stack([
            bad.sum(),
            vals.min() if vals.numel() else torch.tensor(big.max, device=t.device),
            vals.max() if vals.numel() else torch.tensor(big.min, device=t.device),
        ]))
    return torch.stack(rows).to(torch.int64)


def multihead_seg_loss(logits: list[torch.Tensor], targets: list[torch.Tensor],
                       head_weights=None, ce_weight: float = 1.0, dice_weight: float = 1.0,
                       smooth: float = 1e-5, ignore_index: int = -100,
                       class_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: ce_weight * CE + dice_weight * soft Dice loss; returns (weighted sum, per head).

    Valid voxels have a target in [0, C) other than ignore_index; the others count in neither
    term. CE is the class-weighted mean over valid voxels (F.cross_entropy(weight=...)'s
    normalisation), 0 when no voxel is valid. Dice is the mean over (sample, class) of
    1 - (2 I + smooth) / (P + T + smooth) on softmax probabilities and one-hot targets, 0 for a
    head without samples. Computed in float32 (float64 for float64 logits).
    """
    acc = torch.float64 if logits[0].dtype == torch.float64 else torch.float32
    losses = []
    for h, (x, t) in enumerate(zip(logits, targets)):
        x = x.to(acc)
        t = t.long()
        n, C = x.shape[:2]
        valid = (t != ignore_index) & (t >= 0) & (t < C)
        tc = torch.where(valid, t, torch.zeros_like(t))
        nll = -torch.log_softmax(x, 1).gather(1, tc.unsqueeze(1)).squeeze(1)
        w = torch.ones_like(nll) if class_weights is None or class_weights[h] is None \
            else class_weights[h].to(device=x.device, dtype=acc)[tc]
        w = torch.where(valid, w, torch.zeros_like(w))
        wsum = w.sum()
        num = torch.where(valid, w * nll, torch.zeros_like(nll)).sum()
        ce = torch.where(wsum > 0, num / torch.where(wsum > 0, wsum, torch.ones_like(wsum)),
                         torch.zeros_like(wsum))
        vm = valid.unsqueeze(1)
        p = torch.where(vm, torch.softmax(x, 1), torch.zeros_like(x))
        onehot = torch.nn.functional.one_hot(tc, C).movedim(-1, 1).to(acc) * vm
        dims = list(range(2, x.dim()))
        if dims:
            inter, psum, tsum = (p * onehot).sum(dims), p.sum(dims), onehot.sum(dims)
        else:  # (n, C): one voxel per sample (sum over [] would reduce everything)
            inter, psum, tsum = p * onehot, p, onehot
        dice_terms = 1 - (2 * inter + smooth) / (psum + tsum + smooth)
        dice = dice_terms.mean() if n > 0 else x.new_zeros(())
        losses.append(ce_weight * ce + dice_weight * dice)
    per_head = torch.stack(losses)
    hw = torch.ones_like(per_head) if head_weights is None else \
        torch.as_tensor(head_weights, device=per_head.device).to(acc)
    return (hw * per_head).sum(), per_head
