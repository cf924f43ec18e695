"""Size limits of the conv_bn_relu, max-pool and seg_loss kernels (the integer-overflow review):
sizes just past a 32-bit or grid limit either work or are refused with an error that names the
argument and the limit, never a wrong result. Shapes that would need gigabytes use expanded
(stride 0) tensors where the check fires before any data is read."""

from __future__ import annotations

import pytest
import torch

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES
from python_tests.ops.test_conv_bn_relu import _assert_matches
from python_tests.ops.test_conv_bn_relu_pool import _run

pytestmark = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")

INT32_MAX = 2**31 - 1


def _bn_args(device, c):
    bw = torch.rand(c, device=device) + 0.5
    bb = torch.randn(c, device=device)
    rm = torch.randn(c, device=device) * 0.1
    rv = torch.rand(c, device=device) + 0.5
    return bw, bb, rm, rv


# ---- more than 65535 channels in the contiguous layout ------------------------------------
# The CUDA per-channel reduction (backward sums, training statistics) launched one block row
# per channel (gridDim.y = C), so C > 65535 failed to launch; blocks now loop over channels.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu3d_more_than_65535_channels(device, training):
    c = 65535 + int(torch.randint(2, 40, ()))
    x = torch.randn(2, 1, 1, 2, 3, device=device)
    w = torch.randn(c, 1, 1, 1, 1, device=device)
    args = (x, w, *_bn_args(device, c))
    out, grads, rm, rv, go = _run(m3d.ops.conv_bn_relu3d, *args, {}, training)
    ref, rgrads, rrm, rrv, _ = _run(reference.conv_bn_relu3d, *args, {}, training, go)
    assert out.is_contiguous() and out.shape == (2, c, 1, 2, 3)
    _assert_matches(out, grads, rm, rv, ref, rgrads, rrm, rrv)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_bn_relu_maxpool3d_more_than_65535_channels(device):
    c = 65535 + int(torch.randint(2, 40, ()))
    x = torch.randn(2, 1, 2, 3, 4, device=device)
    w = torch.randn(c, 1, 1, 1, 1, device=device)
    kw = dict(pool_kernel=2, pool_stride=2, pool_padding=0)
    args = (x, w, *_bn_args(device, c))
    out, grads, rm, rv, go = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True)
    ref, rgrads, rrm, rrv, _ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go)
    assert out.shape == (2, c, 1, 1, 2)
    _assert_matches(out, grads, rm, rv, ref, rgrads, rrm, rrv)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_backward_more_than_65535_channels(device, training):
    # The backward op on its own (no convolution): its per-channel sums are the reduction that
    # launched gridDim.y = C. S = 4 keeps the float32 kernel on its 16-byte vector path.
    c = 65535 + int(torch.randint(2, 40, ()))
    y = torch.randn(2, c, 1, 1, 4, device=device)
    go = torch.randn_like(y)
    bw, bb = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    y64 = y.double().requires_grad_()
    w64, b64 = bw.double().requires_grad_(), bb.double().requires_grad_()
    dims, shape = (0, 2, 3, 4), (1, -1, 1, 1, 1)
    mean = y64.mean(dims)
    invstd = (y64.var(dims, unbiased=False) + 1e-5).rsqrt()
    if not training:  # eval: the statistics are constants
        mean, invstd = mean.detach(), invstd.detach()
    z = (y64 - mean.view(shape)) * (invstd * w64).view(shape) + b64.view(shape)
    ref = torch.autograd.grad(torch.relu(z), (y64, w64, b64), go.double())
    gy, gw, gb, gr = torch.ops.med3d_ext.bn_relu_backward(
        go, y, mean.detach().float(), invstd.detach().float(), bw, bb, None, training, True)
    assert gr.numel() == 0
    for name, a, b in (("grad_y", gy, ref[0]), ("grad_bn_weight", gw, ref[1]),
                       ("grad_bn_bias", gb, ref[2])):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- pool strides beyond int32 ------------------------------------------------------------
# PoolGeom keeps the pool stride as an int: 2^32 wrapped to 0 and the CUDA backward's window
# search divided by it (every gradient came out 0, silently). max_pool3d itself refuses a
# stride that does not fit an int, so the fused op now does too; the largest one still works.


@pytest.mark.parametrize("device", DEVICES)
def test_pool_stride_beyond_int32_is_refused(device):
    x = torch.randn(2, 1, 5, 6, 6, device=device)
    w = torch.randn(4, 1, 3, 3, 3, device=device)
    bw, bb, rm, rv = _bn_args(device, 4)
    for big in (2**31, 2**32, 2**32 + 2):
        with pytest.raises(RuntimeError, match=r"pool_stride .*at most 2147483647"):
            m3d.ops.conv_bn_relu_maxpool3d(x, w, bw, bb, rm, rv, padding=1, pool_kernel=3,
                                           pool_stride=(big, 2, 2), pool_padding=1)
    # the backward op on its own (pooled shape (1, 3, 3) for either stride along d)
    y = torch.randn(2, 4, 5, 6, 6, device=device)
    go = torch.randn(2, 4, 1, 3, 3, device=device)
    arg = torch.zeros(2, 4, 1, 3, 3, device=device, dtype=torch.uint8)
    c = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match=r"pool_stride .*at most 2147483647"):
        torch.ops.med3d_ext.bn_relu_maxpool_backward(go, y, arg, c, c, c, c, True, [3, 3, 3],
                                                     [2**32, 2, 2], [1, 1, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_largest_pool_stride_matches_reference(device, axis):
    x = torch.randn(2, 1, 5, 6, 7, device=device)
    w = torch.randn(3, 1, 3, 3, 3, device=device) / 27**0.5
    stride = [2, 2, 2]
    stride[axis] = INT32_MAX
    kw = dict(padding=1, pool_kernel=3, pool_stride=tuple(stride), pool_padding=1)
    args = (x, w, *_bn_args(device, 3))
    out, grads, rm, rv, go = _run(m3d.ops.conv_bn_relu_maxpool3d, *args, kw, True)
    ref, rgrads, rrm, rrv, _ = _run(reference.conv_bn_relu_maxpool3d, *args, kw, True, go)
    assert out.shape == ref.shape and out.shape[2 + axis] == 1
    _assert_matches(out, grads, rm, rv, ref, rgrads, rrm, rrv)


# ---- seg_loss: SegHead's int32 sample and class counts ------------------------------------
# n and C travel as int32 and a tile's 3 C + 2 partials are indexed in int: 2^31 samples, or
# 715827882 classes (3 C + 2 = 2^31), wrapped (on the CPU a negative fill length). Expanded
# logits cost no memory: the check fires before the inputs are made contiguous.


def _seg_call(device, shapes):
    logits = [torch.zeros(1, 1, 1, device=device).expand(*s) for s in shapes]
    targets = [torch.zeros(1, 1, device=device, dtype=torch.uint8).expand(s[0], 1)
               for s in shapes]
    return torch.ops.med3d_ext.multihead_seg_loss(logits, targets, None, None, 1.0, 1.0, 1e-5,
                                                  -100)


@pytest.mark.parametrize("device", DEVICES)
def test_seg_loss_sizes_beyond_int32_are_refused(device):
    with pytest.raises(RuntimeError, match=r"logits\[0\].*at most 2147483647 samples"):
        _seg_call(device, [(2**31, 2, 1)])
    with pytest.raises(RuntimeError, match=r"logits\[1\].*715827881 classes"):
        _seg_call(device, [(1, 2, 1), (1, 715827882, 1)])
    # each head within the limit, but their class weights' offsets would not fit an int32
    with pytest.raises(RuntimeError, match=r"classes in all; at most 2147483647"):
        _seg_call(device, [(1, 715827881, 1)] * 4)

