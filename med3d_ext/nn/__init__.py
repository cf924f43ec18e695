"""Modules built on the med3d_ext ops: the fused Conv3d + BatchNorm3d + ReLU block and the
in-place fusion / BatchNorm folding of MedicalNet-style ResNets."""

from .fused import (ConvBNReLU3d, conv_bn_act, convert_sync_batchnorm, fold_bn, fuse_modules,
                    set_memory_saving, unfuse_modules)

__all__ = ["ConvBNReLU3d", "conv_bn_act", "fuse_modules", "unfuse_modules", "fold_bn",
           "convert_sync_batchnorm", "set_memory_saving"]
