"""A self-contained MedicalNet-shaped 3D ResNet: the plain-PyTorch baseline of ``train_step``
when ``med3d_ext.models`` is not available.

Same architecture and module names as MedicalNet (conv1/bn1/maxpool, layer1..layer4 with
dilation 2 and 4 in the last two stages, conv_seg decoder at 1/4 of the input size), so that its
timings are comparable with ``med3d_ext.models.resnet3d``. Written for the benchmarks only.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


def _conv3(cin, cout, stride=1, dilation=1):
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        r = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + r)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        r = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + r)


class _ShortcutA(nn.Module):
    """Type-A shortcut (ResNet-18/34 weights): strided identity, zero-padded channels."""

    def __init__(self, cout, stride):
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x):
        y = F.avg_pool3d(x, 1, self.stride)
        return F.pad(y, (0, 0, 0, 0, 0, 0, 0, self.cout - y.shape[1]))


LAYERS = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


class ResNet3d(nn.Module):
    def __init__(self, depth=10, num_seg_classes=2, shortcut_type=None, in_channels=1):
        super().__init__()
        block, layers = LAYERS[depth]
        self.shortcut_type = shortcut_type or ("A" if depth in (18, 34) else "B")
        self.inplanes = 64
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make(block, 64, layers[0])
        self.layer2 = self._make(block, 128, layers[1], stride=2)
        self.layer3 = self._make(block, 256, layers[2], dilation=2)
        self.layer4 = self._make(block, 512, layers[3], dilation=4)
        f = 512 * block.expansion
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(f, 32, 2, stride=2), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
            nn.Conv3d(32, 32, 3, padding=1, bias=False), nn.BatchNorm3d(32), nn.ReLU(inplace=True),
            nn.Conv3d(32, num_seg_classes, 1, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def _make(self, block, planes, n, stride=1, dilation=1):
        down = None
        cout = planes * block.expansion
        if stride != 1 or self.inplanes != cout:
            if self.shortcut_type == "A":
                down = _ShortcutA(cout, stride)
            else:
                down = nn.Sequential(nn.Conv3d(self.inplanes, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))
        mods = [block(self.inplanes, planes, stride, dilation, down)]
        self.inplanes = cout
        mods += [block(cout, planes, dilation=dilation) for _ in range(1, n)]
        return nn.Sequential(*mods)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.conv_seg(self.features(x))
