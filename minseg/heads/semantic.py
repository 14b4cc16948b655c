"""Panoptic FPN's semantic-segmentation branch (Kirillov et al. 2019), as detectron2's SemSegFPNHead builds it.

Each FPN level p2..p5 is brought to stride 4 by a stack of [conv 3x3 -> GroupNorm(32) -> ReLU -> bilinear x2]
blocks (p2: 1 conv and no upsampling; p3: 1 block; p4: 2; p5: 3); the four maps are summed in order p2 + p3 + p4
+ p5, a 1x1 conv predicts the classes, and one bilinear x4 upsample returns to the padded input size.
Follows detectron2 modeling/meta_arch/semantic_seg.py (SemSegFPNHead); same op order, so the same rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minseg.ops.layers import ConvNormAct


@dataclass(frozen=True)
class SemSegFPNConfig:
    num_classes: int = 54                               # 53 COCO-panoptic stuff classes + 0 = "any thing"
    in_channels: int = 256
    conv_dims: int = 128
    common_stride: int = 4
    strides: tuple[int, ...] = (4, 8, 16, 32)           # of the input levels p2..p5
    norm: str = "gn"                                    # GroupNorm(32, conv_dims): the convs have no bias


class Upsample2x(nn.Module):
    """Bilinear x2 (align_corners=False); a module so that it holds a place in the Sequential like the original's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def scale_head(cfg: SemSegFPNConfig, stride: int) -> nn.Sequential:
    """conv-GN-ReLU blocks, each followed by a x2 upsample unless the level is already at the common stride.
    Indices 0, 2, 4 are the convs (the Upsample modules sit at 1, 3, 5), as in the original's checkpoint."""
    length = max(1, int(math.log2(stride) - math.log2(cfg.common_stride)))
    layers: list[nn.Module] = []
    for k in range(length):
        layers.append(ConvNormAct(cfg.in_channels if k == 0 else cfg.conv_dims, cfg.conv_dims, 3, norm=cfg.norm))
        if stride != cfg.common_stride:
            layers.append(Upsample2x())
    return nn.Sequential(*layers)


class SemSegFPNHead(nn.Module):
    """list of FPN maps [p2, p3, p4, p5] (Tensor[N, 256, H/s, W/s]) -> logits Tensor[N, num_classes, H, W]
    at the padded input size (H = 4 * p2 height)."""

    def __init__(self, cfg: SemSegFPNConfig = SemSegFPNConfig()):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(scale_head(cfg, s) for s in cfg.strides)
        self.predictor = nn.Conv2d(cfg.conv_dims, cfg.num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps (p2..p5), got {len(features)}")
        x = self.levels[0](features[0])
        for level, f in zip(self.levels[1:], features[1:]):
            x = x + level(f)  # kept: accumulated finest-first, the original's float order
        x = self.predictor(x)
        return F.interpolate(x, scale_factor=float(self.cfg.common_stride), mode="bilinear", align_corners=False)


def sem_seg_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255,
                 loss_weight: float = 1.0) -> torch.Tensor:
    """loss_weight * mean over the labelled pixels (targets != ignore_index) of the cross entropy of the logits
    Tensor[N, C, H, W] (the head's output, upsampled to the padded size) against targets Tensor[N, H, W] int64
    padded with ignore_index. Follows detectron2 semantic_seg.py SemSegFPNHead.losses (Panoptic FPN: weight 0.5)."""
    return F.cross_entropy(logits.float(), targets, reduction="mean", ignore_index=ignore_index) * loss_weight
