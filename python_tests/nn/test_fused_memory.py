"""What the fused ResNet keeps for backward: no more than the plain model (meta tensors: the
saved bytes are counted without computing anything)."""

from __future__ import annotations

import pytest
import torch

from med3d_ext.models import resnet3d
from med3d_ext.nn import fuse_modules

pytestmark = pytest.mark.skipif(not hasattr(torch.ops, "med3d_ext")
                                or not hasattr(torch.ops.med3d_ext, "conv_bn_relu3d"),
                                reason="compiled extension not loaded")


def _saved_bytes(model, shape):
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    model = model.to(device="meta", dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x.to(memory_format=torch.channels_last_3d))
    return sum(storages.values())


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_keeps_no_more_than_plain(depth, monkeypatch):
    # A residual layer keeps its output (the block output the next block keeps anyway) for the
    # ReLU mask, not the residual: with a downsample branch the residual is that branch's
    # BatchNorm output, which nothing else keeps (it cost ResNet-50 0.17 GiB at the
    # perf-baselines shape before). The fused stem max-pool also drops the full-size ReLU output.
    import med3d_ext.nn.fused as fz

    torch.manual_seed(0)
    shape = (2, 1, 16, 32, 32)
    plain = _saved_bytes(resnet3d(depth, shortcut_type="B"), shape)
    monkeypatch.setattr(fz, "FUSE_STEM_POOL", False)
    fused = _saved_bytes(fuse_modules(resnet3d(depth, shortcut_type="B")), shape)
    monkeypatch.setattr(fz, "FUSE_STEM_POOL", True)
    fused_pool = _saved_bytes(fuse_modules(resnet3d(depth, shortcut_type="B")), shape)
    assert fused <= plain
    assert fused_pool < fused
