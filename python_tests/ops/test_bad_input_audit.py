"""Regression tests of a bad-input audit of the conv/BN/im2col ops: each input here once gave a
raw internal error (no argument name), a wrong result or an uninitialised tensor. Mixed
devices use 'meta' as the second device, so they run on the CPU too; huge sizes are checked
through shape logic only (no large allocation)."""

from __future__ import annotations

import pytest
import torch

import med3d_ext as m3d
from med3d_ext import _extension
from python_tests.conftest import DEVICES

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")


def _conv_args(device, cin=3, cout=4):
    return (torch.randn(2, cin, 5, 6, 7, device=device),
            torch.randn(cout, cin, 3, 3, 3, device=device),
            torch.rand(cout, device=device) + 0.5, torch.randn(cout, device=device),
            torch.zeros(cout, device=device), torch.ones(cout, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_none_for_a_required_tensor_names_the_argument(device):
    x, w, *bn = _conv_args(device)
    for f in (m3d.ops.conv_bn_relu3d, m3d.ops.conv_bn_relu_maxpool3d):
        with pytest.raises(TypeError, match=r"argument 'x' must be a tensor, got NoneType"):
            f(None, w, *bn)
        with pytest.raises(TypeError, match=r"argument 'weight' must be a tensor, got NoneType"):
            f(x, None, *bn)
    with pytest.raises(TypeError, match=r"conv_bias_relu3d: argument 'x' must be a tensor"):
        m3d.ops.conv_bias_relu3d(None, w, None)
    with pytest.raises(TypeError, match=r"bn_stats: argument 'x' must be a tensor, got NoneType"):
        m3d.ops.bn_stats(None)


@pytest.mark.parametrize("device", DEVICES)
def test_stride_of_a_wrong_type_is_refused_not_truncated(device):
    x, w, *bn = _conv_args(device)
    f = m3d.ops.conv_bn_relu3d
    for bad in (1.5, None, [1.5, 1, 1], "2"):
        with pytest.raises(TypeError, match=r"stride must be an int or 3 ints"):
            f(x, w, *[t.clone() for t in bn], stride=bad)
    # a 0-d integer tensor is an int
    a = f(x, w, *[t.clone() for t in bn], stride=torch.tensor(2))
    b = f(x, w, *[t.clone() for t in bn], stride=2)
    torch.testing.assert_close(a, b)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan")])
def test_non_positive_eps_refused_in_training(device, eps):
    # F.batch_norm refuses it; the op used to compute with it (NaN/inf for a constant channel)
    x, w, *bn = _conv_args(device)
    # the wrappers raise F.batch_norm's ValueError, the op itself a RuntimeError
    with pytest.raises(ValueError, match=r"argument 'eps' must be positive when training"):
        m3d.ops.conv_bn_relu3d(x, w, *bn, eps=eps)
    with pytest.raises(ValueError, match=r"argument 'eps' must be positive when training"):
        m3d.ops.conv_bn_relu_maxpool3d(x, w, *bn, eps=eps)
    with pytest.raises(RuntimeError, match=r"argument 'eps' must be positive when training"):
        torch.ops.med3d_ext.conv_bn_relu3d(x, w, *bn, None, [1, 1, 1], [0, 0, 0], [1, 1, 1],
                                           True, eps, True)
    # eval mode normalises with the running variance: eps = 0 is allowed, as in F.batch_norm
    # of torch 2.13 (2.11 refuses it in eval too, so the reference is written out here)
    out = m3d.ops.conv_bn_relu3d(x, w, *bn, eps=0.0, training=False)
    if not eps >= 0:  # a negative (or NaN) eps in eval: refused as F.batch_norm does (gave inf)
        with pytest.raises(ValueError, match=r"argument 'eps' must be non-negative"):
            m3d.ops.conv_bn_relu3d(x, w, *bn, eps=eps, training=False)
    g, b, rm, rv = (t.view(1, -1, 1, 1, 1) for t in bn)
    ref = torch.relu((torch.nn.functional.conv3d(x, w) - rm) / rv.sqrt() * g + b)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_an_argument_on_another_device_is_named_not_returned_as_garbage(device):
    # one 'meta' argument sends the call to the fake kernel, which used to return an
    # uninitialised tensor on x's device
    x, w, g, b, rm, rv = _conv_args(device)
    f = m3d.ops.conv_bn_relu3d
    meta = lambda t: t.to("meta")  # noqa: E731
    cases = {"weight": (x, meta(w), g, b, rm, rv), "bn_weight": (x, w, meta(g), b, rm, rv),
             "running_var": (x, w, g, b, rm, meta(rv))}
    for name, args in cases.items():
        with pytest.raises(RuntimeError, match=rf"argument '{name}' is on meta but the input is on"):
            f(*args)
    with pytest.raises(RuntimeError, match=r"argument 'residual' is on meta"):
        f(x, w, g, b, rm, rv, residual=torch.zeros(2, 4, 3, 4, 5, device="meta"))
    with pytest.raises(RuntimeError, match=r"argument 'weight' is on (cpu|cuda).* input is on meta"):
        f(meta(x), w, g, b, rm, rv)
    with pytest.raises(RuntimeError, match=r"conv_bias_relu3d: argument 'bias' is on meta"):
        m3d.ops.conv_bias_relu3d(x, w, meta(b))
    ops = torch.ops.med3d_ext
    with pytest.raises(RuntimeError, match=r"implicit_gemm_conv3d: argument 'weight' is on meta"):
        ops.implicit_gemm_conv3d(x, meta(w), [1, 1, 1], [1, 1, 1], [1, 1, 1])
    rows = torch.zeros(2 * 5 * 6 * 7, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"argument 'grad_rows' is on meta"):
        ops.implicit_gemm_conv3d_weight_grad(rows, x, [4, 3, 3, 3, 3], [1, 1, 1], [1, 1, 1],
                                             [1, 1, 1])
    # all on meta is shape inference and stays allowed
    assert f(*[meta(t) for t in (x, w, g, b, rm, rv)]).shape == (2, 4, 3, 4, 5)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_padding_or_dilation_that_overflows_int64_is_refused(device):
    # dilation * (k - 1) + 1 wrapped around to a negative span: im2col3d returned a matrix
    # of the wrong size with every tap at the same voxel
    x = torch.randn(2, 3, 5, 6, 7, device=device)
    im2col = torch.ops.med3d_ext.im2col3d
    with pytest.raises(RuntimeError, match=r"im2col3d: kernel_size, padding or dilation too large"):
        im2col(x, [3, 3, 3], [1, 1, 1], [1, 1, 1], [2**62, 1, 1])
    with pytest.raises(RuntimeError, match=r"im2col3d: kernel_size, padding or dilation too large"):
        im2col(x, [3, 3, 3], [1, 1, 1], [2**62, 1, 1], [1, 1, 1])
    x0, w, *bn = _conv_args(device)
    for kw in (dict(dilation=2**62), dict(padding=2**62)):
        with pytest.raises(RuntimeError, match=r"conv_bn_relu3d: padding or dilation too large"):
            m3d.ops.conv_bn_relu3d(x0, w, *bn, **kw)
    # row_start + rows wrapped around and passed the range check
    with pytest.raises(RuntimeError, match=r"im2col3d: rows \[.*\) are outside the matrix's 420"):
        im2col(x, [3, 3, 3], [1, 1, 1], [1, 1, 1], [1, 1, 1], 8, 2**62, 2**62)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_pool_window_that_overflows_is_refused_not_looped_over(device):
    # kernel sides of 2^21 made the window size 2^63 -> wrapped to 0, passed the 255-voxel
    # check and the kernel looped for ever; 2^62 sides (padding 2^61) returned an output
    x, w, *bn = _conv_args(device, cin=1)
    f = m3d.ops.conv_bn_relu_maxpool3d
    for k, p in ((2**21, 2**20), (2**62, 2**61), (256, 0)):
        with pytest.raises(RuntimeError, match=r"pool windows of at most 255 voxels"):
            f(x, w, *[t.clone() for t in bn], pool_kernel=k, pool_padding=p, pool_stride=1)
    with pytest.raises(RuntimeError, match=r"at most half the kernel"):
        f(x, w, *[t.clone() for t in bn], pool_kernel=3, pool_padding=2**62)
