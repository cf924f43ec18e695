"""Typed wrappers over ``torch.ops.med3d_ext.*`` with fake kernels and autograd registered.

Every function here takes keyword options, routes to the compiled kernel when the extension is
loaded and to :mod:`med3d_ext.reference` otherwise.
"""

from .bn_stats import bn_stats
from .conv_bn_relu import conv_bias_relu3d, conv_bn_relu3d, conv_bn_relu_maxpool3d
from .resample import (affine_resample, affine_resample_pair, pack_intensity, resample_to_spacing,
                       resize)
from .seg_loss import SegLabelError, multihead_seg_loss

__all__ = ["bn_stats", "conv_bn_relu3d", "conv_bias_relu3d", "conv_bn_relu_maxpool3d", "multihead_seg_loss",
           "SegLabelError", "affine_resample", "affine_resample_pair", "resize",
           "resample_to_spacing", "pack_intensity"]
