"""MedicalNet-compatible 3D ResNets (Chen, Ma, Zheng, "Med3D", arXiv 1904.00625).

The network is exactly Tencent MedicalNet's ``models/resnet.py``, so its released ``.pth``
files load key for key and compute the same function:

- stem: conv 7^3 stride 2 (padding 3, no bias), BN, ReLU, max-pool 3^3 stride 2 (padding 1);
- ``layer1`` stride 1, ``layer2`` stride 2, ``layer3`` / ``layer4`` stride 1 with dilation 2 / 4
  (padding = dilation for the 3^3 convs).  This is what other loaders get wrong: a torchvision-
  style strided layer3/4 loads the same tensors but computes a different network;
- shortcut type "A" (parameter-free: subsample by the stride, zero-pad the channels) or "B"
  (1^3 conv with stride, then BN);
- segmentation head ``conv_seg``: ConvTranspose3d(C, 32, 2, stride 2), BN, ReLU,
  Conv3d(32, 32, 3, pad 1), BN, ReLU, Conv3d(32, num_seg_classes, 1).

Spatial sizes: every stride-2 stage maps n -> ceil(n / 2), so the encoder output is
``ceil(ceil(ceil(n/2)/2)/2)`` (about n/8) and the logits are twice that (about n/4).

Fusion (``fused=True`` / ``med3d_ext.nn.fuse_modules``) never renames anything: every conv and
its BatchNorm are sibling modules (``conv1``/``bn1``, ...) exactly as in MedicalNet, and each
block's ``forward`` is a short, fixed conv -> bn -> relu chain that a fuser can swap for the
fused op on the same parameters.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from .._args import ArgumentTypeError, int_arg, is_int

__all__ = [
    "DEPTHS",
    "ENCODER_ROOTS",
    "BasicBlock",
    "Bottleneck",
    "DownsampleA",
    "ResNet3dEncoder",
    "ResNet3d",
    "MedicalNetSegHead",
    "resnet3d",
    "resnet3d_encoder",
    "encoder_out_channels",
    "default_shortcut_type",
    "apply_fusion",
]

# depth -> (block name, blocks per layer, shortcut type of MedicalNet's released weights)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int], str]] = {
    10: ("BasicBlock", (1, 1, 1, 1), "B"),
    18: ("BasicBlock", (2, 2, 2, 2), "A"),
    34: ("BasicBlock", (3, 4, 6, 3), "A"),
    50: ("Bottleneck", (3, 4, 6, 3), "B"),
    101: ("Bottleneck", (3, 4, 23, 3), "B"),
    152: ("Bottleneck", (3, 8, 36, 3), "B"),
    200: ("Bottleneck", (3, 24, 36, 3), "B"),
}

# top-level module names of the encoder (everything else in a model is a head)
ENCODER_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")

# (planes, stride, dilation) of layer1..layer4; MedicalNet keeps layer3/4 at 1/8 and dilates.
_STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))


def _check_depth(depth) -> int:
    # any integer: a numpy integer (e.g. read from a config or an array) or a 0-d integer
    # tensor is a depth too; a wrong type is a TypeError (also a ValueError, as it was)
    if not is_int(depth):
        raise ArgumentTypeError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    if operator.index(depth) not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    return operator.index(depth)


def default_shortcut_type(depth: int) -> str:
    """The shortcut type of MedicalNet's released weights for ``depth`` ("A" or "B")."""
    return DEPTHS[_check_depth(depth)][2]


def _check_shortcut(shortcut_type, depth: int) -> str:
    if shortcut_type is None:
        return default_shortcut_type(depth)
    if not isinstance(shortcut_type, str) or shortcut_type.upper() not in ("A", "B"):
        raise ValueError(f"shortcut_type must be 'A', 'B' or None, got {shortcut_type!r}")
    return shortcut_type.upper()


def encoder_out_channels(depth: int) -> int:
    """Channels of the encoder output: 512 for BasicBlock depths, 2048 for Bottleneck ones."""
    block = DEPTHS[_check_depth(depth)][0]
    return 512 * (BasicBlock if block == "BasicBlock" else Bottleneck).expansion


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    # MedicalNet's dilated 3^3 conv: padding = dilation keeps the size at stride 1
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class DownsampleA(nn.Module):
    """Type-A shortcut: parameter-free. Subsamples by ``stride`` (MedicalNet's
    ``avg_pool3d(kernel_size=1, stride=s)``, i.e. takes every s-th voxel) and zero-pads the
    channels up to ``out_channels``. Has no state-dict entries."""

    def __init__(self, out_channels: int, stride: int):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        pad = self.out_channels - x.shape[1]
        if pad < 0:
            raise ValueError(f"DownsampleA: input has {x.shape[1]} channels, more than "
                             f"out_channels={self.out_channels}")
        if pad:
            # F.pad's last pair pads dim 1 (channels) here: (W, H, D, C) pairs from the back
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad))
        return x

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


def _downsample(shortcut_type: str, cin: int, cout: int, stride: int) -> nn.Module:
    if shortcut_type == "A":
        return DownsampleA(cout, stride)
    # type B; Sequential so the keys are downsample.0.* (conv) and downsample.1.* (BN)
    return nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))


class BasicBlock(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 (+ shortcut) -> relu, both convs 3^3."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """1^3 conv1 -> bn1 -> relu -> 3^3 conv2 (stride, dilation) -> bn2 -> relu -> 1^3 conv3
    -> bn3 (+ shortcut) -> relu; output channels = 4 x planes."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def _init_medicalnet(module: nn.Module) -> None:
    # MedicalNet's init: kaiming-normal (fan_out) for Conv3d, BN to identity; the
    # ConvTranspose3d of the head keeps PyTorch's default, as in MedicalNet.
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet3dEncoder(nn.Module):
    """MedicalNet's encoder. ``state_dict()`` keys are exactly MedicalNet's encoder keys
    (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so it can be saved and loaded on its own.

    forward(x: (N, in_channels, D, H, W)) -> (N, out_channels, ~D/8, ~H/8, ~W/8)
    """

    def __init__(self, depth: int, shortcut_type: str | None = None, in_channels: int = 1):
        super().__init__()
        depth = _check_depth(depth)
        shortcut_type = _check_shortcut(shortcut_type, depth)
        if isinstance(in_channels, bool) or not isinstance(in_channels, numbers.Integral) \
                or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        in_channels = int(in_channels)
        block_name, layers, _ = DEPTHS[depth]
        block = BasicBlock if block_name == "BasicBlock" else Bottleneck
        self.depth = depth
        self.shortcut_type = shortcut_type
        self.in_channels = in_channels
        self.out_channels = 512 * block.expansion

        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = 64
        for i, ((planes, stride, dilation), n_blocks) in enumerate(zip(_STAGES, layers), 1):
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = _downsample(shortcut_type, inplanes, planes * block.expansion, stride)
            blocks = [block(inplanes, planes, stride, dilation, downsample)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes, 1, dilation) for _ in range(1, n_blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        _init_medicalnet(self)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (N, out_channels, ~D/8, ~H/8, ~W/8)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected input (N, {self.in_channels}, D, H, W) tensor, got "
                            f"{type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, D, H, W), "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():  # else conv3d's "expected scalar type Long but found Float"
            raise TypeError(f"expected a floating-point input (N, {self.in_channels}, D, H, W), "
                            f"got dtype {x.dtype} (convert with x.float())")
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    @property
    def arch(self) -> dict:
        """Everything needed to rebuild this module (see ``med3d_ext.models.build_model``)."""
        return {"task": "encoder", "depth": self.depth, "shortcut_type": self.shortcut_type,
                "in_channels": self.in_channels}

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut_type={self.shortcut_type!r}"


class MedicalNetSegHead(nn.Sequential):
    """MedicalNet's ``conv_seg``: (N, C, d, h, w) -> (N, num_classes, 2d, 2h, 2w).

    Indices (and so keys) 0..6: ConvTranspose3d(C, 32, 2, stride 2) with bias, BN, ReLU,
    Conv3d(32, 32, 3, pad 1, no bias), BN, ReLU, Conv3d(32, num_classes, 1, no bias).
    """

    def __init__(self, in_channels: int, num_classes: int, mid_channels: int = 32):
        # a float (2.0) is a TypeError (and a ValueError, as before); 0 a ValueError
        num_classes = int_arg("MedicalNetSegHead: num_classes must be a positive int",
                              num_classes, 1)
        super().__init__(
            nn.ConvTranspose3d(in_channels, mid_channels, 2, stride=2),
            nn.BatchNorm3d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid_channels, mid_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid_channels, num_classes, 1, bias=False),
        )
        self.num_classes = num_classes
        _init_medicalnet(self)


class ResNet3d(ResNet3dEncoder):
    """MedicalNet's full segmentation network: the encoder's keys at the root plus
    ``conv_seg.*`` -- identical to MedicalNet's ``state_dict()`` (without ``module.``).

    forward(x) -> logits (N, num_seg_classes, ~D/4, ~H/4, ~W/4); features(x) -> encoder output.
    """

    def __init__(self, depth: int, num_seg_classes: int = 2, shortcut_type: str | None = None,
                 in_channels: int = 1):
        # checked here, under its own name (the head's check said "num_classes")
        num_seg_classes = int_arg("ResNet3d: num_seg_classes must be a positive int",
                                  num_seg_classes, 1)
        super().__init__(depth, shortcut_type, in_channels)
        self.num_seg_classes = num_seg_classes
        self.conv_seg = MedicalNetSegHead(self.out_channels, num_seg_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.features(x))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's entries only (MedicalNet's released layout, without ``module.``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("conv_seg.")}

    @property
    def arch(self) -> dict:
        return {"task": "segmentation", "depth": self.depth,
                "shortcut_type": self.shortcut_type, "in_channels": self.in_channels,
                "num_classes": self.num_seg_classes}


def check_flag(fn: str, name: str, v) -> bool:
    """A flag argument as a bool; anything else is a TypeError naming it (fused="no" built a
    fused model: a string, or None, was taken by its truth value)."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"med3d_ext.models.{fn}: argument '{name}' must be True or False, got "
                        f"{v!r}")
    return bool(v)


def apply_fusion(model: nn.Module) -> nn.Module:
    """Switch ``model``'s conv/BN/ReLU chains to the fused op (same modules, same keys).

    Delegates to ``med3d_ext.nn.fuse_modules``; raises NotImplementedError while that package
    is not available in this build."""
    try:
        from med3d_ext.nn import fuse_modules
    except ImportError as e:
        raise NotImplementedError(
            "fused=True needs med3d_ext.nn.fuse_modules (the fused ConvBNReLU3d forward path), "
            f"which cannot be imported in this build ({e}). Build the model with fused=False, "
            "or call med3d_ext.nn.fuse_modules(model) once med3d_ext.nn is available.") from e
    out = fuse_modules(model)
    return model if out is None else out


def resnet3d(depth: int, num_seg_classes: int = 2, shortcut_type: str | None = None,
             in_channels: int = 1, fused: bool = False) -> ResNet3d:
    """MedicalNet's 3D ResNet-``depth`` with its ``conv_seg`` head.

    Args:
        depth: one of 10, 18, 34, 50, 101, 152, 200.
        num_seg_classes: output channels of the head.
        shortcut_type: "A" or "B"; None = that of MedicalNet's released weights
            (B for 10/50/101/152/200, A for 18/34).
        in_channels: input channels (MedicalNet: 1; >1 is supported, and
            ``load_medicalnet_weights`` adapts the released one-channel ``conv1``).
        fused: switch the forward to the fused conv+BN+ReLU op (``med3d_ext.nn``).
    """
    fused = check_flag("resnet3d", "fused", fused)
    model = ResNet3d(depth, num_seg_classes, shortcut_type, in_channels)
    return apply_fusion(model) if fused else model


def resnet3d_encoder(depth: int, shortcut_type: str | None = None, in_channels: int = 1,
                     fused: bool = False) -> ResNet3dEncoder:
    """The encoder alone (keys conv1, bn1, layer1..4), for multi-head and transfer models."""
    fused = check_flag("resnet3d_encoder", "fused", fused)
    model = ResNet3dEncoder(depth, shortcut_type, in_channels)
    return apply_fusion(model) if fused else model

