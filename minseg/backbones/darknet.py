"""DarkNet-53 (YOLOv3's backbone) as YOLACT builds it (dbolya/yolact backbone.py DarkNetBackbone).

A 3x3 stem at full resolution, then five stages; each stage opens with a stride-2 3x3 conv that doubles the
channels, followed by residual blocks (1x1 halving, 3x3 restoring, plus the input, no activation after the sum).
Every conv is conv -> BatchNorm -> LeakyReLU(0.1). The forward returns the stages by stride: c1 (/2) .. c5 (/32).
"""
from __future__ import annotations

import torch
from torch import nn


class ConvBNLeaky(nn.Sequential):
    """conv (no bias) -> BatchNorm2d -> LeakyReLU(0.1), indexed 0/1/2 like the original's darknetconvlayer."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True))


class DarkNetBlock(nn.Module):
    """x + conv2(conv1(x)) with conv1 1x1 to channels/2 and conv2 3x3 back to channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvBNLeaky(channels, channels // 2, 1)
        self.conv2 = ConvBNLeaky(channels // 2, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


class DarkNet(nn.Module):
    """Tensor[N, 3, H, W] -> {"c1": 64 ch /2, "c2": 128 /4, "c3": 256 /8, "c4": 512 /16, "c5": 1024 /32}."""

    def __init__(self, blocks: tuple[int, int, int, int, int] = (1, 2, 8, 8, 4)):
        super().__init__()
        self.stem = ConvBNLeaky(3, 32, 3)
        self.layer1, self.layer2, self.layer3, self.layer4, self.layer5 = (
            nn.Sequential(ConvBNLeaky(cin, cin * 2, 3, stride=2), *(DarkNetBlock(cin * 2) for _ in range(n)))
            for cin, n in zip((32, 64, 128, 256, 512), blocks, strict=True)
        )
        self.out_channels = {"c1": 64, "c2": 128, "c3": 256, "c4": 512, "c5": 1024}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        c5 = self.layer5(c4)
        return {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "c5": c5}


def darknet53() -> DarkNet:
    return DarkNet((1, 2, 8, 8, 4))
