"""Argument checks an API audit found missing or mislabelled: each error names the function,
the argument and the bad value; what PyTorch's own functions accept is accepted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import med3d_ext as m3d
from med3d_ext.models import ClassificationNet, param_groups


def test_fused_conv_ops_name_themselves_in_errors():
    x, w = torch.randn(1, 2, 8, 8, 8), torch.randn(3, 2, 3, 3, 3)
    calls = {"conv_bias_relu3d": lambda **k: m3d.ops.conv_bias_relu3d(x, w, None, **k),
             "conv_bn_relu_maxpool3d":
                 lambda **k: m3d.ops.conv_bn_relu_maxpool3d(x, w, None, None, None, None, **k)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name}: stride must be an int or 3 ints"):
            call(stride=(1, 2))
        with pytest.raises(TypeError, match=rf"^{name}: padding must be an int or 3 ints"):
            call(padding=1.5)


@pytest.mark.parametrize("kernel", [2, 3, (3, 2, 3)])
def test_maxpool_stride_none_is_the_kernel(kernel):
    """F.max_pool3d's stride=None (the kernel size) was refused."""
    x, w = torch.randn(2, 2, 9, 10, 11, dtype=torch.float64), torch.randn(3, 2, 3, 3, 3,
                                                                          dtype=torch.float64)
    out = m3d.ops.conv_bn_relu_maxpool3d(x, w, None, None, None, None, pool_kernel=kernel,
                                         pool_stride=None, pool_padding=1)
    y = torch.relu(F.batch_norm(F.conv3d(x, w), None, None, training=True))
    torch.testing.assert_close(out, F.max_pool3d(y, kernel, None, 1), rtol=1e-10, atol=1e-10)


def test_resample_to_spacing_refuses_a_string():
    with pytest.raises(TypeError, match=r"argument 'spacing' must be 3 positive floats, got '124'"):
        m3d.ops.resample_to_spacing(torch.randn(1, 1, 4, 4, 4), "124", (1.0, 1.0, 1.0))


def test_param_groups_and_dropout_check_their_numbers():
    model = ClassificationNet(10, 2)
    for kw, msg in ((dict(lr="a"), "lr must be a finite number > 0, got 'a'"),
                    (dict(lr=-1.0), "lr must be a finite number > 0, got -1.0"),
                    (dict(head_lr=float("inf")), "head_lr must be a finite number > 0"),
                    (dict(head_lr_mult=0), "head_lr_mult must be a finite number > 0"),
                    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0")):
        with pytest.raises((TypeError, ValueError), match=rf"param_groups: {msg}"):
            param_groups(model, **kw)
    groups = param_groups(model, lr=0.01, head_lr_mult=10)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    for bad in ("0.5", 1.0, -0.1, float("nan")):
        with pytest.raises((TypeError, ValueError),
                           match=r"ClassificationHead: dropout must be a number in \[0, 1\)"):
            ClassificationNet(10, 2, dropout=bad)
    assert ClassificationNet(10, 2, dropout=0).head.dropout.p == 0.0
