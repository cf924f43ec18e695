"""Sliding-window inference over whole volumes with Gaussian-weighted overlap.

Each window's logits (which MedicalNet-style networks produce at 1/4 of the window size) are
upsampled trilinearly to the window size, turned into probabilities with softmax, weighted by
a Gaussian importance map (centre voxels are predicted with more context than border ones)
and accumulated; the sum is divided by the accumulated weights. Window placement follows the
usual scheme (MONAI's ``dense_patch_slices``): a stride of ``int(window * (1 - overlap))``
and a last window flush with the volume's end, so every voxel is covered.

Mirroring test-time augmentation (``mirror_axes``, nnU-Net's default at inference): each
window is also predicted flipped along every combination of the given spatial axes, each
prediction flipped back, and the window's probabilities are the mean over the flips, before
the Gaussian weighting. Probabilities (not logits) are averaged because the windows are
accumulated as probabilities here: the result stays one weighted mean of softmax outputs
over (window, flip) predictions, as nnU-Net v1's mirroring averaged softmax outputs (nnU-Net
v2 accumulates logits over windows, and averages logits over flips to match). Flips are taken per
window, as nnU-Net does: every flip then sees the same window grid (the grid is not symmetric
under a flip of the whole volume, whose last window is flush with the end).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_weight_map", "window_starts", "sliding_window_probs",
           "sliding_window_predict"]


def _window(name: str, v) -> tuple[int, int, int]:
    """3 positive ints (an int is a cube), or an error naming the argument: int() truncated a
    4.7 to 4, and a 0, a negative or 2 values failed deep inside with unrelated messages."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = [v] * 3
    try:
        if isinstance(v, str) or not isinstance(v, Sequence) or any(isinstance(x, bool) for x in v):
            raise TypeError
        out = tuple(operator.index(x) for x in v)
    except TypeError:
        raise TypeError(f"{name} must be an int or 3 ints (D, H, W), got {v!r}") from None
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"{name} must be 3 positive ints (D, H, W), got {list(out)}")
    return out


def gaussian_weight_map(size, sigma_scale: float = 0.125, device=None,
                        dtype=torch.float32) -> torch.Tensor:
    """(D, H, W) separable Gaussian, sigma = sigma_scale * size per axis, centred on the
    window, maximum 1; no zeros (the smallest value floors it) so that a voxel covered only by
    window borders still gets a prediction."""
    size = _window("size", size)
    if not (isinstance(sigma_scale, numbers.Real) and math.isfinite(sigma_scale)
            and sigma_scale > 0):
        raise ValueError(f"sigma_scale must be a positive number, got {sigma_scale!r}")
    axes = []
    for s in size:
        x = torch.arange(s, device=device, dtype=torch.float64) - (s - 1) / 2
        sigma = max(sigma_scale * s, 1e-6)
        axes.append(torch.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    pos = w[w > 0]
    w = torch.clamp(w, min=float(pos.min()) if pos.numel() else 1.0)
    return w.to(dtype)


def window_starts(n: int, w: int, overlap: float) -> list[int]:
    """Start indices of windows of size ``w`` covering ``n`` voxels (n >= w)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if n <= w:
        return [0]
    step = max(int(w * (1 - overlap)), 1)
    num = math.ceil((n - w) / step) + 1
    out = []
    for i in range(num):
        s = min(i * step, n - w)
        if not out or s != out[-1]:
            out.append(s)
    return out


def _mirror_axes(v) -> tuple[int, ...]:
    """Spatial axes to mirror, sorted: 0, 1, 2 = D, H, W (an int is one axis; None or () =
    none), or an error naming the argument. Tensor dims (2..4) and bools (True is 1) are
    refused rather than read as other axes."""
    if v is None:
        return ()
    if hasattr(v, "tolist"):  # a tensor or numpy array
        v = v.tolist()
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = [v]
    try:
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or \
                any(isinstance(a, bool) for a in v):
            raise TypeError
        axes = [operator.index(a) for a in v]
    except TypeError:
        raise TypeError(f"mirror_axes must be spatial axes: an int or a sequence of ints among "
                        f"0, 1, 2 (D, H, W), got {v!r}") from None
    if any(not 0 <= a <= 2 for a in axes):
        raise ValueError(f"mirror_axes must be spatial axes among 0, 1, 2 (D, H, W of the "
                         f"volume, not its tensor dims 2..4), got {axes}")
    if len(set(axes)) != len(axes):
        # each axis flipped twice is no flip: a duplicate is a typo, not a request
        raise ValueError(f"mirror_axes has a duplicate axis: {axes}")
    return tuple(sorted(axes))


def _flip_dims(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Tensor dims to flip for each of the 2^k combinations of ``axes`` (spatial axis a is
    dim a + 2 of (B, C, D, H, W)); the identity () first."""
    return [tuple(a + 2 for i, a in enumerate(axes) if mask >> i & 1)
            for mask in range(2 ** len(axes))]


def _window_probs(predictor, patches, window, upsample: bool, softmax: bool) -> torch.Tensor:
    """One forward: logits upsampled to the window, then softmax (or the logits)."""
    logits = predictor(patches).float()
    if upsample and tuple(logits.shape[2:]) != window:
        logits = F.interpolate(logits, size=window, mode="trilinear", align_corners=False)
    return torch.softmax(logits, 1) if softmax else logits


def _mirrored_probs(predictor, patches, flips, per_call: int, on_call, **kw) -> torch.Tensor:
    """Mean over ``flips`` of the flipped-back predictions of flipped ``patches``. The
    flipped copies are stacked along the batch, ``per_call`` flips to a forward (fewer, larger
    model calls than one per flip); ``on_call(n_flips)`` after each forward."""
    if len(flips) == 1 and not flips[0]:  # no mirroring: one forward, as before (bitwise)
        probs = _window_probs(predictor, patches, **kw)
        on_call(1)
        return probs
    b = patches.shape[0]
    total = None
    for j in range(0, len(flips), per_call):
        group = flips[j:j + per_call]
        probs = _window_probs(predictor, torch.cat(
            [patches.flip(d) if d else patches for d in group], 0), **kw)
        for k, d in enumerate(group):
            part = probs[k * b:(k + 1) * b]
            part = part.flip(d) if d else part  # back to the window's own orientation
            total = part if total is None else total + part
        on_call(len(group))
    return total / len(flips)


@torch.no_grad()
def sliding_window_probs(volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                         window, *, overlap: float = 0.5, sw_batch_size: int = 2,
                         weight_map: torch.Tensor | None = None, pad_value: float = 0.0,
                         upsample: bool = True, softmax: bool = True,
                         progress: Callable[[int, int], None] | None = None,
                         mirror_axes=None) -> torch.Tensor:
    """Class probabilities for a whole volume.

    volume: (N, C, D, H, W) on the model's device; smaller than ``window`` along an axis ->
        padded symmetrically with ``pad_value`` (and cropped back).
    predictor: (B, C, wd, wh, ww) -> logits (B, K, d, h, w); (d, h, w) is upsampled
        trilinearly to the window when it differs (``upsample``).
    window: (wd, wh, ww). weight_map: (wd, wh, ww), default ``gaussian_weight_map``.
    progress: called as ``progress(done, total)`` after each forward (a whole CT volume on a
        CPU takes minutes: callers show a bar), counting window predictions: windows x 2^k
        with ``mirror_axes`` (k axes), so that each forward advances it by what it did.
    mirror_axes: spatial axes (0, 1, 2 = D, H, W) for mirroring test-time augmentation; None
        or () = none. Each window is predicted for the 2^k flip combinations of the k axes
        (input flipped, probabilities flipped back) and the mean taken before the Gaussian
        weighting; with ``softmax=False`` the logits are averaged likewise. Costs 2^k times
        the model calls' work. ``sw_batch_size`` keeps bounding the window copies per forward
        (the memory it was chosen for): the flips of a window batch are stacked along the
        batch, sw_batch_size // 2^k windows (at least 1) x their 2^k flips per forward, and a
        window whose flips do not fit (sw_batch_size < 2^k) has them split over
        ceil(2^k / sw_batch_size) forwards of sw_batch_size copies.
    Returns (N, K, D, H, W) float32 probabilities (softmax) or averaged logits.
    """
    if volume.dim() != 5:
        raise ValueError(f"volume must be (N, C, D, H, W), got shape {tuple(volume.shape)}")
    window = _window("window", window)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, numbers.Integral) \
            or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    flips = _flip_dims(_mirror_axes(mirror_axes))
    n = volume.shape[0]
    spatial = volume.shape[2:]
    pads = []
    for s, w in zip(reversed(spatial), reversed(window)):
        extra = max(w - s, 0)
        pads += [extra // 2, extra - extra // 2]
    x = F.pad(volume, pads, value=pad_value) if any(pads) else volume
    full = x.shape[2:]
    if weight_map is None:
        weight_map = gaussian_weight_map(window, device=x.device)
    weight_map = weight_map.to(x.device, torch.float32)
    if tuple(weight_map.shape) != window or not bool((weight_map > 0).all()) or \
            not bool(torch.isfinite(weight_map).all()):
        # a zero weight leaves voxels with 0 / 0 = NaN (all-zero: every voxel, silently)
        raise ValueError(f"weight_map must be positive and finite, of the window's shape "
                         f"{list(window)}, got shape {list(weight_map.shape)}")
    starts = [window_starts(s, w, overlap) for s, w in zip(full, window)]
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    out = None
    norm = torch.zeros((1, 1, *full), device=x.device, dtype=torch.float32)
    # windows per forward, and flips of them per forward: at most sw_batch_size copies
    step = max(sw_batch_size // len(flips), 1)
    per_call = min(len(flips), sw_batch_size)
    done, total = 0, len(corners) * len(flips)

    def on_call(n_flips: int) -> None:  # after each forward over the flips of ``chunk``
        nonlocal done
        done += len(chunk) * n_flips
        if progress is not None:
            progress(done, total)

    for i in range(0, len(corners), step):
        chunk = corners[i:i + step]
        sl = [(slice(None), slice(None), slice(a, a + window[0]), slice(b, b + window[1]),
               slice(c, c + window[2])) for a, b, c in chunk]
        patches = torch.cat([x[s] for s in sl], 0)
        probs = _mirrored_probs(predictor, patches, flips, per_call, on_call, window=window,
                                upsample=upsample, softmax=softmax)
        if out is None:
            out = torch.zeros((n, probs.shape[1], *full), device=x.device, dtype=torch.float32)
        for j, s in enumerate(sl):
            out[s] += probs[j * n:(j + 1) * n] * weight_map
            norm[s] += weight_map
    out = out / norm
    # F.pad order is (W_lo, W_hi, H_lo, H_hi, D_lo, D_hi)
    crop = tuple(slice(p0, p0 + s) for p0, s in zip((pads[4], pads[2], pads[0]), spatial))
    return out[(slice(None), slice(None), *crop)]


def sliding_window_predict(volume, predictor, window, **kw) -> torch.Tensor:
    """Label map (N, D, H, W) int64: argmax of :func:`sliding_window_probs`."""
    return sliding_window_probs(volume, predictor, window, **kw).argmax(1)
