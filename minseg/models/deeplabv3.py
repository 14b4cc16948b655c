"""DeepLabV3 (Chen et al. 2017) on a dilated ResNet, as torchvision.models.segmentation builds it.

Same stride-8 backbone and output path as FCN (models/fcn.py); the head is ASPP followed by a
3x3 conv-BN-ReLU and a 1x1 classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from minseg.models.fcn import FCNHead, SegmentationConfig, SegmentationNet, fcn_backbone
from minseg.necks.aspp import ASPP
from minseg.ops.layers import ConvNormAct


class DeepLabHead(nn.Module):
    def __init__(self, cin: int, num_classes: int, rates: tuple[int, ...] = (12, 24, 36)):
        super().__init__()
        self.aspp = ASPP(cin, rates, 256)
        self.block = ConvNormAct(256, 256, 3)
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(self.aspp(x)))


def deeplabv3(cfg: SegmentationConfig) -> SegmentationNet:
    aux = FCNHead(1024, cfg.num_classes) if cfg.aux_loss else None
    return SegmentationNet(fcn_backbone(cfg.depth, cfg.aux_loss), DeepLabHead(2048, cfg.num_classes), aux)


def deeplabv3_resnet50_config(**options) -> SegmentationConfig:
    return SegmentationConfig(depth=50, **options)


def deeplabv3_resnet101_config(**options) -> SegmentationConfig:
    return SegmentationConfig(depth=101, **options)
