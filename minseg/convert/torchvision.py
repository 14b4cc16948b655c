"""torchvision checkpoints -> minseg. Backbone names already match (minseg's ResNet uses torchvision's
attribute names); the heads are renamed by ordered rules. Mask R-CNN rules live in this file too."""
from __future__ import annotations

import os

import torch

from minseg.convert.common import Drop, Rule, load_source, rename, validate

SEGMENTATION_HEAD: list[Rule] = [
    (r"backbone\.(.*)", r"backbone.\1"),
    # FCNHead: Sequential(conv, bn, relu, dropout, conv)
    (r"(aux_)?classifier\.0\.weight", r"\1head.block.0.weight"),
    (r"(aux_)?classifier\.1\.(.*)", r"\1head.block.1.\2"),
    (r"(aux_)?classifier\.4\.(.*)", r"\1head.classifier.\2"),
]

DEEPLAB_HEAD: list[Rule] = [
    (r"backbone\.(.*)", r"backbone.\1"),
    # DeepLabHead: Sequential(ASPP, conv, bn, relu, conv); ASPP.convs = [1x1, 3 dilated, pooling]
    (r"classifier\.0\.convs\.([0-3])\.(.*)", r"head.aspp.branches.\1.\2"),
    (r"classifier\.0\.convs\.4\.1\.(.*)", r"head.aspp.pooling.conv.0.\1"),
    (r"classifier\.0\.convs\.4\.2\.(.*)", r"head.aspp.pooling.conv.1.\1"),
    (r"classifier\.0\.project\.([01])\.(.*)", r"head.aspp.project.\1.\2"),
    (r"classifier\.1\.(.*)", r"head.block.0.\1"),
    (r"classifier\.2\.(.*)", r"head.block.1.\1"),
    (r"classifier\.4\.(.*)", r"head.classifier.\1"),
    (r"aux_classifier\.0\.weight", r"aux_head.block.0.weight"),
    (r"aux_classifier\.1\.(.*)", r"aux_head.block.1.\1"),
    (r"aux_classifier\.4\.(.*)", r"aux_head.classifier.\1"),
]

SEGMENTATION_DROPS: list[Drop] = [
    (r"backbone\.fc\..*", "classification layer of an ImageNet ResNet; segmentation models have none"),
]

RULES = {
    "fcn_resnet50": SEGMENTATION_HEAD,
    "fcn_resnet101": SEGMENTATION_HEAD,
    "deeplabv3_resnet50": DEEPLAB_HEAD,
    "deeplabv3_resnet101": DEEPLAB_HEAD,
}
DROPS = {arch: SEGMENTATION_DROPS for arch in RULES}
ARCHS = RULES  # the archs this source converts


def segmentation_overrides(state: dict[str, torch.Tensor]) -> dict:
    """num_classes and aux_loss read off the tensor shapes (CLIP-style: no config file needed)."""
    return {"num_classes": state["head.classifier.weight"].shape[0], "aux_loss": "aux_head.classifier.weight" in state}


OVERRIDES = {arch: segmentation_overrides for arch in RULES}


def convert(checkpoint: str | os.PathLike | dict, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    state, where = load_source(checkpoint)
    state = rename(state, RULES[arch], DROPS[arch], where)
    overrides = OVERRIDES[arch](state) if "head.classifier.weight" in state else {}
    return validate(state, arch, where, **overrides), overrides
