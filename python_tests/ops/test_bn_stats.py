"""bn_stats against torch.var_mean, on every dtype, layout and odd shape; opcheck; compile."""

from __future__ import annotations

import pytest
import torch

import med3d_ext as m3d
from med3d_ext import _extension, reference
from python_tests.conftest import DEVICES, TOL

requires_ext = pytest.mark.skipif(not _extension.available(), reason="extension not loaded")

SHAPES = [(2, 3, 5, 7, 9), (1, 64, 3, 4, 5), (4, 1, 1, 1, 1), (3, 33, 2, 1, 17), (2, 5, 11)]


def _expected(x, unbiased):
    acc = torch.float64
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.to(acc), dim=dims, correction=int(unbiased))
    return mean, var


def _check_forward(device, dtype, shape, channels_last, unbiased):
    x = (torch.randn(shape, device=device) * 3 + 1.5).to(dtype)
    if channels_last:
        if len(shape) != 5:
            pytest.skip("channels_last_3d needs 5-D")
        x = x.to(memory_format=torch.channels_last_3d)
    mean, var = m3d.ops.bn_stats(x, unbiased=unbiased)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (shape[1],)
    em, ev = _expected(x, unbiased)
    # inputs are exactly representable in `dtype`; only accumulation error remains
    rtol, atol = TOL[acc]
    torch.testing.assert_close(mean.double(), em, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(var.double(), ev, rtol=rtol, atol=atol * 10, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_stats_forward(device, dtype, shape, channels_last):
    _check_forward(device, dtype, shape, channels_last, unbiased=bool(torch.randint(2, ()).item()))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_large_offset_is_stable(device):
    # Welford keeps the variance of data with a large mean; naive sum/sumsq in fp32 would not.
    x = torch.randn(4, 3, 32, 32, 32, device=device) + 1000.0
    mean, var = m3d.ops.bn_stats(x)
    em, ev = _expected(x, False)
    torch.testing.assert_close(var.double(), ev, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mean.double(), em, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_non_contiguous(device):
    x = torch.randn(3, 6, 10, 9, 8, device=device)[:, ::2, 1:, :, ::3]
    assert not x.is_contiguous()
    mean, var = m3d.ops.bn_stats(x)
    em, ev = _expected(x, False)
    torch.testing.assert_close(mean.double(), em, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ev, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_empty(device):
    mean, var = m3d.ops.bn_stats(torch.randn(0, 4, 3, 3, 3, device=device))
    assert mean.shape == (4,) and torch.isnan(mean).all() and torch.isnan(var).all()
    mean, var = m3d.ops.bn_stats(torch.randn(2, 0, 3, 3, 3, device=device))
    assert mean.shape == (0,) and var.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_more_channels_than_a_grid_dimension(device):
    # C > 65535 in the (N, C, S) layout: the CUDA partial kernel's grid cannot give each channel
    # its own gridDim.y row, so blocks loop over channels
    for shape in ((3, 70001), (2, 66000, 3)):
        x = torch.randn(shape, device=device) * 2 + 0.5
        mean, var = m3d.ops.bn_stats(x, unbiased=True)
        em, ev = _expected(x, True)
        torch.testing.assert_close(mean.double(), em, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var.double(), ev, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_deterministic(device):
    x = torch.randn(8, 16, 16, 16, 16, device=device, dtype=torch.bfloat16)
    a = m3d.ops.bn_stats(x)
    b = m3d.ops.bn_stats(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_bad_input(device):
    with pytest.raises((RuntimeError, ValueError), match="x"):
        m3d.ops.bn_stats(torch.randn(5, device=device))
    if _extension.available():
        with pytest.raises(RuntimeError, match="floating point"):
            m3d.ops.bn_stats(torch.ones(2, 3, 4, dtype=torch.int64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_gradients(device):
    x = torch.randn(2, 3, 3, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    for unbiased in (False, True):
        torch.autograd.gradcheck(lambda t: m3d.ops.bn_stats(t, unbiased=unbiased), (x,))
    # against reference autograd in fp32, with both outputs used
    x32 = torch.randn(2, 4, 5, 3, 3, device=device, requires_grad=True)
    gm, gv = torch.randn(4, device=device), torch.randn(4, device=device)
    m, v = m3d.ops.bn_stats(x32)
    (g_ours,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x32)
    m, v = reference.bn_stats(x32)
    (g_ref,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x32)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_opcheck(device):
    x = torch.randn(2, 3, 4, 5, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.med3d_ext.bn_stats.default, (x, False))
    xc = torch.randn(2, 8, 3, 4, 5, device=device).to(memory_format=torch.channels_last_3d)
    torch.library.opcheck(torch.ops.med3d_ext.bn_stats.default, (xc, True))


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_compile(device):
    fn = torch.compile(lambda t: m3d.ops.bn_stats(t), fullgraph=True)
    x = torch.randn(2, 5, 6, 7, 3, device=device)
    for a, b in zip(fn(x), m3d.ops.bn_stats(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_two_d_and_transposed_with_gradients(device):
    # (N, C) input (BatchNorm1d's shape) and a transposed view; values and gradients against
    # the reference on a contiguous copy
    for x in (torch.randn(7, 3, device=device), torch.randn(5, 4, 3, 6, device=device).transpose(0, 1),
              torch.randn(3, 6, 4, 5, 2, device=device).permute(0, 1, 4, 2, 3)):
        xa = x.detach().requires_grad_()
        xb = x.detach().contiguous().requires_grad_()
        a, b = m3d.ops.bn_stats(xa, unbiased=True), reference.bn_stats(xb, True)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        g = torch.randn(2, x.shape[1], device=device)
        (ga,) = torch.autograd.grad((a[0] * g[0]).sum() + (a[1] * g[1]).sum(), xa)
        (gb,) = torch.autograd.grad((b[0] * g[0]).sum() + (b[1] * g[1]).sum(), xb)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_gradient_of_empty_and_single_value(device):
    # an empty batch, and one value per channel with unbiased=True (variance NaN): the backward
    # used to divide by zero in Python; now it matches torch.var_mean's (empty, or NaN)
    for shape, unbiased in (((0, 3, 4), False), ((0, 3, 4), True), ((1, 3), True),
                            ((1, 2, 1, 1, 1), True)):
        xa = torch.randn(shape, device=device, requires_grad=True)
        xb = xa.detach().clone().requires_grad_()
        ma, va = m3d.ops.bn_stats(xa, unbiased=unbiased)
        mb, vb = reference.bn_stats(xb, unbiased)
        torch.testing.assert_close(va, vb, equal_nan=True)
        (ga,) = torch.autograd.grad(ma.sum() + va.sum(), xa)
        (gb,) = torch.autograd.grad(mb.sum() + vb.sum(), xb)
        assert ga.shape == xa.shape
        torch.testing.assert_close(ga, gb, equal_nan=True)
