"""torch.ops.med3d_ext.bn_act: act((y - mean) * w * invstd + b), the fused layers' epilogue on
its own (used to rebuild activations in backward, med3d_ext/nn/recompute.py)."""

from __future__ import annotations

import pytest
import torch

from med3d_ext import _extension
from python_tests.conftest import DEVICES, tol

pytestmark = pytest.mark.skipif(not _extension.available(), reason="compiled extension not loaded")


def _ref(y, mean, invstd, w, b, relu):
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    shape = (1, -1, 1, 1, 1)
    z = (y.to(acc) - mean.view(shape)) * (w * invstd).view(shape) + b.view(shape)
    return (torch.relu(z) if relu else z).to(y.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True], ids=["ncdhw", "cl3d"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act_against_reference(device, dtype, cl, relu):
    c = int(torch.randint(1, 20, ()))
    y = torch.randn(2, c, 3, 5, 7, device=device).to(dtype)
    if cl:
        y = y.to(memory_format=torch.channels_last_3d)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, b = (torch.randn(c, device=device, dtype=acc) for _ in range(2))
    invstd, w = (torch.rand(c, device=device, dtype=acc) + 0.5 for _ in range(2))
    out = torch.ops.med3d_ext.bn_act(y, mean, invstd, w, b, relu)
    assert out.dtype == dtype and out.shape == y.shape
    if cl and c > 1:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, _ref(y, mean, invstd, w, b, relu), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_non_contiguous_empty_nan_and_errors(device):
    y = torch.randn(2, 4, 6, 5, 8, device=device)[:, :, ::2]
    assert not y.is_contiguous()
    c = torch.rand(4, device=device) + 0.5
    torch.testing.assert_close(torch.ops.med3d_ext.bn_act(y, c, c, c, c, True),
                               _ref(y, c, c, c, c, True))
    empty = torch.ops.med3d_ext.bn_act(y[:0], c, c, c, c, True)
    assert empty.shape == (0,) + y.shape[1:]
    ynan = y.clone()
    ynan[0, 0, 0, 0, 0] = float("nan")
    assert torch.ops.med3d_ext.bn_act(ynan, c, c, c, c, True)[0, 0, 0, 0, 0].isnan()  # as relu
    with pytest.raises(Exception, match="mean"):
        torch.ops.med3d_ext.bn_act(y, c[:3], c, c, c, True)
    with pytest.raises(Exception, match="y"):
        torch.ops.med3d_ext.bn_act(y[0], c, c, c, c, True)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_act_opcheck(device):
    y = torch.randn(2, 3, 4, 5, 3, device=device)
    c = torch.rand(3, device=device) + 0.5
    torch.library.opcheck(torch.ops.med3d_ext.bn_act.default, (y, c, c, c, c, True))
