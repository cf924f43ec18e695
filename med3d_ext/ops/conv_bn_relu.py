"""``conv_bn_relu3d``: fused conv3d + BatchNorm + ReLU (+ residual), its inference twin
``conv_bias_relu3d`` (csrc/conv_bn_relu/conv_bn_relu.h), and the stem's
``conv_bn_relu_maxpool3d`` with the max-pool fused too (csrc/conv_bn_relu/bn_relu_pool.h).

The convolution runs on ATen (cuDNN on CUDA), or for the few-channel stem as one GEMM over its
input windows (STEM_CONV below); the statistics, the normalise + residual + ReLU
epilogue and the BatchNorm/ReLU backward are our kernels, one pass each. Backward saves only the
conv input, the conv output ``y`` and the per-channel mean/invstd: the normalised activation and
the ReLU mask are recomputed from ``y`` (the memory-saving mode; it is the only mode). A layer
with a residual and a ReLU keeps its output instead of the residual and reads the mask from its
sign (the output is the block's, which the next block keeps anyway).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import re
from typing import Optional, Sequence, Union

import torch

from .. import reference
from .._args import int_arg
from ._common import (check_bool, check_real, check_same_device, check_tensor, compiled,
                      register_fake)
from ._running_stats import update_running_stats
from .stem import stem_rewrite, stem_rewrite_input

__all__ = ["conv_bn_relu3d", "conv_bias_relu3d", "conv_bn_relu_maxpool3d", "im2col_chunk_bytes"]

IntOr3 = Union[int, Sequence[int]]


def _triple(v: IntOr3, name: str, op: str = "conv_bn_relu3d") -> list[int]:
    if isinstance(v, int):
        return [v, v, v]
    if (type(v) is tuple and len(v) == 3 and type(v[0]) is int and type(v[1]) is int
            and type(v[2]) is int):  # unrolled: a generator here cost ~1 us per argument
        return list(v)  # nn.Conv3d's own stride/padding/dilation: the per-layer fast path
    try:  # operator.index: a float (1.5) is refused, not truncated; an int tensor is taken
        if isinstance(v, torch.Tensor) and v.dim() == 0 or not isinstance(v, (Sequence, torch.Tensor)):
            return [operator.index(v)] * 3
        v = [operator.index(a) for a in v]
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or 3 ints, got {v!r}") from None
    if len(v) == 1:
        return v * 3
    if len(v) != 3:
        raise ValueError(f"{op}: {name} must be an int or 3 ints, got {v}")
    return v


def _autocast(x, weight, residual, bias_like):
    """Cast like conv3d under autocast: x, weight (and the residual) to the autocast dtype;
    BatchNorm parameters / the folded bias stay fp32."""
    x, wdt, residual, bias_like = _autocast_args(x, residual, bias_like)
    return x, weight if wdt is None else weight.to(wdt), residual, bias_like


def _autocast_args(x, residual, bias_like):
    """:func:`_autocast` without the weight: returns (x, the dtype the weight must be cast to
    or None, residual, bias_like)."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return x, None, residual, bias_like
    dt = torch.get_autocast_dtype(dev)
    x = x.to(dt)
    if residual is not None:
        residual = residual.to(dt)
    bias_like = [b.float() if b is not None and b.dtype != torch.float64 else b for b in bias_like]
    return x, dt, residual, bias_like


def _cast_weight(weight, dt):
    """The convolution weight for conv_bn_relu3d under autocast (``dt``: _autocast_args').

    An fp32 weight with a bf16/fp16 input is left to the op's C++ autograd, which casts it for
    the convolution and keeps the fp32 parameter for backward (casting it again there) instead
    of keeping a cast copy: a ResNet-50 step then holds no second copy of its weights until
    backward (88 MiB in bf16; CPU memory timeline of the step). Cast here wherever that C++
    kernel does not run first: under torch.compile (its graph casts as autocast does), in
    inference mode or for a weight made there (no autograd dispatch), or when grad is off
    (nothing is kept anyway)."""
    if dt is None or weight.dtype == dt:
        return weight
    if torch.compiler.is_compiling():
        # asked first: Dynamo cannot trace the inference-mode checks below (a graph break at
        # every fused layer of a compiled autocast model, seen on an H200)
        return weight.to(dt)
    if (weight.dtype == torch.float32 and dt in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and not weight.is_inference()):
        return weight  # a normal tensor argument: the op's autograd kernel runs, and casts
    return weight.to(dt)


# The MedicalNet stem (Cin = 1, 7^3 kernel, stride 2) falls to a slow generic cuDNN kernel
# (3.3 ms forward + 1.6 ms weight gradient per step in bf16 on an H200). STEM_CONV picks how a
# stem-like convolution (Cin <= 4, every kernel dim >= 3, stride 2, dilation 1) runs instead:
#   "im2col": the op builds the (N*D'*H'*W', Cin*kD*kH*kW) matrix of input windows
#       (csrc/conv_bn_relu/im2col.h) and runs the convolution as one GEMM (cuBLAS), and its
#       weight gradient as the transposed GEMM over the same matrix built again; the matrix is
#       never kept for backward.
#   "space_to_depth": the exact rewrite as a stride-1 convolution with 8*Cin channels and a 4^3
#       kernel, which cuDNN runs on tensor cores (med3d_ext/ops/stem.py); it measured 1.3 ms for
#       the forward on an H200.
#   "space_to_depth_fold_w": the same with the W taps folded into channels too (32*Cin).
#   "space_to_depth_fold_hw": the H taps folded as well (128*Cin channels, a (4, 1, 1) kernel):
#       an ordinary layer's channel count for cuDNN, for an input ~4x fold_w's (293 MB in
#       bf16 at the shape below). Not yet timed on a GPU (bm_stem has its rows).
#   "implicit_gemm": "im2col"'s two GEMMs with the columns gathered tile by tile into shared
#       memory and multiplied there on tensor cores, never written out
#       (csrc/conv_bn_relu/stem_gemm.h: CUDA bf16/fp16 with Cout a multiple of 64; other cases
#       and the CPU run "im2col"'s GEMMs).
#   "aten": unchanged, the ATen convolution.
#   "auto" (default): auto_stem_conv(device): "space_to_depth_fold_w" on CUDA, measured
#       fastest side by side (H200, bf16 channels_last_3d, 8 x 1 x 64 x 128 x 128, forward +
#       weight gradient; benchmarks/results/2026-11-26_h200-s9): conv alone 0.85 ms against
#       1.49 (im2col), 1.96 (space_to_depth), 2.35 (implicit_gemm) and 5.29 (cuDNN direct);
#       conv + BN + ReLU 1.34 ms against 2.02 / 2.42 / 2.77. (The implicit GEMM had been the
#       default on the expectation from its memory traffic; its weight-gradient kernel was the
#       costliest kernel of the fused ResNet-50 step.) "aten" on the CPU, where oneDNN's
#       direct convolution measured faster than the rewrites (2-core CPU, the stem benchmark).
# The environment variable MED3D_EXT_STEM_CONV sets the initial value (e.g. for a whole
# benchmark run).
STEM_CONV = os.environ.get("MED3D_EXT_STEM_CONV", "auto")
_STEM_CONVS = ("auto", "im2col", "implicit_gemm", "space_to_depth", "space_to_depth_fold_w",
               "space_to_depth_fold_hw", "aten")
if STEM_CONV not in _STEM_CONVS:
    # said at import, naming the variable (it failed at the first stem convolution, with a
    # traceback naming the Python attribute); import med3d_ext must still work
    import warnings

    warnings.warn(f"environment variable MED3D_EXT_STEM_CONV={STEM_CONV!r} is not one of "
                  f"{', '.join(_STEM_CONVS)}; using 'auto'", stacklevel=2)
    STEM_CONV = "auto"
# the ops' conv_algo (csrc/conv_bn_relu/conv_bn_relu.h, ConvAlgo)
_CONV_ALGO = {"aten": 0, "im2col": 1, "implicit_gemm": 2}


def _is_stem_like(x, weight, stride, padding, dilation) -> bool:
    return (x.dim() == 5 and weight.dim() == 5
            and x.shape[1] == weight.shape[1] and weight.shape[1] <= 4
            and stride == [2, 2, 2] and dilation == [1, 1, 1]
            and all(k >= 3 for k in weight.shape[2:])
            and all(x.shape[2 + i] + 2 * padding[i] >= weight.shape[2 + i] for i in range(3)))


def auto_stem_conv(device_type: str) -> str:
    """The stem algorithm STEM_CONV = "auto" picks on a device type ("cuda", "cpu", ...)."""
    return "space_to_depth_fold_w" if device_type == "cuda" else "aten"


def _stem_conv(x, weight, stride, padding, dilation) -> str:
    """The STEM_CONV algorithm this convolution gets: "aten" unless it is stem-like."""
    algo = STEM_CONV
    if algo not in _STEM_CONVS:
        raise ValueError(f"med3d_ext.ops.conv_bn_relu.STEM_CONV must be one of {_STEM_CONVS}, "
                         f"got {algo!r}")
    if algo == "auto":
        algo = auto_stem_conv(x.device.type)
    if algo == "aten" or not _is_stem_like(x, weight, stride, padding, dilation):
        return "aten"
    return algo


_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
               "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(text: str) -> Optional[int]:
    """A positive byte count: an integer with an optional binary unit (``"33554432"``,
    ``"32MB"``, ``"32 MiB"``, ``"1g"``), or None when ``text`` is not one."""
    m = re.fullmatch(r"\s*(\d+)\s*(b|[kmg]i?b?)?\s*", str(text), re.IGNORECASE)
    if m is None:
        return None
    n = int(m.group(1)) * _BYTE_UNITS[(m.group(2) or "").lower()]
    return n if n > 0 else None


def _chunk_bytes_from_environment() -> None:
    """MED3D_EXT_IM2COL_CHUNK_BYTES, read here rather than by the extension's atoll(), which
    read "32MB" as 32 bytes and "abc" as the default, silently."""
    text = os.environ.get("MED3D_EXT_IM2COL_CHUNK_BYTES")
    from .. import _extension

    if text is None or not _extension.available():
        return
    n = parse_bytes(text)
    if n is None:
        import warnings

        warnings.warn(f"environment variable MED3D_EXT_IM2COL_CHUNK_BYTES={text!r} is not a "
                      "positive byte count (e.g. 33554432, 32MB, 1GiB); using 1 GiB",
                      stacklevel=2)
        n = 2**30
    _extension._C.set_im2col_chunk_bytes(n)


def im2col_chunk_bytes(n: Optional[int] = None) -> int:
    """The "im2col" stem's chunk size: its column matrix is built and multiplied in chunks of
    rows of at most this many bytes (default 1 GiB: one chunk for the training stem, 721 MB in
    bf16 at 8 x 1 x 64 x 128 x 128; whole-volume inference stays within memory). With ``n``,
    sets it first (a process-wide setting, like the torch.backends flags; the environment
    variable MED3D_EXT_IM2COL_CHUNK_BYTES gives the initial value). Returns the size in effect,
    or 0 without the compiled extension."""
    from .. import _extension

    if not _extension.available():
        return 0
    if n is not None:
        # 1.5 is a TypeError (and a ValueError, as before); 0 a ValueError
        n = int_arg("im2col_chunk_bytes: n must be a positive int of bytes", n, 1)
        _extension._C.set_im2col_chunk_bytes(n)
    return int(_extension._C.im2col_chunk_bytes())


def _fold_flags(algo: str) -> dict:
    """stem_rewrite's fold arguments for a space-to-depth STEM_CONV algorithm."""
    return {"fold_w": algo == "space_to_depth_fold_w", "fold_hw": algo == "space_to_depth_fold_hw"}


def _prepare_conv(x, weight, stride, padding, dilation):
    """(x, weight, stride, padding, conv_algo) for the op: the stem's algorithm applied."""
    algo = _stem_conv(x, weight, stride, padding, dilation)
    if algo.startswith("space_to_depth"):
        x, weight = stem_rewrite(x, weight, padding, channels_last=True, **_fold_flags(algo))
        return x, weight, [1, 1, 1], [0, 0, 0], _CONV_ALGO["aten"]
    return x, weight, stride, padding, _CONV_ALGO[algo]


def _check_batch_size(x, weight, stride, padding, dilation):
    """F.batch_norm's error (a ValueError) for one value per channel in training; shapes that
    are invalid for the convolution are left to the op's own, more specific check."""
    if min(stride) <= 0 or min(dilation) <= 0:
        return  # the op's argument check names them
    shape = [x.shape[0], weight.shape[0]]
    for i in range(3):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        shape.append((x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1)
    n = shape[0]
    for s in shape[2:]:
        n *= s
    if all(s > 0 for s in shape[2:]) and n == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")


def _check_bn_args(name, x, weight, training, momentum, eps) -> None:
    """The argument types both BatchNorm ops check first, each named."""
    check_tensor(name, "x", x)
    check_tensor(name, "weight", weight)
    check_bool(name, "training", training)
    if momentum is None:
        raise ValueError(f"med3d_ext.{name}: momentum=None (cumulative average) is handled by "
                         "ConvBNReLU3d / the fused modules; pass 1/num_batches_tracked instead")
    check_real(name, "momentum", momentum)
    check_real(name, "eps", eps)


def _prepare_bn_call(name, x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                     padding, dilation, training, eps):
    """What the BatchNorm ops' wrappers do before calling the compiled op: the eval-mode
    running-stats check, default affine parameters, F.batch_norm's one-value error, and the
    stem's algorithm (_prepare_conv). Returns (x, weight, bn_weight, bn_bias, stride, padding,
    conv_algo)."""
    if (running_mean is None) != (running_var is None):  # F.batch_norm's rule: else only one
        # of the pair would be updated
        raise ValueError(f"med3d_ext.{name}: running_mean and running_var must either both be "
                         "None or neither be None")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{name}: running_mean and running_var are required when "
                         "training=False")
    if training and not eps > 0:  # F.batch_norm's ValueError (the op's own check is C++'s)
        raise ValueError(f"med3d_ext.{name}: argument 'eps' must be positive when training, "
                         f"got {eps}")
    if not eps >= 0:  # eval: a negative eps gave inf where F.batch_norm refuses it
        raise ValueError(f"med3d_ext.{name}: argument 'eps' must be non-negative, got {eps}")
    cout = weight.shape[0] if weight.dim() == 5 else 0
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bn_weight is None:
        bn_weight = torch.ones(cout, dtype=pdt, device=x.device)
    if bn_bias is None:
        bn_bias = torch.zeros(cout, dtype=pdt, device=x.device)
    if training and x.dim() == 5 and weight.dim() == 5 and x.shape[0] == 1:  # N > 1: never 1 value
        _check_batch_size(x, weight, stride, padding, dilation)
    x, weight, stride, padding, conv_algo = _prepare_conv(x, weight, stride, padding, dilation)
    return x, weight, bn_weight, bn_bias, stride, padding, conv_algo


def conv_bn_relu3d(x: torch.Tensor, weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
                   bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                   running_var: Optional[torch.Tensor], *, stride: IntOr3 = 1,
                   padding: IntOr3 = 0, dilation: IntOr3 = 1, training: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5,
                   residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """``relu(batch_norm(conv3d(x, weight, None, stride, padding, dilation)) [+ residual])``.

    Args:
        x: (N, Cin, D, H, W) float32/bfloat16/float16/float64, contiguous or channels_last_3d.
        weight: (Cout, Cin, kD, kH, kW), x's dtype (groups = 1, no conv bias).
        bn_weight, bn_bias: (Cout,) BatchNorm affine parameters, or None (1 and 0).
        running_mean, running_var: (Cout,) buffers. When ``training`` they are updated in place
            exactly as ``F.batch_norm`` does (the variance with the unbiased batch variance);
            may be None when training. Required in eval mode, where they normalise.
        stride, padding, dilation: int or 3 ints.
        training: batch statistics (True) or running statistics (False).
        momentum: running-stat update factor (for BatchNorm's cumulative average,
            ``momentum=None``, pass ``1 / num_batches_tracked`` as the module does).
        residual: optional (N, Cout, D', H', W') added after BatchNorm, before the ReLU; any
            floating dtype, cast to the output's (x's) dtype, so unlike ``out + residual`` a
            residual of a wider dtype does not promote the output.
        relu: apply the ReLU.

    Returns:
        (N, Cout, D', H', W') in the conv dtype; channels_last_3d when x or weight is, and
        also when a stem-like convolution runs through a space-to-depth rewrite (STEM_CONV;
        the CUDA default), which is done in channels_last_3d for cuDNN's tensor cores.
        Differentiable with respect to x, weight, bn_weight, bn_bias and residual.
        Under autocast, x, weight and residual are cast as conv3d would be; BatchNorm math is
        fp32 whatever the dtype.
    """
    return _conv_bn_relu3d(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                           padding, dilation, training, momentum, eps, residual, relu)[0]


def _conv_bn_relu3d(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                    dilation, training, momentum, eps, residual, relu):
    """conv_bn_relu3d's work; returns ``(out, recipe)``, where ``recipe`` (for a ReLU layer
    without residual, on the compiled op; else None) is the ``bn_act`` arguments that give
    ``out`` again bit for bit: (y, mean, invstd, bn_weight, bn_bias)."""
    _check_bn_args("conv_bn_relu3d", x, weight, training, momentum, eps)
    check_bool("conv_bn_relu3d", "relu", relu)
    stride, padding, dilation = (_triple(stride, "stride"), _triple(padding, "padding"),
                                 _triple(dilation, "dilation"))
    x, wdt, residual, (bn_weight, bn_bias) = _autocast_args(x, residual, [bn_weight, bn_bias])
    op = compiled("conv_bn_relu3d")
    weight = weight.to(wdt) if op is None and wdt is not None else weight
    if op is None:
        out = reference.conv_bn_relu3d(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, dilation=dilation, training=bool(training), momentum=momentum,
            eps=eps, residual=_residual_like(residual, x), relu=bool(relu))
        return _detach_saved_output(out, relu), None
    x, weight, bn_weight, bn_bias, stride, padding, algo = _prepare_bn_call(
        "conv_bn_relu3d", x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
        padding, dilation, training, eps)
    weight = _cast_weight(weight, wdt)
    out, y, mean, invstd, var = op(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                   residual, stride, padding, dilation, training, eps, relu,
                                   algo)
    if training and running_mean is not None and out.numel() > 0:
        update_running_stats(running_mean, running_var, mean, var, momentum)
    recipe = (y, mean, invstd, bn_weight, bn_bias) if relu and residual is None else None
    return out, recipe


def _residual_like(residual, x):
    """The reference fallback's residual, cast to the output's dtype as the op does (a float64
    residual promoted the fallback's output to float64)."""
    return residual if residual is None or residual.dtype == x.dtype else residual.to(x.dtype)


def _detach_saved_output(out, relu):
    """The reference fallback's output, safe for a following in-place op: its ReLU saved its
    output for backward, so a model's ``nn.ReLU(inplace=True)`` after the fused stem (MedicalNet
    applies one, idempotent on our non-negative output) broke backward ("modified by an inplace
    operation"). The compiled op saves the pre-BatchNorm tensor instead; here a copy does."""
    return out.clone() if relu and out.requires_grad else out


def conv_bn_relu_maxpool3d(x: torch.Tensor, weight: torch.Tensor,
                           bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                           running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], *, stride: IntOr3 = 1,
                           padding: IntOr3 = 0, dilation: IntOr3 = 1, training: bool = True,
                           momentum: float = 0.1, eps: float = 1e-5, pool_kernel: IntOr3 = 3,
                           pool_stride: Optional[IntOr3] = 2,
                           pool_padding: IntOr3 = 1) -> torch.Tensor:
    """``max_pool3d(relu(batch_norm(conv3d(x, weight))), pool_kernel, pool_stride,
    pool_padding)``: MedicalNet's stem (conv1, bn1, relu, maxpool) in one op.

    Arguments as :func:`conv_bn_relu3d` (no residual; the ReLU is always on), plus the max-pool's
    kernel, stride and padding (dilation 1, floor mode, windows of at most 255 voxels). The
    normalised full-resolution activation is never written: the pool reads the conv output, and
    the backward gathers each voxel's gradient from the windows whose maximum it was (a uint8
    argmax per pooled voxel). Returns the pooled (N, Cout, D'', H'', W''), channels_last_3d when
    x or weight is (or when the stem runs through a space-to-depth rewrite, as
    :func:`conv_bn_relu3d`); differentiable with respect to x, weight, bn_weight and bn_bias.
    """
    return _conv_bn_relu_maxpool3d(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                   stride, padding, dilation, training, momentum, eps,
                                   pool_kernel, pool_stride, pool_padding)


def _conv_bn_relu_maxpool3d(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                            padding, dilation, training, momentum, eps, pool_kernel, pool_stride,
                            pool_padding, keep_input=None):
    """conv_bn_relu_maxpool3d's work. ``keep_input(x_op, y_shape, rebuild, conv, x, w_op)``
    (med3d_ext.nn's memory-saving mode, for an input that needs no gradient and an ATen
    convolution): a context for the op call in which the two large tensors the op keeps for
    backward may be kept as functions of the caller's ``x`` instead: the convolution input
    ``x_op`` (autocast's cast, and the space-to-depth rewrite that is 4.5x x's bf16 size with
    the W taps folded) as ``rebuild(x)``, bit for bit, and the pre-BatchNorm output y (shape
    ``y_shape``; 128 MiB in the perf-baselines ResNet step) as ``conv(x, w_op)``, one more
    stem convolution in backward."""
    x_in = x
    _check_bn_args("conv_bn_relu_maxpool3d", x, weight, training, momentum, eps)
    op_name = "conv_bn_relu_maxpool3d"
    stride, padding, dilation = (_triple(stride, "stride", op_name),
                                 _triple(padding, "padding", op_name),
                                 _triple(dilation, "dilation", op_name))
    # pool_stride None: the kernel's size, as F.max_pool3d takes it
    pk = _triple(pool_kernel, "pool_kernel", op_name)
    ps = pk if pool_stride is None else _triple(pool_stride, "pool_stride", op_name)
    pp = _triple(pool_padding, "pool_padding", op_name)
    x, weight, _, (bn_weight, bn_bias) = _autocast(x, weight, None, [bn_weight, bn_bias])
    op = compiled("conv_bn_relu_maxpool3d")
    if op is None:
        return reference.conv_bn_relu_maxpool3d(
            x, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
            padding=padding, dilation=dilation, training=bool(training), momentum=momentum,
            eps=eps, pool_kernel=pk, pool_stride=ps, pool_padding=pp)
    rebuild = None
    if keep_input is not None and not x_in.requires_grad and not x_in.is_inference():
        # what _autocast and _prepare_conv make of the caller's x, as a function of it
        rebuild = functools.partial(_rebuild_stem_input, x.dtype, tuple(weight.shape[2:]),
                                    padding, _stem_conv(x, weight, stride, padding, dilation))
    x, weight, bn_weight, bn_bias, stride, padding, algo = _prepare_bn_call(
        "conv_bn_relu_maxpool3d", x, weight, bn_weight, bn_bias, running_mean, running_var,
        stride, padding, dilation, training, eps)
    ctx = contextlib.nullcontext()
    if rebuild is not None and algo == _CONV_ALGO["aten"]:  # the GEMM stems' y is not aten's
        ctx = keep_input(x, tuple(_out_shape(x, weight, stride, padding, dilation)), rebuild,
                         functools.partial(_stem_conv_again, rebuild, stride, padding, dilation),
                         x_in, weight)
    with ctx:
        out, _y, mean, _invstd, var, _arg = op(x, weight, bn_weight, bn_bias, running_mean,
                                               running_var, stride, padding, dilation,
                                               training, eps, pk, ps, pp, algo)
    if training and running_mean is not None and out.numel() > 0:
        update_running_stats(running_mean, running_var, mean, var, momentum)
    return out


def _rebuild_stem_input(dtype, kernel_size, padding, algo, x):
    """The convolution input conv_bn_relu_maxpool3d made from the caller's ``x``: autocast's
    cast, then for a space-to-depth ``algo`` (_stem_conv's) the rearrangement; the same ops on
    the same values, bit for bit."""
    x = x.to(dtype)
    if not algo.startswith("space_to_depth"):
        return x
    return stem_rewrite_input(x, kernel_size, padding, channels_last=True, **_fold_flags(algo))


def _stem_conv_again(rebuild, stride, padding, dilation, x, weight):
    """The stem's pre-BatchNorm output y from the caller's ``x`` and the weight the op ran
    with: the ATen convolution the op's forward calls (csrc/conv_bn_relu/conv3d.cpp), with
    autocast off as inside the op."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.ops.aten.convolution(rebuild(x), weight, None, stride, padding, dilation,
                                          False, [0, 0, 0], 1)


def conv_bias_relu3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                     stride: IntOr3 = 1, padding: IntOr3 = 0, dilation: IntOr3 = 1,
                     residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
    """``relu(conv3d(x, weight, bias, stride, padding, dilation) [+ residual])``: the epilogue of
    a convolution with BatchNorm folded in (``med3d_ext.nn.fold_bn``). Shapes as in
    :func:`conv_bn_relu3d`; ``bias`` (Cout,) or None, kept fp32 under autocast. Differentiable."""
    check_tensor("conv_bias_relu3d", "x", x)
    check_tensor("conv_bias_relu3d", "weight", weight)
    check_bool("conv_bias_relu3d", "relu", relu)
    stride, padding, dilation = (_triple(stride, "stride", "conv_bias_relu3d"),
                                 _triple(padding, "padding", "conv_bias_relu3d"),
                                 _triple(dilation, "dilation", "conv_bias_relu3d"))
    x, weight, residual, (bias,) = _autocast(x, weight, residual, [bias])
    op = compiled("conv_bias_relu3d")
    if op is None:
        if bias is not None:
            bias = bias.to(x.dtype)
        out = reference.conv_bias_relu3d(x, weight, bias, stride=stride, padding=padding,
                                         dilation=dilation, residual=_residual_like(residual, x),
                                         relu=bool(relu))
        return _detach_saved_output(out, relu)
    x, weight, stride, padding, algo = _prepare_conv(x, weight, stride, padding, dilation)
    out = op(x, weight, bias, residual, stride, padding, dilation, relu, algo)
    # The op's backward reads its ReLU mask from the output it saved: a following in-place op
    # (MedicalNet's nn.ReLU(inplace=True) after the stem, idempotent here) broke backward through
    # a folded model ("modified by an inplace operation"), e.g. for saliency maps. Only when a
    # gradient is wanted, which a folded (inference) model rarely is, does the output get copied.
    return _detach_saved_output(out, relu)


# --------------------------------------------------------------------------- fake kernels


def _is_cl(t: torch.Tensor) -> bool:
    return (t.dim() == 5 and t.shape[1] > 1 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last_3d))


def _prefers_cl(t: torch.Tensor) -> bool:
    """csrc/common/checks.h's prefers_channels_last_3d: the layout a convolution's output takes
    from its input or weight (a one-channel tensor with channel stride 1 counts, as in ATen)."""
    if _is_cl(t):
        return True
    return (t.dim() == 5 and t.shape[1] == 1 and t.stride(1) == 1 and t.numel() > t.shape[0]
            and t.is_contiguous(memory_format=torch.channels_last_3d))


def _out_shape(x, weight, stride, padding, dilation):
    torch._check(x.dim() == 5, lambda: f"conv_bn_relu3d: x must be 5-D, got {tuple(x.shape)}")
    torch._check(weight.dim() == 5, lambda: "conv_bn_relu3d: weight must be 5-D")
    torch._check(min(stride) > 0 and min(dilation) > 0 and min(padding) >= 0, lambda: (
        "conv_bn_relu3d: stride and dilation must be positive and padding non-negative, got "
        f"stride={list(stride)} padding={list(padding)} dilation={list(dilation)}"))
    shape = [x.shape[0], weight.shape[0]]
    for i in range(3):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        shape.append((x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1)
    return shape


def _empty(shape, like, cl):
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_fake("conv_bn_relu3d")
def _conv_bn_relu3d_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                         stride, padding, dilation, training, eps, relu, conv_algo=0):
    check_same_device("conv_bn_relu3d", x, weight=weight, bn_weight=bn_weight, bn_bias=bn_bias,
                      running_mean=running_mean, running_var=running_var, residual=residual)
    out = _empty(_out_shape(x, weight, stride, padding, dilation), x, _prefers_cl(x) or _prefers_cl(weight))
    c = weight.shape[0]
    stats = [x.new_empty((c,), dtype=_acc(x)) for _ in range(3)]
    return (out, torch.empty_like(out), *stats)


@register_fake("bn_act")
def _bn_act_fake(y, mean, invstd, bn_weight, bn_bias, relu):
    check_same_device("bn_act", y, mean=mean, invstd=invstd, bn_weight=bn_weight,
                      bn_bias=bn_bias)
    return _empty(y.shape, y, _is_cl(y))


@register_fake("bn_relu_backward")
def _bn_relu_backward_fake(grad_out, y, mean, invstd, bn_weight, bn_bias, relu_out, training,
                           relu):
    check_same_device("bn_relu_backward", y, grad_out=grad_out, mean=mean, invstd=invstd,
                      bn_weight=bn_weight, bn_bias=bn_bias, relu_out=relu_out)
    cl = _is_cl(y)
    c = y.shape[1]
    grad_r = _empty(y.shape, y, cl) if relu_out is not None else y.new_empty((0,))
    return (_empty(y.shape, y, cl), y.new_empty((c,), dtype=_acc(y)),
            y.new_empty((c,), dtype=_acc(y)), grad_r)


@register_fake("conv_bias_relu3d")
def _conv_bias_relu3d_fake(x, weight, bias, residual, stride, padding, dilation, relu,
                           conv_algo=0):
    check_same_device("conv_bias_relu3d", x, weight=weight, bias=bias, residual=residual)
    return _empty(_out_shape(x, weight, stride, padding, dilation), x, _prefers_cl(x) or _prefers_cl(weight))


def _pool_shape(y_shape, pk, ps, pp):
    return list(y_shape[:2]) + [(y_shape[2 + i] + 2 * pp[i] - pk[i]) // ps[i] + 1 for i in range(3)]


@register_fake("conv_bn_relu_maxpool3d")
def _conv_bn_relu_maxpool3d_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, stride,
                                 padding, dilation, training, eps, pool_kernel, pool_stride,
                                 pool_padding, conv_algo=0):
    check_same_device("conv_bn_relu_maxpool3d", x, weight=weight, bn_weight=bn_weight,
                      bn_bias=bn_bias, running_mean=running_mean, running_var=running_var)
    cl = _prefers_cl(x) or _prefers_cl(weight)
    y = _empty(_out_shape(x, weight, stride, padding, dilation), x, cl)
    shape = _pool_shape(y.shape, pool_kernel, pool_stride, pool_padding)
    out = _empty(shape, x, cl)
    arg = torch.empty(shape, dtype=torch.uint8, device=x.device,
                      memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    c = weight.shape[0]
    stats = [x.new_empty((c,), dtype=_acc(x)) for _ in range(3)]
    return (out, y, *stats, arg)


@register_fake("im2col3d")
def _im2col3d_fake(x, kernel_size, stride, padding, dilation, align=8, row_start=0, rows=-1):
    torch._check(x.dim() == 5, lambda: f"im2col3d: x must be 5-D, got {tuple(x.shape)}")
    out = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1)
           // stride[i] + 1 for i in range(3)]
    k = x.shape[1] * kernel_size[0] * kernel_size[1] * kernel_size[2]
    torch._check(x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
                 lambda: f"im2col3d: x must be floating point, got {x.dtype}")
    m = x.shape[0] * out[0] * out[1] * out[2]
    rows = m - row_start if rows < 0 else rows
    return x.new_empty((rows, (k + align - 1) // align * align))


@register_fake("implicit_gemm_conv3d")
def _implicit_gemm_conv3d_fake(x, weight, stride, padding, dilation):
    check_same_device("implicit_gemm_conv3d", x, weight=weight)
    shape = _out_shape(x, weight, stride, padding, dilation)
    return x.new_empty((shape[0] * shape[2] * shape[3] * shape[4], shape[1]))


@register_fake("implicit_gemm_conv3d_weight_grad")
def _implicit_gemm_conv3d_weight_grad_fake(grad_rows, x, weight_size, stride, padding, dilation):
    check_same_device("implicit_gemm_conv3d_weight_grad", x, grad_rows=grad_rows)
    torch._check(len(weight_size) == 5, lambda: "implicit_gemm_conv3d_weight_grad: weight_size "
                 f"must have 5 values, got {list(weight_size)}")
    return x.new_empty(tuple(weight_size))


@register_fake("bn_relu_maxpool_backward")
def _bn_relu_maxpool_backward_fake(grad_out, y, argmax, mean, invstd, bn_weight, bn_bias,
                                   training, pool_kernel, pool_stride, pool_padding):
    check_same_device("bn_relu_maxpool_backward", y, grad_out=grad_out, argmax=argmax, mean=mean,
                      invstd=invstd, bn_weight=bn_weight, bn_bias=bn_bias)
    c = y.shape[1]
    return (_empty(y.shape, y, _is_cl(y)), y.new_empty((c,), dtype=_acc(y)),
            y.new_empty((c,), dtype=_acc(y)))


# --------------------------------------------------------------------------- autograd
# Registered in C++ for the three ops (csrc/conv_bn_relu/conv_bn_relu_autograd.cpp): host time per
# layer matters at ResNet-50's ~50 fused layers per step.


_chunk_bytes_from_environment()
