"""A small ResNet with MedicalNet's exact module structure and names (conv1/bn1/relu/maxpool/
layer1..4/conv_seg; BasicBlock and Bottleneck; shortcut A = zero-padded strided identity as a
functools.partial, B = Sequential(Conv3d, BatchNorm3d); dilation 2 and 4 in layers 3 and 4),
written here so the fusion tests do not depend on med3d_ext.models. ``width`` scales the
channel counts (MedicalNet: 64) to keep CPU tests fast."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _conv3(cin, cout, stride=1, dilation=1):
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _shortcut_a(x, planes, stride):
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    pad = out.new_zeros(out.size(0), planes - out.size(1), *out.shape[2:])
    return torch.cat([out, pad], dim=1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class ResNet(nn.Module):
    def __init__(self, block, layers, shortcut_type="B", num_seg_classes=2, width=8,
                 in_channels=1):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv3d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], shortcut_type)
        self.layer2 = self._make_layer(block, width * 2, layers[1], shortcut_type, stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], shortcut_type, dilation=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], shortcut_type, dilation=4)
        c = width * 8 * block.expansion
        s = max(8, width // 2)  # MedicalNet: 32 for width 64
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(c, s, 2, stride=2), nn.BatchNorm3d(s), nn.ReLU(inplace=True),
            nn.Conv3d(s, s, 3, padding=1, bias=False), nn.BatchNorm3d(s), nn.ReLU(inplace=True),
            nn.Conv3d(s, num_seg_classes, 1, bias=False))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm3d):  # non-trivial affine parameters
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias, 0, 0.2)

    def _make_layer(self, block, planes, blocks, shortcut_type, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if shortcut_type == "A":
                downsample = partial(_shortcut_a, planes=planes * block.expansion, stride=stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride,
                              bias=False), nn.BatchNorm3d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.conv_seg(self.features(x))


def resnet(depth, shortcut_type="B", width=8, **kw):
    spec = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]),
            26: (Bottleneck, [1, 1, 1, 1]), 50: (Bottleneck, [3, 4, 6, 3])}[depth]
    return ResNet(spec[0], spec[1], shortcut_type, width=width, **kw)
