"""bn_stats: one-pass per-channel mean/variance vs ``torch.var_mean`` (the eager reference)."""

from __future__ import annotations

import torch

from .common import m3d_attr, op_backend

AREA = "bn_stats"
# (shape, dtype, channels_last_3d): a layer1 activation in bf16 CL, a layer3 one in fp32
GPU_CASES = [((8, 64, 32, 64, 64), torch.bfloat16, True), ((8, 256, 16, 32, 32), torch.float32, False)]


def _ref(x):
    var, mean = torch.var_mean(x.float(), dim=[0, 2, 3, 4], correction=0)
    return mean, var


def run(ctx):
    dev = ctx.device
    if ctx.gpu:
        cases = GPU_CASES
    elif ctx.quick:
        cases = [((2, 16, 16, 16, 16), torch.float32, False)]
    else:
        cases = [((2, 64, 16, 32, 32), torch.float32, False), ((2, 64, 16, 32, 32), torch.float32, True)]
    for shape, dtype, cl in cases:
        x = torch.randn(shape, device=dev).mul_(2).add_(0.5).to(dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last_3d)
        nbytes = x.numel() * x.element_size()
        case = ctx.case(AREA, f"{'x'.join(map(str, shape))} {str(dtype)[6:]}{' CL' if cl else ''}",
                        params={"shape": list(shape), "dtype": str(dtype)[6:], "channels_last_3d": cl},
                        rtol=1e-4, atol=1e-5, bytes_floor=nbytes)

        def ours(x=x):
            op = m3d_attr("ops.bn_stats")
            return lambda: op(x)

        # timed: var_mean on the tensor as it is (one pass, as ours); checked: the same in
        # fp32. Timing _ref itself put a full bf16 -> fp32 copy of the input into the
        # baseline's time (a 4.49x published on the H200 that was mostly that copy)
        case.add("eager torch.var_mean",
                 lambda x=x: ((lambda: torch.var_mean(x, dim=[0, 2, 3, 4], correction=0)),
                              (lambda: _ref(x))), baseline=True, reference=True)
        case.add("med3d_ext", ours, note=op_backend("bn_stats", ctx.device))
        if ctx.with_compile or not ctx.quick:
            case.add("torch.compile var_mean", lambda x=x: _compiled(x), baseline=True)
        case.run()
        del x


def _compiled(x):
    f = torch.compile(_ref)
    return lambda: f(x)
