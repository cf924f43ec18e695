"""Flag arguments are True or False: a string ("no") or None was taken by its truth value
(resnet3d(10, fused="no") built a fused model, align_corners="no" sampled with aligned
corners). Found by a black-box audit of the Python API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import med3d_ext as m3d
from med3d_ext.models import Med3DNet, freeze_encoder, resnet3d, resnet3d_encoder


@pytest.mark.parametrize("bad", ["no", None, 1.0])
def test_flags_must_be_bools(bad):
    with pytest.raises(TypeError, match=r"resnet3d: argument 'fused' must be True or False"):
        resnet3d(10, fused=bad)
    with pytest.raises(TypeError, match=r"resnet3d_encoder: argument 'fused'"):
        resnet3d_encoder(10, fused=bad)
    with pytest.raises(TypeError, match=r"Med3DNet: argument 'fused'"):
        Med3DNet(10, {"a": 2}, fused=bad)
    with pytest.raises(TypeError, match=r"freeze_encoder: argument 'bn_eval'"):
        freeze_encoder(resnet3d(10), bn_eval=bad)
    with pytest.raises(TypeError, match=r"set_memory_saving: argument 'on'"):
        m3d.nn.set_memory_saving(nn.Linear(1, 1), on=bad)
    with pytest.raises(TypeError, match=r"RandomAugment3D: 'align_corners' must be True or False"):
        m3d.transforms.RandomAugment3D(align_corners=bad)
    x = torch.randn(1, 1, 4, 4, 4)
    theta = torch.eye(3, 4)[None]
    with pytest.raises(TypeError, match=r"affine_resample: argument 'align_corners'"):
        m3d.ops.affine_resample(x, theta, (1, 1, 4, 4, 4), align_corners=bad)
    with pytest.raises(TypeError, match=r"affine_resample_pair: argument 'align_corners'"):
        m3d.ops.affine_resample_pair(x, torch.zeros(1, 4, 4, 4, dtype=torch.uint8), theta,
                                     (1, 1, 4, 4, 4), align_corners=bad)


def test_numpy_bools_and_bools_are_flags():
    assert getattr(type(resnet3d(10, fused=np.bool_(False))), "_m3d_root", None) is None
    m3d.nn.set_memory_saving(nn.Linear(1, 1), on=np.bool_(True))
    m3d.transforms.RandomAugment3D(align_corners=np.bool_(True))
    with pytest.raises(TypeError, match=r"set_memory_saving: argument 'model' must be an "
                                        r"nn.Module, got NoneType"):
        m3d.nn.set_memory_saving(None)
