"""Feature Pyramid Network (Lin et al. 2017): backbone stages c2..c5 -> p2..p6, all with the same width.

    c5 -> 1x1 lateral ------------------------------> 3x3 output -> p5 -> max-pool (k=1, s=2) -> p6
    c4 -> 1x1 lateral + nearest-upsampled(above) ----> 3x3 output -> p4
    ...                                                             (down to p2)

The top-down path adds the upsampled PRE-output map of the level above, so the 3x3 output convs never feed
each other. Both originals compute exactly this (torchvision ops/feature_pyramid_network.py with
LastLevelMaxPool; detectron2 modeling/backbone/fpn.py with its LastLevelMaxPool); they differ in how the
upsampling size is given, and torchvision's Mask R-CNN v2 puts a BatchNorm after every conv. Both are options.

Parameter names: `lateral.{i}.0` / `output.{i}.0` are the convs of level i (0 = c2), `.1` their norm if any.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minseg.ops.layers import c2_xavier_fill, make_norm


@dataclass(frozen=True)
class FPNConfig:
    in_channels: tuple[int, ...] = (256, 512, 1024, 2048)   # of c2..c5 (ResNet-50/101)
    out_channels: int = 256
    norm: str | None = None         # None: convs with bias; "bn", "frozen", "gn": conv without bias + that norm
    norm_eps: float = 1e-5
    upsample: str = "size"          # "size": interpolate to the lateral's size (torchvision);
    #                                 "scale2": scale_factor=2 (detectron2); equal whenever sizes halve exactly
    extra_pool: bool = True         # append p6 = p5[::2, ::2] (max_pool2d kernel 1, stride 2)


def conv_norm(cin: int, cout: int, kernel_size: int, cfg: FPNConfig) -> nn.Sequential:
    """conv (+ norm), no activation: indexed 0/1 like torchvision's Conv2dNormActivation(activation_layer=None)."""
    conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=cfg.norm is None)
    return nn.Sequential(conv) if cfg.norm is None else nn.Sequential(conv, make_norm(cfg.norm, cout, cfg.norm_eps))


class FPN(nn.Module):
    """{"c2": Tensor[N, C2, H/4, W/4], ..., "c5"} -> {"p2": Tensor[N, 256, H/4, W/4], ..., "p5"[, "p6"]}."""

    def __init__(self, cfg: FPNConfig = FPNConfig()):
        super().__init__()
        if cfg.upsample not in ("size", "scale2"):
            raise ValueError(f"upsample must be 'size' or 'scale2', got {cfg.upsample!r}")
        self.cfg = cfg
        self.lateral = nn.ModuleList(conv_norm(c, cfg.out_channels, 1, cfg) for c in cfg.in_channels)
        self.output = nn.ModuleList(conv_norm(cfg.out_channels, cfg.out_channels, 3, cfg) for _ in cfg.in_channels)
        for m in self.modules():  # both originals: kaiming_uniform(a=1), zero bias (detectron2's c2_xavier_fill)
            if isinstance(m, nn.Conv2d):
                c2_xavier_fill(m)

    def forward(self, c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = 6 - len(self.cfg.in_channels)  # c2 when four stages come in
        feats = [c[f"c{k}"] for k in range(first, 6)]
        top = self.lateral[-1](feats[-1])
        outs = [self.output[-1](top)]
        for i in range(len(feats) - 2, -1, -1):
            lateral = self.lateral[i](feats[i])
            if self.cfg.upsample == "size":
                up = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            else:
                up = F.interpolate(top, scale_factor=2.0, mode="nearest")
            top = lateral + up  # kept: lateral + top-down, both originals' order
            outs.insert(0, self.output[i](top))
        if self.cfg.extra_pool:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return {f"p{first + i}": p for i, p in enumerate(outs)}
