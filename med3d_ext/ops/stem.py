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

Folding taps into channels as well (an im2col along some dimensions) trades input size for
channels per tap, the quantity cuDNN's tensor-core kernels are efficient in:

    fold     x2 channels                 kernel           x2 size (7^3 stem, vs x)
    none     8 Cin                       (q_d, q_h, q_w)  ~1x
    "w"      8 Cin q_w                   (q_d, q_h, 1)    ~4.5x
    "hw"     8 Cin q_h q_w               (q_d, 1, 1)      ~17x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import compiled

__all__ = ["stem_conv3d", "stem_rewrite", "stem_rewrite_input", "is_stem_like"]


def is_stem_like(weight: torch.Tensor, stride, padding, dilation) -> bool:
    """True for the convolutions this rewrite helps: few input channels, stride 2, odd kernel."""
    s, d = _triple(stride), _triple(dilation)  # (any padding: the rewrite pads itself)
    return (weight.dim() == 5 and weight.shape[1] <= 4 and s == (2, 2, 2) and d == (1, 1, 1)
            and all(k >= 3 for k in weight.shape[2:]))


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def fold_level(fold_w: bool = False, fold_hw: bool = False) -> int:
    """The number of trailing dimensions whose taps are folded into channels: 0, 1 (W) or 2
    (H and W); ``fold_hw`` implies the W fold."""
    return 2 if fold_hw else 1 if fold_w else 0


def stem_rewrite(x: torch.Tensor, weight: torch.Tensor, padding=3, channels_last=None,
                 fold_w: bool = False, fold_hw: bool = False):
    """Return ``(x2, w2)`` with ``conv3d(x2, w2) == conv3d(x, weight, stride=2, padding=padding)``.

    x (N, Cin, D, H, W) -> x2 (N, 8*Cin, Do+q_d-1, ...); weight (Cout, Cin, kd, kh, kw) ->
    w2 (Cout, 8*Cin, ceil(kd/2), ceil(kh/2), ceil(kw/2)); stride 1, no padding. Both come out
    channels_last_3d when ``channels_last`` is True (cuDNN's tensor-core layout), contiguous when
    False, and in x's layout when None.

    ``fold_w``: also move the W taps into channels (an im2col along one dimension):
    x2 (N, 8*Cin*q_w, Do+q_d-1, Ho+q_h-1, Wo), w2 (Cout, 8*Cin*q_w, q_d, q_h, 1), channel
    ((c*2 + phase_d)*2 + phase_h)*2q_w + l for W tap l of the 2q_w (both phases) at stride 2.
    The input grows q_w-fold (4x for the 7^3 stem) but every tap then reads 32*Cin channels,
    not 8*Cin: 16-byte (bf16) rows of 8 channels are the smallest a tensor-core kernel takes,
    and cuDNN's best kernel for them measured 1.3 ms for the ResNet stem on an H200 (see
    fused.py).

    ``fold_hw``: the H taps folded too: x2 (N, 8*Cin*q_h*q_w, Do+q_d-1, Ho, Wo), w2 (Cout,
    8*Cin*q_h*q_w, q_d, 1, 1), channel ((c*2 + phase_d)*2q_h + m)*2q_w + l for H tap m and W
    tap l (both phases each): a one-dimensional convolution along D with 128*Cin channels per
    tap for the 7^3 stem, the channel count of an ordinary ResNet layer, for ~4x fold_w's input.
    """
    fold = fold_level(fold_w, fold_hw)
    x2 = stem_rewrite_input(x, weight.shape[2:], padding, channels_last, fold_w, fold_hw)
    ks = weight.shape[2:]
    q = [(k + 1) // 2 for k in ks]  # taps per phase
    cout, cin = weight.shape[:2]
    wp = F.pad(weight, (0, 2 * q[2] - ks[2], 0, 2 * q[1] - ks[1], 0, 2 * q[0] - ks[0]))
    if fold == 2:  # w2[o, ((c*2 + pd)*2q_h + m)*2q_w + l, a, 0, 0] = wp[o, c, 2a + pd, m, l]
        w2 = wp.reshape(cout, cin, q[0], 2, 2 * q[1], 2 * q[2]).permute(0, 1, 3, 4, 5, 2)
        w2 = w2.reshape(cout, cin * 8 * q[1] * q[2], q[0], 1, 1)
    elif fold == 1:  # w2[o, ((c*2 + pd)*2 + ph)*2q_w + l, a, b, 0] = wp[o, c, 2a + pd, 2b + ph, l]
        w2 = wp.reshape(cout, cin, q[0], 2, q[1], 2, 2 * q[2]).permute(0, 1, 3, 5, 6, 2, 4)
        w2 = w2.reshape(cout, cin * 8 * q[2], q[0], q[1]).unsqueeze(-1)
    else:
        w2 = wp.reshape(cout, cin, q[0], 2, q[1], 2, q[2], 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        w2 = w2.reshape(cout, cin * 8, q[0], q[1], q[2])
    if _channels_last(x, channels_last):
        w2 = w2.contiguous(memory_format=torch.channels_last_3d)
    return x2, w2


def _channels_last(x, channels_last):
    """stem_rewrite's layout: as asked, or x's (any Cin=1 tensor counts as channels_last_3d)."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) if channels_last is None \
        else channels_last


def stem_rewrite_input(x: torch.Tensor, kernel_size, padding=3, channels_last=None,
                       fold_w: bool = False, fold_hw: bool = False) -> torch.Tensor:
    """The input half of :func:`stem_rewrite` (``kernel_size``: the weight's three sizes): a
    pure rearrangement of x, so the same call gives the same tensor bit for bit (what lets a
    fused stem rebuild it in backward instead of keeping it)."""
    fold = fold_level(fold_w, fold_hw)
    n, cin = x.shape[:2]
    ks = tuple(kernel_size)
    pads = _triple(padding)
    q = [(k + 1) // 2 for k in ks]  # taps per phase
    out = [(size + 2 * p - k) // 2 + 1 for size, p, k in zip(x.shape[2:], pads, ks)]
    L = [(o + qq - 1) for o, qq in zip(out, q)]
    channels_last = _channels_last(x, channels_last)
    if fold and channels_last:
        x2 = _fold_by_im2col(x, q, pads, L, out, fold)
        if x2 is not None:
            return x2
    # padded length per dim: 2 * (out + q - 1) covers every tap of every output
    right = [2 * (o + qq - 1) - size - p for o, qq, size, p in zip(out, q, x.shape[2:], pads)]
    # F.pad takes (W_left, W_right, H_left, H_right, D_left, D_right); negative crops.
    xp = F.pad(x, (pads[2], right[2], pads[1], right[1], pads[0], right[0]))
    if fold == 2:
        # (N, C, L_d, 2, out_h, out_w, 2q_h, 2q_w): the H and W windows of 2q taps at stride 2,
        # a view; channel ((c*2 + pd)*2q_h + m)*2q_w + l, one copy into either layout
        x2 = xp.reshape(n, cin, L[0], 2, 2 * L[1], 2 * L[2]).unfold(4, 2 * q[1], 2)
        x2 = x2.unfold(5, 2 * q[2], 2)
        k = cin * 8 * q[1] * q[2]
        if channels_last:
            x2 = x2.permute(0, 2, 4, 5, 1, 3, 6, 7).reshape(n, L[0], out[1], out[2], k)
            return x2.permute(0, 4, 1, 2, 3)
        return x2.permute(0, 1, 3, 6, 7, 2, 4, 5).reshape(n, k, L[0], out[1], out[2])
    if fold == 1:
        # (N, C, L_d, 2, L_h, 2, out_w, 2q_w): the W windows of 2q_w taps at stride 2, a view;
        # channel ((c*2 + pd)*2 + ph)*2q_w + l, one copy into either layout
        x2 = xp.reshape(n, cin, L[0], 2, L[1], 2, 2 * L[2]).unfold(6, 2 * q[2], 2)
        k = cin * 8 * q[2]
        if channels_last:
            x2 = x2.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, L[0], L[1], out[2], k)
            return x2.permute(0, 4, 1, 2, 3)
        return x2.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, k, L[0], L[1], out[2])
    # (N, C, L_d, 2, L_h, 2, L_w, 2): channel index c*8 + phase, one copy into either layout
    x2 = xp.reshape(n, cin, L[0], 2, L[1], 2, L[2], 2)
    if channels_last:
        x2 = x2.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, L[0], L[1], L[2], cin * 8)
        return x2.permute(0, 4, 1, 2, 3)
    return x2.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, cin * 8, L[0], L[1], L[2])


_IM2COL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _needs_derivative(x) -> bool:
    """x carries a derivative that the ATen ops propagate and im2col3d would drop: backward
    (requires_grad under grad mode), forward AD (a dual tensor) or torch.func's transforms (a
    wrapped tensor: jvp, grad, vmap)."""
    if x.requires_grad and torch.is_grad_enabled():
        return True
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    return torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def _fold_by_im2col(x, q, pads, L, out, fold):
    """The channels_last folded input (``fold``: fold_level's) in one pass (the extension's
    im2col3d), or None where it does not apply. fold_w's channels ((c*2 + pd)*2 + ph)*2q_w + l
    are the columns of an im2col with a (2, 2, 2q_w) kernel at stride 2, and its (L_d, L_h,
    out_w) positions that im2col's rows where the padded sizes are even (the usual case; odd
    ones keep the ATen ops); fold_hw's likewise with a (2, 2q_h, 2q_w) kernel and (L_d, out_h,
    out_w) positions. One kernel
    that reads x once, instead of the pad, the rearrangement and the fold (three copies of
    the input's size or more). Values are moved, not computed: the same tensor bit for bit.
    Without autograd (the stem's input is an image, not a parameter); with a gradient to
    compute, the ATen ops."""
    op = compiled("im2col3d")
    # Under torch.compile, the ATen ops: Dynamo cannot trace functorch's wrapped-tensor check
    # (a graph break in every compiled fused stem: the ResNet-10 compiled training step took
    # 22.4 ms instead of ~7 on an H200), the compiler handles torch.func's transforms itself,
    # and Inductor fuses the pad and the copies into one generated kernel.
    if (op is None or torch.compiler.is_compiling() or x.dtype not in _IM2COL_DTYPES
            or _needs_derivative(x)):
        return None
    kernel = (2, 2 * q[1] if fold == 2 else 2, 2 * q[2])
    want = [L[0], out[1] if fold == 2 else L[1], out[2]]
    grid = [(size + 2 * p - k) // 2 + 1 for size, p, k in zip(x.shape[2:], pads, kernel)]
    if grid != want or min(grid) <= 0:  # (an empty grid: the ATen ops' error)
        return None
    cols = op(x, list(kernel), [2, 2, 2], list(pads), [1, 1, 1], 1, 0, -1)
    return cols.view(x.shape[0], *want, cols.shape[1]).permute(0, 4, 1, 2, 3)


def stem_conv3d(x: torch.Tensor, weight: torch.Tensor, bias=None, *, padding=3,
                fold_w: bool = False, fold_hw: bool = False) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride=2, padding=padding)`` through the stride-1 rewrite.

    Args:
        x: (N, Cin, D, H, W), any float dtype, contiguous or channels_last_3d.
        weight: (Cout, Cin, kd, kh, kw), odd or even kernel sizes.
        fold_w: the variant with the W taps folded into channels (see :func:`stem_rewrite`).
        fold_hw: the variant with the H and W taps folded into channels.
    Returns:
        (N, Cout, Do, Ho, Wo), the same values as the direct convolution up to summation order.
    """
    if x.dim() != 5 or weight.dim() != 5:
        raise ValueError(f"stem_conv3d: x and weight must be 5-D, got x {tuple(x.shape)} and "
                         f"weight {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"stem_conv3d: x has {x.shape[1]} channels but weight expects "
                         f"{weight.shape[1]} (weight {tuple(weight.shape)})")
    pads = _triple(padding)
    if len(pads) != 3 or not all(type(p) is int and p >= 0 for p in pads):
        # a negative one cropped the input silently; two values were a bare IndexError
        raise ValueError(f"stem_conv3d: padding must be an int >= 0 or 3 of them, got "
                         f"{padding!r}")
    small = [s + 2 * p < k for s, p, k in zip(x.shape[2:], pads, weight.shape[2:])]
    if any(small):  # said for the caller's kernel, not the rewritten one's
        raise ValueError(f"stem_conv3d: x's spatial size {tuple(x.shape[2:])} padded by "
                         f"{pads} is smaller than the kernel {tuple(weight.shape[2:])}")
    x2, w2 = stem_rewrite(x, weight, pads, fold_w=fold_w, fold_hw=fold_hw)
    return F.conv3d(x2, w2, bias)
