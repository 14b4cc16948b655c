"""YOLACT's two branches: the protonet (k prototype masks for the whole image) and the prediction head shared
by every FPN level (per anchor: box offsets, class logits and k mask coefficients).

Follows dbolya/yolact yolact.py (proto_net built by make_net, PredictionModule) for the yolact_base and
yolact_resnet50 configs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProtoNet(nn.Module):
    """P3 Tensor[N, 256, H, W] -> prototypes Tensor[N, 2H, 2W, k] (ReLU'd, channels last for the mask matmul).

    Three 3x3 convs, bilinear x2 upsampling, one 3x3 conv, a 1x1 conv to k prototypes, then ReLU.
    """

    def __init__(self, in_channels: int = 256, channels: int = 256, num_prototypes: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, channels, 3, padding=1) for c in (in_channels, channels, channels))
        self.up_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, num_prototypes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        # the original follows this with a ReLU kept only for old checkpoints: a no-op on these non-negative values
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.relu(self.up_conv(x))
        x = F.relu(self.out(x))
        return x.permute(0, 2, 3, 1).contiguous()  # (N, 2H, 2W, k)


class PredictionHead(nn.Module):
    """One FPN level Tensor[N, C, H, W] -> loc Tensor[N, H*W*A, 4], conf logits Tensor[N, H*W*A, num_classes],
    mask coefficients Tensor[N, H*W*A, k] (tanh). Rows are ordered (y, x, anchor), matching the priors.

    The same weights run on every level (the original's share_prediction_module).
    """

    def __init__(self, channels: int = 256, num_anchors: int = 3, num_classes: int = 81, num_prototypes: int = 32):
        super().__init__()
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.loc = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.conf = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.mask = nn.Conv2d(channels, num_anchors * num_prototypes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N = x.shape[0]
        x = F.relu(self.conv(x))
        # channel index = anchor * K + k, so NHWC flattens to rows (y, x, anchor)
        loc = self.loc(x).permute(0, 2, 3, 1).reshape(N, -1, 4)                       # (N, H*W*A, 4)
        conf = self.conf(x).permute(0, 2, 3, 1).reshape(N, -1, self.num_classes)      # (N, H*W*A, num_classes)
        mask = self.mask(x).permute(0, 2, 3, 1).reshape(N, -1, self.num_prototypes)  # (N, H*W*A, k)
        return loc, conf, torch.tanh(mask)
