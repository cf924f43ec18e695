"""Batched GPU/CPU augmentation built on the fused resample ops."""

from .augment import RandomAugment3D

__all__ = ["RandomAugment3D"]
