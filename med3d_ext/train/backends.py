"""The pieces the training loops use from the rest of the package, resolved lazily.

Each getter returns the package's implementation when it is importable (the fused ops,
``med3d_ext.transforms``) and otherwise a small plain-PyTorch equivalent defined here,
clearly named ``plain_*``, so the CLI keeps working in a partial build.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["seg_loss_fn", "resize_fn", "augmenter", "plain_multihead_seg_loss",
           "PlainAugment3D", "downsample_labels", "fusion_available"]


# ----------------------------------------------------------------------------------- loss


def plain_multihead_seg_loss(logits, targets, *, head_weights=None, smooth=1e-5, **_):
    """Per head: cross-entropy + soft Dice (softmax, one-hot, background included, per sample
    and class, averaged) -- the contract of ``med3d_ext.ops.multihead_seg_loss`` without
    ignore_index / class_weights. Returns (weighted sum, per-head losses)."""
    per_head = []
    for lg, tg in zip(logits, targets):
        lg = lg.float()
        tg = tg.long()
        ce = F.cross_entropy(lg, tg)
        p = torch.softmax(lg, 1)
        oh = F.one_hot(tg, lg.shape[1]).movedim(-1, 1).to(p.dtype)
        dims = tuple(range(2, lg.dim()))
        inter = (p * oh).sum(dims)
        den = p.sum(dims) + oh.sum(dims)
        dice = 1 - (2 * inter + smooth) / (den + smooth)
        per_head.append(ce + dice.mean())
    per = torch.stack(per_head)
    w = torch.ones_like(per) if head_weights is None else \
        torch.as_tensor(head_weights, dtype=per.dtype, device=per.device)
    return (w * per).sum(), per.detach()


# The training loss re-checks the labels (a host sync: the op's validate=True) on its first
# call and every LABEL_CHECK_EVERY-th after: preprocessing already refused labels that the
# dataset does not declare, and a per-step sync would keep the host from queueing the next
# step's work while the GPU runs this one.
LABEL_CHECK_EVERY = 100


def seg_loss_fn(use_ops: bool = True):
    """``med3d_ext.ops.multihead_seg_loss`` (one fused kernel for all heads) when ``use_ops``
    and available, its label check on every LABEL_CHECK_EVERY-th call from the first; else
    the package's pure-PyTorch reference, else the plain version here."""
    if use_ops:
        try:
            from med3d_ext.ops import multihead_seg_loss
        except ImportError:
            pass
        else:
            calls = [0]

            def loss(logits, targets, **kw):
                kw.setdefault("validate", calls[0] % LABEL_CHECK_EVERY == 0)
                calls[0] += 1
                return multihead_seg_loss(logits, targets, **kw)
            return loss
    try:
        from med3d_ext.reference import multihead_seg_loss

        return multihead_seg_loss
    except ImportError:
        return plain_multihead_seg_loss


def resize_fn(use_ops: bool = True):
    """``f(logits, size)``: trilinear resize (align_corners=False) of logits onto the label grid
    for ``--label-grid patch``. ``med3d_ext.ops.resize`` when ``use_ops`` and available (one
    gather kernel forward; its backward sums each input voxel's contributions in fp32 and
    rounds once, also for bf16 logits under autocast), else ``F.interpolate``."""
    if use_ops:
        try:
            from med3d_ext.ops import resize
        except ImportError:
            pass
        else:
            return lambda x, size: resize(x, size, "trilinear")
    return lambda x, size: F.interpolate(x, size=size, mode="trilinear", align_corners=False)


# ---------------------------------------------------------------------------- augmentation


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(N, 3) angles in radians -> (N, 3, 3) rotation matrices Rz @ Ry @ Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
    return rz.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rx.view(-1, 3, 3)


def random_theta(n: int, *, rotate_deg=15.0, scale=(0.85, 1.15), flip=True,
                 generator=None) -> torch.Tensor:
    """(n, 3, 4) random affine (rotation, isotropic scale, axis flips) in normalised units."""
    g = generator
    ang = (torch.rand(n, 3, generator=g) * 2 - 1) * math.radians(rotate_deg)
    sc = torch.empty(n, 1, 1).uniform_(scale[0], scale[1], generator=g)
    a = _rotation(ang) * sc
    if flip:
        f = torch.where(torch.rand(n, 3, generator=g) < 0.5, -1.0, 1.0)
        a = a * f[:, None, :]
    return torch.cat([a, torch.zeros(n, 3, 1)], 2)


def downsample_labels(label: torch.Tensor, size) -> torch.Tensor:
    """(N, D, H, W) integer labels -> (N, *size) int64 by nearest sampling: with integer
    factors f the voxel at f*i + f//2 (the centre of low-res voxel i sits exactly between two
    voxels for even f, where a sampling grid would round either way by float noise)."""
    size = tuple(int(s) for s in size)
    if tuple(label.shape[1:]) == size:
        return label.long()
    if all(n % s == 0 for n, s in zip(label.shape[1:], size)):
        f = [n // s for n, s in zip(label.shape[1:], size)]
        return label[:, f[0] // 2::f[0], f[1] // 2::f[1], f[2] // 2::f[2]].long()
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


class PlainAugment3D:
    """Random affine (shared by image and label; image trilinear, label nearest onto
    ``label_size``) plus intensity scale/shift/noise, with F.affine_grid + F.grid_sample.
    Draws its per-sample parameters from torch's global CPU RNG and the noise volume from the
    image's device's default generator (both checkpointed by the trainer): the noise is as
    large as the batch, and drawing it on the host cost a GPU run more than the rest of the
    step (a baseline that slow would flatter the fused path it is compared with)."""

    def __init__(self, rotate_deg=15.0, scale=(0.85, 1.15), flip=True, p=0.8):
        self.rotate_deg, self.scale, self.flip, self.p = rotate_deg, scale, flip, p

    def __call__(self, image, label, size, label_size=None):
        n = image.shape[0]
        size = tuple(size)
        label_size = tuple(label_size or size)
        theta = random_theta(n, rotate_deg=self.rotate_deg, scale=self.scale, flip=self.flip)
        keep = torch.rand(n) >= self.p
        theta[keep] = torch.eye(3, 4)
        mult = torch.empty(n, 1, 1, 1, 1).uniform_(0.9, 1.1)
        shift = torch.empty(n, 1, 1, 1, 1).uniform_(-0.1, 0.1)
        noise_std = torch.empty(n, 1, 1, 1, 1).uniform_(0.0, 0.05)
        noise = torch.randn((n, 1, *size), device=image.device)
        theta = theta.to(image.device, torch.float32)
        grid = F.affine_grid(theta, (n, 1, *size), align_corners=False)
        img = F.grid_sample(image.float(), grid, mode="bilinear", align_corners=False)
        img = img * mult.to(img.device) + shift.to(img.device) + noise * noise_std.to(img.device)
        lgrid = F.affine_grid(theta, (n, 1, *label_size), align_corners=False)
        lab = F.grid_sample(label[:, None].float(), lgrid, mode="nearest", align_corners=False)
        return img, lab[:, 0].round().long()


def augmenter(enabled: bool = True, use_ops: bool = True, seed: int = 0):
    """``med3d_ext.transforms.RandomAugment3D`` (batched, on the batch's device, one
    ``affine_resample_pair`` launch; its own generator, checkpointed through ``state_dict``)
    when ``use_ops`` and available, else :class:`PlainAugment3D` (torch's global RNG); None
    when augmentation is off. Both draw the same kinds of transforms: rotation up to 15
    degrees, zoom 0.85-1.15 and flips (80% of samples), contrast, brightness and noise."""
    if not enabled:
        return None
    if use_ops:
        try:
            from med3d_ext.transforms import RandomAugment3D

            return RandomAugment3D(rotate=math.radians(15), scale=(0.85, 1.15), flip=0.5,
                                   p_affine=0.8, contrast=(0.9, 1.1), brightness=(-0.1, 0.1),
                                   noise=(0.0, 0.05), seed=seed)
        except ImportError:
            pass
    return PlainAugment3D()


def fusion_available() -> bool:
    """The fused forward path can be switched on (compiled ops + med3d_ext.nn)."""
    try:
        from med3d_ext import _extension
        from med3d_ext.nn import fuse_modules  # noqa: F401

        return bool(_extension.available())
    except ImportError:
        return False
