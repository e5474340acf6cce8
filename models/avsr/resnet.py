"""The 2D ResNet-18 trunk of lip-reading front ends (Ma et al., auto_avsr), applied to every video frame.

Parameter names follow auto_avsr's `ResNet`/`BasicBlock` (`layer1.0.conv1.weight`, `...downsample.0`), so
its visual front-end weights load with `checkpoint_prefix` set (see docs/avsr.md).
"""

from __future__ import annotations

import torch
from torch import nn


def make_activation(kind: str, channels: int) -> nn.Module:
    """`prelu` (per-channel, Ma et al. 2021), `relu`, or `swish` (SiLU, auto_avsr's released models)."""
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "swish":
        return nn.SiLU(inplace=True)
    raise ValueError(f"unknown activation {kind!r}; choose prelu, relu or swish")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, activation: str = "prelu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = make_activation(activation, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = make_activation(activation, channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + residual)


class ResNet18Trunk(nn.Module):
    """[N, C, H, W] -> [N, 8C]: four stages of two blocks (C, 2C, 4C, 8C channels), global average pool."""

    def __init__(self, base_channels: int = 64, activation: str = "prelu"):
        super().__init__()
        c = base_channels
        widths, strides = (c, 2 * c, 4 * c, 8 * c), (1, 2, 2, 2)
        in_channels = c
        for index, (width, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [
                BasicBlock(in_channels, width, stride, activation),
                BasicBlock(width, width, 1, activation),
            ]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = 8 * c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.avgpool(x).flatten(1)
