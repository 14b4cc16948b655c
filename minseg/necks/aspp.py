"""Atrous Spatial Pyramid Pooling (DeepLabV3, Chen et al. 2017), as torchvision builds it.

Five parallel branches over the same feature map: a 1x1 conv, three dilated 3x3 convs, and a global
average pool (broadcast back by bilinear upsampling); concatenated and projected to `out_channels`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minseg.ops.layers import ConvNormAct


class ImagePooling(nn.Module):
    """Global context branch: mean over H, W -> 1x1 conv-norm-ReLU -> upsample back to H x W."""

    def __init__(self, cin: int, cout: int, norm: str = "bn"):
        super().__init__()
        self.conv = ConvNormAct(cin, cout, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        y = self.conv(F.adaptive_avg_pool2d(x, 1))  # (N, cout, 1, 1)
        return F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Tensor[N, cin, H, W] -> Tensor[N, out_channels, H, W]."""

    def __init__(self, cin: int, rates: tuple[int, ...] = (12, 24, 36), out_channels: int = 256,
                 dropout: float = 0.5, norm: str = "bn"):
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvNormAct(cin, out_channels, 1, norm=norm)]
            + [ConvNormAct(cin, out_channels, 3, dilation=r, norm=norm) for r in rates]
        )
        self.pooling = ImagePooling(cin, out_channels, norm=norm)
        self.project = ConvNormAct(out_channels * (len(rates) + 2), out_channels, 1, norm=norm)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches] + [self.pooling(x)], dim=1)  # (N, 5*out, H, W)
        return self.dropout(self.project(y))
