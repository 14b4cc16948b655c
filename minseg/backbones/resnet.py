"""ResNet-18/34/50/101 as one configurable module.

The three originals minseg follows differ in a few switches, not in structure:
  torchvision  (FCN, DeepLabV3, Mask R-CNN, smp U-Net): stride in the 3x3 conv ("v1.5"), BatchNorm or
               FrozenBatchNorm2d (affine arithmetic), optional dilation instead of stride in the last stages.
  detectron2   (Panoptic FPN, MSRA weights): stride in the first 1x1 conv, FrozenBN through F.batch_norm.
  YOLACT       (backbone.py): the torchvision layout with plain BatchNorm2d.
Attribute names follow torchvision's (conv1, bn1, layer1..4, downsample.0/1); other checkpoints are renamed
into them in minseg/convert/. The forward returns the stages in `out_features`, by stride: c1 (stem, /2) and
c2..c5 (/4../32); a stage not asked for is freed as soon as the next one is computed (like torchvision's
IntermediateLayerGetter and detectron2's out_features), so a head that reads c5 alone does not hold c1..c4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minseg.ops.layers import MaxPool2d, make_norm


STAGES = ("c1", "c2", "c3", "c4", "c5")


@dataclass(frozen=True)
class ResNetConfig:
    block: str                      # "basic" (18/34) or "bottleneck" (50/101)
    layers: tuple[int, int, int, int]
    stride_in_1x1: bool = False     # True: detectron2/MSRA bottleneck, stride on conv1 instead of conv2
    norm: str = "bn"                # "bn", "frozen" (affine) or "frozen_bn" (F.batch_norm); see ops/layers.py
    norm_eps: float = 1e-5
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)  # for layer2, layer3, layer4
    in_channels: int = 3
    out_features: tuple[str, ...] = STAGES  # the stages forward returns

    def __post_init__(self):
        if not self.out_features or not set(self.out_features) <= set(STAGES):
            raise ValueError(f"out_features must be some of {STAGES}, got {self.out_features}")


DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def resnet_config(depth: int, **options) -> ResNetConfig:
    """ResNetConfig for a standard depth; `options` set the other fields (norm, dilation, ...)."""
    if depth not in DEPTHS:
        raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
    block, layers = DEPTHS[depth]
    return ResNetConfig(block=block, layers=layers, **options)


def conv_norm(cin: int, cout: int, k: int, stride: int, dilation: int, cfg: ResNetConfig) -> tuple[nn.Conv2d, nn.Module]:
    pad = dilation if k == 3 else 0
    return nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False), make_norm(cfg.norm, cout, cfg.norm_eps)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None, cfg: ResNetConfig):
        super().__init__()
        if dilation > 1:
            raise ValueError("BasicBlock does not support dilation (neither does torchvision)")
        self.conv1, self.bn1 = conv_norm(cin, planes, 3, stride, 1, cfg)
        self.conv2, self.bn2 = conv_norm(planes, planes, 3, 1, 1, cfg)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)  # one statement per conv, so its input is freed before the norm runs
        out = self.bn2(out)
        out += x if self.downsample is None else self.downsample(x)  # shortcut after the main path: see Bottleneck
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None, cfg: ResNetConfig):
        super().__init__()
        s1, s3 = (stride, 1) if cfg.stride_in_1x1 else (1, stride)
        self.conv1, self.bn1 = conv_norm(cin, planes, 1, s1, 1, cfg)
        self.conv2, self.bn2 = conv_norm(planes, planes, 3, s3, dilation, cfg)
        self.conv3, self.bn3 = conv_norm(planes, planes * 4, 1, 1, 1, cfg)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)  # one statement per conv, so its input is freed before the norm runs
        out = self.relu(self.bn2(out))
        out = self.conv3(out)
        out = self.bn3(out)
        # kept: the shortcut runs after the main path, torchvision's order: autograd sums x's gradients from its two
        # uses in an order set by the forward's, so only this order gives the original's gradients bit for bit
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """Tensor[N, 3, H, W] -> {"c1": /2, "c2": /4, "c3": /8, "c4": /16, "c5": /32}, the cfg.out_features among them
    (dilated stages keep their input stride)."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        self.conv1, self.bn1 = conv_norm(cfg.in_channels, 64, 7, 2, 1, cfg)
        self.conv1.padding = (3, 3)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)  # nn.MaxPool2d's math, 56 MB less in training

        self.inplanes, self.dilation = 64, 1
        dilate = (False,) + tuple(cfg.replace_stride_with_dilation)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, planes, n, stride=1 if i == 0 else 2, dilate=dilate[i])
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), cfg.layers))
        )
        self.out_channels = {"c1": 64, "c2": 64 * block.expansion, "c3": 128 * block.expansion,
                             "c4": 256 * block.expansion, "c5": 512 * block.expansion}

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:  # torchvision: the stage keeps its resolution; its first block still uses the old dilation
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(*conv_norm(self.inplanes, planes * block.expansion, 1, stride, 1, self.cfg))
        layers = [block(self.inplanes, planes, stride, previous_dilation, downsample, self.cfg)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, self.dilation, None, self.cfg) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        keep, features = self.cfg.out_features, {}
        x = self.relu(self.bn1(self.conv1(x)))  # c1: (N, 64, H/2, W/2)
        if "c1" in keep:
            features["c1"] = x
        x = self.maxpool(x)
        for name, layer in zip(STAGES[1:], (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if name in keep:
                features[name] = x
        return features


def resnet(depth: int, **options) -> ResNet:
    """ResNet of a standard depth, e.g. resnet(50, norm="frozen", replace_stride_with_dilation=(False, True, True))."""
    return ResNet(resnet_config(depth, **options))
