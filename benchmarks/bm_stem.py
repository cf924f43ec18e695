"""stem: MedicalNet's conv1 (Cin=1 -> 64, 7^3, stride 2, padding 3), as in the model: forward
plus the weight (and BN affine) gradients; the network input has no grad.

Cases: the conv alone (eager bf16 channels_last_3d vs fp32: the reference anchors of
perf-baselines.md; and each of our stem algorithms, conv_bn_relu.STEM_CONV), conv+BN+ReLU (and
with each STEM_CONV), and conv+BN+ReLU+max-pool (3, stride 2, padding 1), each
med3d_ext ``conv_bn_relu3d`` (+ ``F.max_pool3d``; and the all-in-one ``conv_bn_relu_maxpool3d``)
vs eager and, outside --quick, torch.compile,
checked with the error-ratio rule against the eager stem in high precision (as in conv_bn_relu;
the conv alone compares bf16 with fp32, different precisions, directly: each row with a
tolerance for its dtype, and its speed-up only against the eager row of its dtype and layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bm_conv_bn_relu import FLOORS, Layer
from .common import m3d_attr, op_backend, with_env, with_module_flag

AREA = "stem"
GPU_INPUT = (8, (64, 128, 128))  # batch, spatial: perf-baselines.md's training input


def _conv_alone(x, w, gy, dtype, cl, conv=None):
    """fwd + weight grad of the conv alone, in ``dtype`` (no autocast: the anchor numbers);
    ``conv(x, w)``: the stride-2, padding-3 convolution (default ``F.conv3d``)."""
    mf = torch.channels_last_3d if cl else torch.contiguous_format
    xi, g = x.to(dtype).to(memory_format=mf), gy.to(dtype).to(memory_format=mf)
    wi = w.to(dtype).requires_grad_(True)
    conv = conv or (lambda a, b: F.conv3d(a, b, None, 2, 3))

    def step():
        y = conv(xi, wi)
        (gw,) = torch.autograd.grad(y, [wi], g)
        return y, gw
    return step


def run(ctx):
    if ctx.gpu:
        batch, spatial = GPU_INPUT
    else:
        batch, spatial = 1, ((16, 32, 32) if ctx.quick else (32, 64, 64))
    compile_too = ctx.with_compile or not ctx.quick
    base = {"x": [batch, 1, *spatial], "weight": [64, 1, 7, 7, 7], "stride": 2, "padding": 3,
            "mode": "fwd + weight grad (input without grad)"}
    out_vox = batch * 64 * (spatial[0] // 2) * (spatial[1] // 2) * (spatial[2] // 2)
    flops = 2 * out_vox * 343 * 2  # forward + weight gradient

    # 1. the conv alone: eager anchors (fp32 is the reference; bf16 is checked against it)
    x = torch.randn(batch, 1, *spatial, device=ctx.device)
    w = torch.randn(64, 1, 7, 7, 7, device=ctx.device) * (2 / 343) ** 0.5
    gy = torch.randn(batch, 64, *(s // 2 for s in spatial), device=ctx.device)
    # (no bf16 row runs on the CPU: its params say only what ran)
    dtypes = "fp32 NCDHW / bf16 channels_last_3d" if ctx.gpu else "fp32 NCDHW"
    # the case's tolerance is the bf16 rows' (checked against the fp32 reference); fp32 rows
    # get their own below
    case = ctx.case(AREA, "conv alone", params={**base, "dtypes": dtypes},
                    rtol=3e-2, atol=1e-2, flops=flops)
    # fp32 convolutions on a GPU run TF32 unless torch.backends.cudnn.allow_tf32 is off (its
    # default is on): said beside each fp32 row, which is otherwise read as true fp32
    tf32 = "cuDNN TF32 on" if ctx.gpu and torch.backends.cudnn.allow_tf32 else ""
    # fp32 rows vs the fp32 reference: their sums in another order (~1e-6 of max|ref|), or TF32
    # on one side (inputs rounded to 10 mantissa bits: ~3e-4 of max|ref| at these shapes,
    # emulated on the CPU) when cuDNN's or the matmuls' TF32 is on
    any_tf32 = ctx.gpu and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    fp32_tol = dict(rtol=5e-3, atol=1e-4) if any_tf32 else dict(rtol=1e-4, atol=1e-5)
    FP32, BF16 = "eager conv3d fp32", "eager conv3d bf16 CL"
    case.add(FP32, lambda: _conv_alone(x, w, gy, torch.float32, False), baseline=True,
             reference=True, note=tf32)
    if ctx.gpu:
        case.add(BF16, lambda: _conv_alone(x, w, gy, torch.bfloat16, True), baseline=True)
    # the fused ops' stem algorithms (conv_bn_relu.STEM_CONV): im2col + one GEMM, and the
    # space-to-depth rewrite in both forms (ops/stem.py); which one "auto" picks per device is
    # decided by these rows
    dt = torch.bfloat16 if ctx.gpu else torch.float32
    tag = "bf16 CL" if ctx.gpu else "fp32"
    # ratios only against the eager row of the same dtype and layout; the tolerance of the dtype
    like = dict(compare_to=[BF16]) if ctx.gpu else dict(compare_to=[FP32], **fp32_tol)
    # without the extension the "algorithm" rows run the reference (plain conv3d): every such
    # row's note says which backend ran, or a plain conv3d would pass for the im2col GEMM
    backend = op_backend("conv_bias_relu3d", ctx.device)
    case.add(f"med3d_ext im2col3d + GEMM {tag}",
             lambda: _conv_alone(x, w, gy, dt, ctx.gpu, _algo_conv("im2col")), note=backend, **like)
    if ctx.gpu:  # 32 MB chunks: the columns may stay in L2 between im2col3d and the GEMM
        case.add(f"med3d_ext im2col3d + GEMM {tag}, 32 MB chunks",
                 lambda: _with_chunks(_conv_alone(x, w, gy, dt, True, _algo_conv("im2col")),
                                      32 << 20), note=backend, **like)
        case.add(f"med3d_ext implicit GEMM {tag}",  # the columns never leave shared memory
                 lambda: _conv_alone(x, w, gy, dt, True, _algo_conv("implicit_gemm")),
                 note=backend, **like)
    for fold, what in ((0, ")"), (1, ", W taps folded)"), (2, ", H and W taps folded)")):
        case.add(f"med3d_ext stem_conv3d {tag} (space-to-depth{what}",
                 lambda fold=fold: _conv_alone(x, w, gy, dt, ctx.gpu, _stem_conv(fold)),
                 note=backend, **like)
        if ctx.gpu and fold:  # the folded input by the line-staged im2col3d kernel (opt-in)
            case.add(f"med3d_ext stem_conv3d {tag} (space-to-depth{what[:-1]}, im2col lines)",
                     lambda fold=fold: _conv_alone(x, w, gy, dt, True, with_env(
                         _stem_conv(fold), "MED3D_EXT_IM2COL_KERNEL", "lines")),
                     note=backend, **like)
    if ctx.gpu:  # fp32 (no autocast): what "auto" should pick there, against "eager conv3d fp32"
        # TF32 first: a note that starts "compiled (" is left out of the summaries
        fp32_note = ("cuDNN TF32 on (for the ATen convolution it may run); " if tf32 else "") + backend
        case.add("med3d_ext im2col3d + GEMM fp32",
                 lambda: _conv_alone(x, w, gy, torch.float32, False, _algo_conv("im2col")),
                 note=fp32_note, compare_to=[FP32], **fp32_tol)
        case.add("med3d_ext stem_conv3d fp32 (space-to-depth, W taps folded)",
                 lambda: _conv_alone(x, w, gy, torch.float32, False, _stem_conv(1)),
                 note=fp32_note, compare_to=[FP32], **fp32_tol)
    case.run()
    del x, w, gy

    # 2./3. conv+BN+ReLU (+ max-pool), bf16 autocast channels_last_3d on a GPU as in the model
    auto = _auto_algo(ctx.device)  # what STEM_CONV = "auto" runs on this device
    for pool in (False, True):
        try:
            L = Layer(ctx, 1, 64, 7, 2, 1, spatial, False, batch, pad=3, x_grad=False, pool=pool)
        except torch.OutOfMemoryError:
            ctx.record(AREA, "stem", "-", "unavailable", "out of memory allocating the inputs")
            continue
        name = "conv+BN+ReLU" + ("+maxpool" if pool else "")
        params = {**base, "dtype": "bf16 autocast" if ctx.gpu else "fp32",
                  "layout": "channels_last_3d" if ctx.gpu else "contiguous", "out": list(L.out_shape)}
        # error-ratio check against the eager stem in high precision, as in conv_bn_relu
        case = ctx.case(AREA, name, params=params, rtol=FLOORS[ctx.device][0], atol=FLOORS[ctx.device][1],
                        flops=flops, precise=lambda: L.precise(True))
        case.add("eager", lambda: L.make(L.eager, True), baseline=True, reference=True)
        case.add("med3d_ext conv_bn_relu3d" + (" + F.max_pool3d" if pool else ""),
                 lambda: L.make(L.fused(m3d_attr("ops.conv_bn_relu3d")), True),
                 note=op_backend("conv_bn_relu3d", ctx.device) + f"; STEM_CONV auto = {auto}")
        if not pool:  # the same op with each other stem algorithm (STEM_CONV)
            for algo in ("im2col", "implicit_gemm", "space_to_depth", "space_to_depth_fold_w",
                         "space_to_depth_fold_hw"):
                if algo == auto:
                    continue
                case.add(f"med3d_ext conv_bn_relu3d, STEM_CONV={algo}",
                         lambda algo=algo: L.make(L.fused(with_stem(
                             m3d_attr("ops.conv_bn_relu3d"), algo)), True),
                         note=op_backend("conv_bn_relu3d", ctx.device))
            if ctx.gpu:  # the folded stems with the line-staged im2col3d kernel (opt-in)
                for algo in ("space_to_depth_fold_w", "space_to_depth_fold_hw"):
                    case.add(f"med3d_ext conv_bn_relu3d, STEM_CONV={algo}, im2col lines",
                             lambda algo=algo: L.make(L.fused(with_stem(
                                 m3d_attr("ops.conv_bn_relu3d"), algo, lines=True)), True),
                             note=op_backend("conv_bn_relu3d", ctx.device))
        if pool:  # the max-pool fused too: the full-resolution activation is never written
            case.add("med3d_ext conv_bn_relu_maxpool3d", lambda: L.make(_fused_pool(), True),
                     note=op_backend("conv_bn_relu_maxpool3d", ctx.device))
            if ctx.gpu:  # the candidates (not yet defaults) in the model's op: the line-staged
                # im2col3d kernel for the default algorithm's input, and the H and W fold with it;
                # the tiled pool kernels (set around the whole step: the gather runs in backward)
                for algo in ("space_to_depth_fold_w", "space_to_depth_fold_hw"):
                    case.add(f"med3d_ext conv_bn_relu_maxpool3d, STEM_CONV={algo}, im2col lines",
                             lambda algo=algo: L.make(with_stem(_fused_pool(), algo, lines=True),
                                                      True),
                             note=op_backend("conv_bn_relu_maxpool3d", ctx.device))
                case.add("med3d_ext conv_bn_relu_maxpool3d, pool tiles",
                         lambda: tuple(with_env(f, "MED3D_EXT_POOL_KERNEL", "tiles")
                                       for f in L.make(_fused_pool(), True)),
                         note=op_backend("conv_bn_relu_maxpool3d", ctx.device))
        if compile_too:
            case.add("torch.compile eager", lambda: L.make(torch.compile(L.eager), True), baseline=True)
        case.run()
        del L


def _fused_pool():
    op = m3d_attr("ops.conv_bn_relu_maxpool3d")

    def f(x, w, bw, bb, rm, rv, training):
        return op(x, w, bw, bb, rm, rv, stride=2, padding=3, training=training, momentum=0.1,
                  eps=1e-5, pool_kernel=3, pool_stride=2, pool_padding=1)
    return f


def _algo_conv(algo):
    """The stem convolution as the fused ops run it with STEM_CONV = ``algo``: conv_bias_relu3d
    without bias, residual or ReLU is the bare convolution (its epilogue is skipped)."""
    op = m3d_attr("ops.conv_bias_relu3d")
    return with_stem(lambda a, b: op(a, b, None, stride=2, padding=3, relu=False), algo)


def _with_chunks(step, nbytes):
    """``step`` with the im2col chunk size set to ``nbytes`` around each call (forward and
    backward alike), restored afterwards."""
    chunk = m3d_attr("ops.conv_bn_relu.im2col_chunk_bytes")

    def run():
        old = chunk()
        chunk(nbytes)
        try:
            return step()
        finally:
            chunk(old)
    return run


def _auto_algo(device) -> str:
    """What STEM_CONV = "auto" runs on ``device`` (the package's own rule), or "unknown"."""
    try:
        return m3d_attr("ops.conv_bn_relu.auto_stem_conv")(torch.device(device).type)
    except Exception:  # noqa: BLE001 - an older or broken build: the rows still run
        return "unknown"


def with_stem(fn, algo, lines=False):
    """``fn`` with conv_bn_relu.STEM_CONV = ``algo`` around each call, and with ``lines`` the
    line-staged im2col3d kernel (MED3D_EXT_IM2COL_KERNEL=lines) as well."""
    fn = with_module_flag(fn, "med3d_ext.ops.conv_bn_relu", "STEM_CONV", algo)
    return with_env(fn, "MED3D_EXT_IM2COL_KERNEL", "lines") if lines else fn


def _stem_conv(fold):
    """stem_conv3d with ``fold`` (0: none, 1: W, 2: H and W) of its taps folded into channels."""
    stem_conv = m3d_attr("ops.stem.stem_conv3d")
    return lambda a, b: stem_conv(a, b, padding=3, fold_w=fold == 1, fold_hw=fold == 2)
