"""YOLACT's FPN: P3-P5 from C3-C5 by lateral 1x1 convs and top-down bilinear resizing, then P6 and P7 by
two stride-2 3x3 convs on P5.

It differs from Mask R-CNN's FPN (necks/fpn.py) in three ways that change the numbers: the top-down path
resizes to the finer map's exact size with bilinear interpolation (18 -> 35 -> 69 at 550 px, not nearest x2),
the 3x3 output convs are followed by a ReLU, and P6 comes from a conv on the ReLU'd P5 (no ReLU after P6/P7).
Follows dbolya/yolact yolact.py FPN.forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class YolactFPN(nn.Module):
    """(c3, c4, c5) -> [p3, p4, p5, p6, p7], each Tensor[N, 256, H/s, W/s] for s = 8, 16, 32, 64, 128."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)               # c3, c4, c5
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)  # p3, p4, p5
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor, c5: torch.Tensor) -> list[torch.Tensor]:
        # top-down: resize the coarser sum to the finer map's size, add the lateral
        t5 = self.lateral[2](c5)
        t4 = F.interpolate(t5, size=c4.shape[-2:], mode="bilinear", align_corners=False) + self.lateral[1](c4)
        t3 = F.interpolate(t4, size=c3.shape[-2:], mode="bilinear", align_corners=False) + self.lateral[0](c3)
        # output convs with ReLU
        p3, p4, p5 = (F.relu(conv(t)) for conv, t in zip(self.output, (t3, t4, t5)))
        # extra levels, no ReLU
        p6 = self.p6(p5)
        p7 = self.p7(p6)
        return [p3, p4, p5, p6, p7]
