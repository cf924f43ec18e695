"""Fast path for MedicalNet's stem conv: Cin <= 4, kernel 7^3, stride 2, padding 3.

cuDNN has no good kernel for a one-channel, stride-2, 7^3 convolution (in bf16 it falls to a
generic implicit-GEMM kernel: ~3.3 ms forward + 1.6 ms weight gradient per ResNet-10 step on an
H200). The same convolution is rewritten exactly as a stride-1 convolution with 8x the input
channels and a 4^3 kernel, a shape for which cuDNN's tensor-core kernels work well:

    out[o] = sum_{k=0..6} xp[2o + k] w[k]                       (xp: x padded by `padding`)
           = sum_{q=0..3} sum_{r=0,1} X_r[o + q] w[2q + r]       (k = 2q + r, w[7] = 0)

where X_r[m] = xp[2m + r] is a space-to-depth rearrangement of the padded input (per spatial
dim, so 2^3 = 8 phases per input channel). The weight is zero-padded from 7 to 8 taps and
rearranged the same way. Both rearrangements are ordinary differentiable tensor ops, so
autograd gives the input and weight gradients, and the weight gradient is itself a fast
stride-1 convolution gradient. The rewrite wastes (8/7)^3 - 1 = 49% of the multiply-adds on
zero taps, which tensor cores more than pay for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["stem_conv3d", "stem_rewrite", "is_stem_like"]


def is_stem_like(weight: torch.Tensor, stride, padding, dilation) -> bool:
    """True for the convolutions this rewrite helps: few input channels, stride 2, odd kernel."""
    s, p, d = (_triple(stride), _triple(padding), _triple(dilation))
    return (weight.dim() == 5 and weight.shape[1] <= 4 and s == (2, 2, 2) and d == (1, 1, 1)
            and all(k >= 3 for k in weight.shape[2:]))


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def stem_rewrite(x: torch.Tensor, weight: torch.Tensor, padding=3):
    """Return ``(x2, w2)`` with ``conv3d(x2, w2) == conv3d(x, weight, stride=2, padding=padding)``.

    x (N, Cin, D, H, W) -> x2 (N, 8*Cin, Do+q_d-1, ...); weight (Cout, Cin, kd, kh, kw) ->
    w2 (Cout, 8*Cin, ceil(kd/2), ceil(kh/2), ceil(kw/2)); stride 1, no padding.
    """
    n, cin = x.shape[:2]
    ks = weight.shape[2:]
    pads = _triple(padding)
    q = [(k + 1) // 2 for k in ks]  # taps per phase
    out = [(size + 2 * p - k) // 2 + 1 for size, p, k in zip(x.shape[2:], pads, ks)]
    # padded length per dim: 2 * (out + q - 1) covers every tap of every output
    right = [2 * (o + qq - 1) - size - p for o, qq, size, p in zip(out, q, x.shape[2:], pads)]
    # F.pad takes (W_left, W_right, H_left, H_right, D_left, D_right); negative crops.
    xp = F.pad(x, (pads[2], right[2], pads[1], right[1], pads[0], right[0]))
    L = [(o + qq - 1) for o, qq in zip(out, q)]
    # (N, C, L_d, 2, L_h, 2, L_w, 2) -> (N, C, 2, 2, 2, L_d, L_h, L_w): channel index c*8 + phase
    x2 = xp.reshape(n, cin, L[0], 2, L[1], 2, L[2], 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x2 = x2.reshape(n, cin * 8, L[0], L[1], L[2])
    # Keep the caller's layout: channels_last_3d in (true of any Cin=1 tensor) -> out.
    layout = (torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d)
              else torch.contiguous_format)
    x2 = x2.contiguous(memory_format=layout)
    cout = weight.shape[0]
    wp = F.pad(weight, (0, 2 * q[2] - ks[2], 0, 2 * q[1] - ks[1], 0, 2 * q[0] - ks[0]))
    w2 = wp.reshape(cout, cin, q[0], 2, q[1], 2, q[2], 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    w2 = w2.reshape(cout, cin * 8, q[0], q[1], q[2])
    if weight.is_contiguous(memory_format=torch.channels_last_3d):
        w2 = w2.contiguous(memory_format=torch.channels_last_3d)
    return x2, w2


def stem_conv3d(x: torch.Tensor, weight: torch.Tensor, bias=None, *, padding=3) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=2, padding=padding)`` through the stride-1 rewrite.

    Args:
        x: (N, Cin, D, H, W), any float dtype, contiguous or channels_last_3d.
        weight: (Cout, Cin, kd, kh, kw), odd or even kernel sizes.
    Returns:
        (N, Cout, Do, Ho, Wo), the same values as the direct convolution up to summation order.
    """
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"stem_conv3d: x and weight must be 5-D, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"stem_conv3d: x has {x.shape[1]} channels but weight expects "
                         f"{weight.shape[1]} (weight {tuple(weight.shape)})")
    x2, w2 = stem_rewrite(x, weight, padding)
    return F.conv3d(x2, w2, bias)
