"""conv_bn_relu: single fused layers at MedicalNet's shapes vs eager conv3d + batch_norm + relu.

Shapes are those of a ResNet at batch 8 x 1 x 64 x 128 x 128 (the stem and max-pool take the
volume to 16 x 32 x 32; layer2 halves it; layer3/4 are dilated, stride 1). On a GPU the layers
run under bf16 autocast in channels_last_3d, as in the training step; on the CPU in fp32.
Training = forward + backward (grads of input, conv weight and BN affine); inference = eval-mode
forward under no_grad.

Checks use the error-ratio rule (common.py): against the eager layer computed in high precision
(float64 on the CPU, fp32 without TF32 on a GPU), each implementation's error must be at most 2x
that of the eager layer in the same precision (bf16 autocast on a GPU: a gradient summed over
10^6 bf16 products is off by percents in eager PyTorch too), plus the floor in FLOORS.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .common import high_precision, m3d_attr, op_backend

AREA = "conv_bn_relu"
# error-ratio floors (rtol, atol) by device; on the CPU the direct tolerance of fp32 before
FLOORS = {"cuda": (1e-2, 1e-3), "cpu": (1e-3, 1e-4)}

# name, cin, cout, kernel, stride, dilation, spatial (at batch 8 x 64 x 128 x 128), residual
GPU_LAYERS = [
    ("layer1 3^3 64->64", 64, 64, 3, 1, 1, (16, 32, 32), False),
    ("layer1 3^3 64->64 +residual", 64, 64, 3, 1, 1, (16, 32, 32), True),
    ("layer2 3^3 64->128 s2", 64, 128, 3, 2, 1, (16, 32, 32), False),
    ("layer3 3^3 256->256 d2", 256, 256, 3, 1, 2, (8, 16, 16), False),
    ("layer4 3^3 512->512 d4", 512, 512, 3, 1, 4, (8, 16, 16), False),
    ("bottleneck 1^3 256->64", 256, 64, 1, 1, 1, (16, 32, 32), False),
]
CPU_QUICK = [("3^3 8->8", 8, 8, 3, 1, 1, (8, 8, 8), False), ("3^3 8->8 +residual", 8, 8, 3, 1, 1, (8, 8, 8), True)]
CPU_FULL = [("3^3 16->16", 16, 16, 3, 1, 1, (16, 16, 16), False),
            ("3^3 16->32 s2", 16, 32, 3, 2, 1, (16, 16, 16), False),
            ("3^3 16->16 d2 +residual", 16, 16, 3, 1, 2, (16, 16, 16), True),
            ("1^3 32->16", 32, 16, 1, 1, 1, (16, 16, 16), False)]


class Layer:
    """Inputs and parameters of one layer; every implementation gets its own BN buffers."""

    def __init__(self, ctx, cin, cout, k, stride, dil, spatial, residual, batch, pad=None, x_grad=True,
                 pool=False):
        dev = ctx.device
        self.ctx, self.stride, self.dil = ctx, stride, dil
        self.pad = dil * (k // 2) if pad is None else pad
        self.x_grad, self.pool = x_grad, pool  # the stem: input without grad, max-pool after
        mf = torch.channels_last_3d if ctx.gpu else torch.contiguous_format
        # inside the network a layer's input is already bf16 (the previous layer's output); the
        # stem's input is the fp32 image, which autocast casts
        x_dt = torch.bfloat16 if (ctx.gpu and x_grad) else torch.float32
        self.x = torch.randn(batch, cin, *spatial, device=dev).to(x_dt).to(memory_format=mf)
        self.w = (torch.randn(cout, cin, k, k, k, device=dev) * (2.0 / (cin * k**3)) ** 0.5).to(memory_format=mf)
        self.bw = torch.rand(cout, device=dev) + 0.5
        self.bb = torch.randn(cout, device=dev) * 0.1
        self.rm = torch.randn(cout, device=dev) * 0.1
        self.rv = torch.rand(cout, device=dev) + 0.5
        with torch.no_grad():
            y = F.conv3d(self.x[:1].float(), self.w, None, stride, self.pad, dil)
        self.res_shape = (batch,) + tuple(y.shape[1:])
        if pool:
            y = F.max_pool3d(y, 3, 2, 1)
        out_shape = (batch,) + tuple(y.shape[1:])
        dt = torch.bfloat16 if ctx.gpu else torch.float32
        self.res = torch.randn(self.res_shape, device=dev).to(dt).to(memory_format=mf) if residual else None
        self.gy = torch.randn(out_shape, device=dev).to(dt).to(memory_format=mf)
        self.out_shape = out_shape

    def leaves(self, dtype=None):
        return [t.detach().to(dtype or t.dtype, copy=True).requires_grad_(i > 0 or self.x_grad)
                for i, t in enumerate((self.x, self.w, self.bw, self.bb))]

    def autocast(self):
        return torch.autocast(self.ctx.device, dtype=torch.bfloat16, enabled=self.ctx.gpu)

    def eager(self, x, w, bw, bb, rm, rv, training):
        y = F.conv3d(x, w, None, self.stride, self.pad, self.dil)
        y = F.batch_norm(y, rm, rv, bw, bb, training=training, momentum=0.1, eps=1e-5)
        if self.res is not None:
            y = y + self.res
        y = F.relu(y)
        return F.max_pool3d(y, 3, 2, 1) if self.pool else y

    def fused(self, op):
        def f(x, w, bw, bb, rm, rv, training):
            y = op(x, w, bw, bb, rm, rv, stride=self.stride, padding=self.pad, dilation=self.dil,
                   training=training, momentum=0.1, eps=1e-5, residual=self.res, relu=True)
            return F.max_pool3d(y, 3, 2, 1) if self.pool else y
        return f

    def make(self, fwd, training, dtype=None):
        """fwd(x, w, bw, bb, rm, rv, training) -> (timed fn, check fn). ``dtype``: inputs in
        that dtype and no autocast (the high-precision reference).

        On the CPU the check runs the same implementation in float64: in fp32 two correct
        implementations that sum in another order can decide a ReLU of a value within round-off
        of zero differently, which moves a gradient by a whole term (seen as a random FAILED
        row); in float64 that does not happen and the check still catches any wrong math."""
        if dtype is None and not self.ctx.gpu:
            timed = self.make(fwd, training, torch.float32)[0]
            return timed, self.make(fwd, training, torch.float64)[1]
        leaves = self.leaves(dtype)
        wrt = [t for t in leaves if t.requires_grad]
        rm, rv = (t.to(dtype or t.dtype, copy=True) for t in (self.rm, self.rv))
        gy = self.gy if dtype is None else self.gy.to(dtype)
        amp = self.autocast if dtype is None else contextlib.nullcontext
        if training:
            def step():
                with amp():
                    y = fwd(*leaves, rm, rv, True)
                return (y, *torch.autograd.grad(y, wrt, gy))
            return step, step

        def infer():
            with torch.no_grad(), amp():
                return fwd(*[t.detach() for t in leaves], rm, rv, False)
        return infer, infer

    def precise(self, training):
        """The eager layer's check outputs in high precision, from the same inputs."""
        with high_precision(self.ctx.device) as dt:
            return self.make(self.eager, training, dt)[1]()


def run(ctx):
    layers = GPU_LAYERS if ctx.gpu else (CPU_QUICK if ctx.quick else CPU_FULL)
    batch = 8 if ctx.gpu else (1 if ctx.quick else 2)
    compile_too = ctx.with_compile or not ctx.quick
    for name, cin, cout, k, stride, dil, spatial, residual in layers:
        try:
            L = Layer(ctx, cin, cout, k, stride, dil, spatial, residual, batch)
        except torch.OutOfMemoryError:
            ctx.record(AREA, name, "-", "unavailable", "out of memory allocating the inputs")
            continue
        for training in (True, False):
            params = {"x": [batch, cin, *spatial], "weight": [cout, cin, k, k, k], "stride": stride,
                      "dilation": dil, "residual": residual, "out": list(L.out_shape),
                      "dtype": "bf16 autocast" if ctx.gpu else "fp32",
                      "layout": "channels_last_3d" if ctx.gpu else "contiguous",
                      "mode": "train fwd+bwd" if training else "inference"}
            rtol, atol = FLOORS[ctx.device]
            flops = 2 * batch * cout * cin * k**3 * int(torch.tensor(L.out_shape[2:]).prod()) * (3 if training else 1)
            case = ctx.case(AREA, f"{name} {'train' if training else 'infer'}", params=params,
                            rtol=rtol, atol=atol, flops=flops, precise=lambda t=training: L.precise(t))
            case.add("eager conv3d+batch_norm+relu", lambda t=training: L.make(L.eager, t), baseline=True, reference=True)
            case.add("med3d_ext", lambda t=training: L.make(L.fused(m3d_attr("ops.conv_bn_relu3d")), t),
                     note=op_backend("conv_bn_relu3d", ctx.device))
            if compile_too:
                case.add("torch.compile eager", lambda t=training: L.make(torch.compile(L.eager), t), baseline=True)
            case.run()
        del L
