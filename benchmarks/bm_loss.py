"""loss: multi-head CE + soft Dice, forward + backward, as in Med3D co-training.

Split as in the baseline: 8 heads of 2-5 classes, each one sample of 32 x 64 x 64 (on a GPU),
int64 labels. med3d_ext ``multihead_seg_loss`` (validate=False and True) vs a per-head Python
loop of CE + soft Dice (the eager reference) vs torch.compile of that loop (outside --quick) vs
MONAI ``DiceCELoss`` x 8 (when installed); fp32 and bf16 logits (the reference computes in fp32
from the bf16 logits, as autocast does). A large case, 4 heads x 2 samples x 2 classes x 128^3,
reports its byte floor (logits read, gradient written, labels read once).

On a GPU the eager rows are host-bound (a few kernels, ~50 us of GPU time, against the host's
Python, dispatch and autograd), so each case also times the loss replayed from a captured CUDA
graph (what ``torch.compile(mode="reduce-overhead")`` or a whole-step graph gives), ours and the
per-head loop alike: the launch-free cost of the same work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import graphed, m3d_attr, op_backend, optional_import

AREA = "loss"
HEADS = [2, 3, 2, 4, 2, 3, 2, 5]


def loop_loss(logits, targets, smooth=1e-5):
    """Per head: CE + (1 - mean over samples and classes of the soft Dice), summed over heads."""
    total = 0
    for lg, t in zip(logits, targets):
        lg = lg.float()
        k = lg.shape[1]
        ce = F.cross_entropy(lg, t)
        p = lg.softmax(1)
        oh = F.one_hot(t, k).movedim(-1, 1).to(p.dtype)
        dims = tuple(range(2, lg.dim()))
        inter = (p * oh).sum(dims)
        den = p.sum(dims) + oh.sum(dims)
        total = total + ce + 1 - ((2 * inter + smooth) / (den + smooth)).mean()
    return total


def _with_grads(loss_fn, logits):
    def f():
        total = loss_fn()
        return (total.detach().float(), *torch.autograd.grad(total, logits))
    return f


def _ours(logits, targets, validate):
    op = m3d_attr("ops.multihead_seg_loss")
    return _with_grads(lambda: op(logits, targets, validate=validate)[0], logits)


def _monai(logits, targets):
    losses = optional_import("monai.losses")
    fns = [losses.DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5) for _ in logits]
    t1 = [t.unsqueeze(1) for t in targets]

    def total():
        return sum(f(lg.float(), t) for f, lg, t in zip(fns, logits, t1))
    return _with_grads(total, logits)


def _case(ctx, name, heads, batch, spatial, dtype, monai=True, compile_too=False):
    dev = ctx.device
    logits = [torch.randn(batch, k, *spatial, device=dev).mul_(2).to(dtype).requires_grad_(True) for k in heads]
    targets = [torch.randint(0, k, (batch, *spatial), device=dev) for k in heads]
    vox = batch * spatial[0] * spatial[1] * spatial[2]
    es = torch.tensor([], dtype=dtype).element_size()
    nbytes = sum(vox * (2 * k * es + 8) for k in heads)
    params = {"heads": len(heads), "classes": heads, "logits": [batch, "K", *spatial],
              "logits_dtype": str(dtype)[6:], "targets_dtype": "int64", "mode": "fwd+bwd"}
    tol = (2e-2, 1e-3) if dtype != torch.float32 else (1e-4, 1e-6)
    case = ctx.case(AREA, name, params=params, rtol=tol[0], atol=tol[1], bytes_floor=nbytes)
    case.add("eager per-head loop", lambda: _with_grads(lambda: loop_loss(logits, targets), logits),
             baseline=True, reference=True)
    note = op_backend("multihead_seg_loss", ctx.device)
    case.add("med3d_ext validate=False", lambda: _ours(logits, targets, False), note=note)
    case.add("med3d_ext validate=True", lambda: _ours(logits, targets, True), note=note)
    if ctx.gpu:
        case.add("eager per-head loop, CUDA graph",
                 lambda: graphed(lambda: _with_grads(lambda: loop_loss(logits, targets), logits)),
                 baseline=True)
        case.add("med3d_ext validate=False, CUDA graph",
                 lambda: graphed(lambda: _ours(logits, targets, False)), note=note)
    if compile_too:
        def compiled():
            f = torch.compile(loop_loss)
            return _with_grads(lambda: f(logits, targets), logits)
        case.add("torch.compile loop", compiled, baseline=True)
    if monai:
        case.add("MONAI DiceCELoss per head", lambda: _monai(logits, targets), baseline=True)
    case.run()


def run(ctx):
    compile_too = ctx.with_compile or not ctx.quick
    if ctx.gpu:
        spatial, big = (32, 64, 64), (128, 128, 128)
    else:
        spatial, big = ((8, 8, 8), None) if ctx.quick else ((16, 32, 32), (32, 32, 32))
    sp = "x".join(map(str, spatial))
    _case(ctx, f"8 heads 1x{sp} fp32", HEADS, 1, spatial, torch.float32, compile_too=compile_too)
    _case(ctx, f"8 heads 1x{sp} bf16", HEADS, 1, spatial, torch.bfloat16, monai=not ctx.quick or ctx.gpu)
    if big is not None:
        bs = "x".join(map(str, big))
        _case(ctx, f"4 heads 2x2x{bs} fp32", [2, 2, 2, 2], 2, big, torch.float32, monai=not ctx.quick)
