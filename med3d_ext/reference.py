"""Pure-PyTorch references for every med3d_ext op.

They define the semantics that the kernels must reproduce: tests compare against them,
benchmarks use them as the eager baseline, and the ops fall back to them when the compiled
extension is not available. Keep them simple and obviously right, not fast.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._args import ArgumentTypeError


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
        # F.cross_entropy's weighted mean for any sign of the sum; 0 (not NaN) for a sum of 0
        ce = torch.where(wsum != 0, num / torch.where(wsum != 0, wsum, torch.ones_like(wsum)),
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
    if head_weights is None:
        hw = torch.ones_like(per_head)
    elif not isinstance(head_weights, torch.Tensor) and any(
            isinstance(w, torch.Tensor) for w in head_weights):
        hw = torch.stack([torch.as_tensor(w, device=per_head.device).to(acc).reshape(())
                          for w in head_weights])  # stacked: their gradients survive
    else:
        hw = torch.as_tensor(head_weights, device=per_head.device).to(acc)
    return (hw * per_head).sum(), per_head
# --------------------------------------------------------------------------- resample/
# Semantics of csrc/resample/resample.h. Integer maps go through float64 (exact below 2^53);
# low-precision images are resampled in float32 and rounded once at the end.

_PADDINGS = ("zeros", "border", "reflection")
INTENSITY_FIELDS = ("scale", "shift", "gamma", "noise_std", "clip_min", "clip_max")


def _resample_acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64,) or not dtype.is_floating_point else (
        torch.float32)


def affine_resample(image, theta, size, mode="bilinear", padding_mode="zeros",
                    align_corners=False):
    """F.grid_sample(image, F.affine_grid(theta, size)) in float32/64, cast back to image's dtype."""
    import torch.nn.functional as F

    acc = _resample_acc(image.dtype)
    grid = F.affine_grid(theta.to(acc), list(size), align_corners=align_corners)
    out = F.grid_sample(image.to(acc), grid, mode=mode, padding_mode=padding_mode,
                        align_corners=align_corners)
    return out.to(image.dtype)


def elastic_field(elastic, spatial):
    """The full-resolution displacement (N, D, H, W, 3) of a coarse (N, 3, g, g, g) field."""
    import torch.nn.functional as F

    full = F.interpolate(elastic, size=list(spatial), mode="trilinear", align_corners=True)
    return full.permute(0, 2, 3, 4, 1)


_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """resample.h hash32 on int64 tensors holding uint32 values (products stay below 2^63)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def noise_key(seed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    lo, hi = seed & _M32, (seed >> 32) & _M32
    return hash32(lo ^ hash32(hi ^ hash32(n & _M32)))


def noise_normal(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) for voxel indices ``idx`` under per-sample ``key`` (broadcast)."""
    ilo, ihi = idx & _M32, (idx >> 32) & _M32
    a = hash32(key ^ hash32((ilo + hash32(ihi)) & _M32))
    b = hash32(a ^ 0x68E31DA4)
    u1 = ((a >> 8) + 1).to(torch.float32) * 2.0**-24
    u2 = (b >> 8).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.2831853071795864 * u2)


def intensity_epilogue(v, params, seed):
    """v (N, C, D, H, W) float32; params (N, 6) float32; seed (N,) int64 or None."""
    n = v.shape[0]
    p = [params[:, k].view(n, 1, 1, 1, 1) for k in range(6)]
    scale, shift, gamma, noise_std, lo, hi = p
    m = torch.pow(v.abs(), gamma)
    v = torch.where(gamma != 1.0, torch.where(v < 0, -m, m), v)
    v = v * scale + shift
    if bool((params[:, 3] != 0).any()):
        seed = seed if seed is not None else torch.zeros(n, dtype=torch.int64, device=v.device)
        key = noise_key(seed, torch.arange(n, device=v.device)).view(n, 1, 1, 1, 1)
        idx = torch.arange(v[0].numel(), device=v.device).view(1, *v.shape[1:])
        z = noise_normal(key, idx)
        v = torch.where(noise_std != 0.0, v + noise_std * z, v)
    return torch.minimum(torch.maximum(v, lo), hi)


_CONSTANT_COLUMNS: dict = {}


def _constant_column(n: int, value: float, device) -> torch.Tensor:
    """An (n,) float32 column of ``value`` on ``device``, made once and reused (read only: it is
    only ever stacked into a new tensor). A fill on the device, not torch.as_tensor(number,
    device=cuda): that is a blocking copy that waits for all queued GPU work (a host sync per
    augmented batch); reused, not refilled: the unclipped bounds (-inf, inf) were two fills and
    ~10 us of host time per call."""
    if torch.compiler.is_compiling():  # traced: a fill in the graph (no global state to guard)
        return torch.full((n,), value, dtype=torch.float32, device=device)
    key = (n, value, str(device))
    col = _CONSTANT_COLUMNS.get(key)
    if col is None:
        if len(_CONSTANT_COLUMNS) >= 64:  # a few batch sizes and values in practice
            _CONSTANT_COLUMNS.clear()
        col = _CONSTANT_COLUMNS[key] = torch.full((n,), value, dtype=torch.float32, device=device)
    return col


def pack_intensity(intensity, n: int, device):
    """The intensity dict as the op's (N, 6) float32 parameters and (N,) int64 seeds (or None).

    Keys (each a scalar or an (N,) tensor; all optional): ``scale`` (1), ``shift`` (0),
    ``gamma`` (1), ``noise_std`` (0), ``clip`` = (min, max) or an (N, 2) tensor (no clip),
    ``seed`` (0). Unknown keys are an error.
    """
    import math

    known = {"scale", "shift", "gamma", "noise_std", "clip", "seed"}
    if not isinstance(intensity, Mapping):  # a list said "unknown keys [1.0]"
        raise ArgumentTypeError(f"med3d_ext: argument 'intensity' must be a dict of "
                                f"{sorted(known)}, got {type(intensity).__name__}")
    bad = set(intensity) - known
    if bad:
        raise ValueError(f"med3d_ext: argument 'intensity' has unknown keys {sorted(bad)}; "
                         f"known keys are {sorted(known)}")

    def col(key, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # a NaN or infinite factor turned the whole output into NaN/inf (clip bounds may be
            # infinite: no bound). Tensor values are not checked: that would be a host sync.
            if key != "clip" and not math.isfinite(value):
                raise ValueError(f"med3d_ext: intensity['{key}'] must be finite, got {value}")
            return _constant_column(n, float(value), device)
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"med3d_ext: intensity['{key}'] must be a number or a ({n},) tensor, "
                            f"got {value!r}")
        try:
            v = torch.as_tensor(value, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"med3d_ext: intensity['{key}'] must be a number or a ({n},) tensor, "
                            f"got {value!r} ({e})") from None
        v = v.expand(n) if v.dim() == 0 else v
        if tuple(v.shape) != (n,):
            raise ValueError(f"med3d_ext: intensity['{key}'] must be a scalar or ({n},), got "
                             f"shape {tuple(v.shape)}")
        return v

    clip = intensity.get("clip")
    if clip is None:
        lo, hi = col("clip", -math.inf), col("clip", math.inf)
    elif isinstance(clip, torch.Tensor) and clip.dim() == 2:
        if tuple(clip.shape) != (n, 2):
            raise ValueError(f"med3d_ext: intensity['clip'] must be (min, max) or ({n}, 2), got "
                             f"shape {tuple(clip.shape)}")
        lo, hi = col("clip", clip[:, 0]), col("clip", clip[:, 1])
    else:
        if isinstance(clip, (str, bytes)) or not hasattr(clip, "__len__") or len(clip) != 2:
            raise ValueError(f"med3d_ext: intensity['clip'] must be (min, max) or an ({n}, 2) "
                             f"tensor, got {clip!r}")
        lo, hi = (col("clip", c) for c in clip)
    params = torch.stack([col("scale", intensity.get("scale", 1.0)),
                          col("shift", intensity.get("shift", 0.0)),
                          col("gamma", intensity.get("gamma", 1.0)),
                          col("noise_std", intensity.get("noise_std", 0.0)), lo, hi], dim=1)
    seed = intensity.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not -2**63 <= seed < 2**63:
            raise ValueError(f"med3d_ext: intensity['seed'] must fit in int64, got {seed}")
        seed = torch.full((n,), seed, dtype=torch.int64, device=device)
    elif seed is not None:
        if isinstance(seed, (float, bool, str, bytes)) or (
                isinstance(seed, torch.Tensor) and (seed.is_floating_point() or
                                                    seed.dtype == torch.bool)):
            # a float seed was truncated (1.5 gave seed 1's noise)
            raise TypeError(f"med3d_ext: intensity['seed'] must be an int or an integer "
                            f"({n},) tensor, got {seed!r}")
        seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
        seed = seed.expand(n).contiguous() if seed.dim() == 0 else seed.contiguous()
        if tuple(seed.shape) != (n,):
            raise ValueError(f"med3d_ext: intensity['seed'] must be a scalar or ({n},), got "
                             f"shape {tuple(seed.shape)}")
    return params.contiguous(), seed


def affine_resample_pair(image, label, theta, size, label_size=None, *, elastic=None,
                         intensity=None, padding_mode="zeros", align_corners=False):
    """Image trilinear (+ elastic, + intensity epilogue), label nearest, by the same theta.

    Same arguments as ``med3d_ext.ops.affine_resample_pair``: label (N, D, H, W) or
    (N, 1, D, H, W) any dtype (returned with its rank); intensity a dict (see pack_intensity).
    The elastic field is built at full resolution here (F.interpolate) and added to the grid.
    """
    import torch.nn.functional as F

    size = list(size)
    label_size = list(label_size) if label_size is not None else size[2:]
    acc = _resample_acc(image.dtype)
    lab5 = label if label.dim() == 5 else label.unsqueeze(1)

    def grid_for(spatial, channels):
        g = F.affine_grid(theta.to(acc), [size[0], channels, *spatial], align_corners=align_corners)
        if elastic is not None:
            g = g + elastic_field(elastic.to(acc), spatial)
        return g

    out = F.grid_sample(image.to(acc), grid_for(size[2:], size[1]), mode="bilinear",
                        padding_mode=padding_mode, align_corners=align_corners)
    if intensity is not None:
        params, seed = pack_intensity(intensity, image.shape[0], image.device)
        out = intensity_epilogue(out.float(), params, seed)
    lab = F.grid_sample(lab5.to(torch.float64), grid_for(label_size, lab5.shape[1]).double(),
                        mode="nearest", padding_mode=padding_mode, align_corners=align_corners)
    lab = lab.to(label.dtype)
    return out.to(image.dtype), (lab if label.dim() == 5 else lab.squeeze(1))


def resize(image, size, mode="trilinear"):
    """F.interpolate(image, size, mode, align_corners=False for trilinear); any dtype for nearest."""
    import torch.nn.functional as F

    acc = _resample_acc(image.dtype)
    kw = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(image.to(acc), size=list(size), mode=mode, **kw).to(image.dtype)
def conv_bn_relu3d(x, weight, bn_weight, bn_bias, running_mean, running_var, *, stride=1,
                   padding=0, dilation=1, training=True, momentum=0.1, eps=1e-5, residual=None,
                   relu=True):
    """relu(batch_norm(conv3d(x, weight, None, stride, padding, dilation)) [+ residual]).

    Updates running_mean / running_var in place when training, as F.batch_norm does."""
    import torch.nn.functional as F

    y = F.conv3d(x, weight, None, stride, padding, dilation)
    out = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def conv_bias_relu3d(x, weight, bias, *, stride=1, padding=0, dilation=1, residual=None,
                     relu=True):
    """relu(conv3d(x, weight, bias, stride, padding, dilation) [+ residual]): the epilogue of a
    convolution with BatchNorm folded into its weight and bias."""
    import torch.nn.functional as F

    out = F.conv3d(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def im2col3d(x, kernel_size, stride, padding, dilation, align=8):
    """The (N*D'*H'*W', round_up(Cin*kD*kH*kW, align)) matrix of a 3-D convolution's input
    windows: row (n, d', h', w'), column (c, i, j, l), zero columns after the real ones, so that
    ``conv3d(x, w)`` is ``im2col3d(x) @ w.reshape(Cout, -1).T`` padded (one strided slice of the
    padded input per kernel tap; written for clarity, not speed)."""
    import torch.nn.functional as F

    k, s, p, d = (list(kernel_size), list(stride), list(padding), list(dilation))
    xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
    out = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    taps = []
    for i in range(k[0]):
        for j in range(k[1]):
            for l in range(k[2]):
                o = (i * d[0], j * d[1], l * d[2])
                taps.append(xp[:, :, o[0]:o[0] + s[0] * (out[0] - 1) + 1:s[0],
                               o[1]:o[1] + s[1] * (out[1] - 1) + 1:s[1],
                               o[2]:o[2] + s[2] * (out[2] - 1) + 1:s[2]])
    cols = torch.stack(taps, 2)  # (N, C, taps, D', H', W')
    n, c = x.shape[:2]
    cols = cols.permute(0, 3, 4, 5, 1, 2).reshape(n * out[0] * out[1] * out[2], c * len(taps))
    kp = -(-cols.shape[1] // align) * align
    return F.pad(cols, (0, kp - cols.shape[1]))


def conv_bn_relu_maxpool3d(x, weight, bn_weight, bn_bias, running_mean, running_var, *,
                           stride=1, padding=0, dilation=1, training=True, momentum=0.1,
                           eps=1e-5, pool_kernel=3, pool_stride=2, pool_padding=1):
    """max_pool3d(relu(batch_norm(conv3d(x, weight))), pool_kernel, pool_stride, pool_padding):
    MedicalNet's stem (conv1, bn1, relu, maxpool)."""
    import torch.nn.functional as F

    out = conv_bn_relu3d(x, weight, bn_weight, bn_bias, running_mean, running_var,
                         stride=stride, padding=padding, dilation=dilation, training=training,
                         momentum=momentum, eps=eps)
    return F.max_pool3d(out, pool_kernel, pool_stride, pool_padding)
