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

# Mask R-CNN v1 and v2. Both the current layout (Conv2dNormActivation: `.0` conv, `.1` norm) and the pre-0.13
# names of the official v1 file (`rpn.head.conv`, `inner_blocks.0.weight`, `mask_fcn1`) are accepted, as
# torchvision's own _load_from_state_dict upgrades do.
MASK_RCNN: list[Rule] = [
    (r"backbone\.body\.(.*)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.(weight|bias)", r"fpn.lateral.\1.0.\2"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.([01])\.(.*)", r"fpn.lateral.\1.\2.\3"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.(weight|bias)", r"fpn.output.\1.0.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.([01])\.(.*)", r"fpn.output.\1.\2.\3"),
    (r"rpn\.head\.conv\.(weight|bias)", r"rpn.conv.0.\1"),
    (r"rpn\.head\.conv\.(\d)\.0\.(weight|bias)", r"rpn.conv.\1.\2"),
    (r"rpn\.head\.(cls_logits|bbox_pred)\.(weight|bias)", r"rpn.\1.\2"),
    # v1 TwoMLPHead fc6/fc7; v2 FastRCNNConvFCHead = Sequential(4 x conv-norm-relu, Flatten, Linear, ReLU)
    (r"roi_heads\.box_head\.fc6\.(weight|bias)", r"roi_heads.box_head.fc.0.\1"),
    (r"roi_heads\.box_head\.fc7\.(weight|bias)", r"roi_heads.box_head.fc.1.\1"),
    (r"roi_heads\.box_head\.([0-3])\.([01])\.(.*)", r"roi_heads.box_head.conv.\1.\2.\3"),
    (r"roi_heads\.box_head\.5\.(weight|bias)", r"roi_heads.box_head.fc.0.\1"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
    *[(rf"roi_heads\.mask_head\.mask_fcn{k}\.(weight|bias)", rf"roi_heads.mask_head.conv.{k - 1}.0.\1")
      for k in (1, 2, 3, 4)],
    (r"roi_heads\.mask_head\.(\d)\.([01])\.(.*)", r"roi_heads.mask_head.conv.\1.\2.\3"),
    (r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)", r"roi_heads.mask_head.deconv.\1"),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", r"roi_heads.mask_head.predictor.\1"),
]

RULES = {
    "fcn_resnet50": SEGMENTATION_HEAD,
    "fcn_resnet101": SEGMENTATION_HEAD,
    "deeplabv3_resnet50": DEEPLAB_HEAD,
    "deeplabv3_resnet101": DEEPLAB_HEAD,
    "maskrcnn_resnet50_fpn": MASK_RCNN,
    "maskrcnn_resnet50_fpn_v2": MASK_RCNN,
}
DROPS = {arch: [] if arch.startswith("maskrcnn") else SEGMENTATION_DROPS for arch in RULES}
ARCHS = RULES  # the archs this source converts


def segmentation_overrides(state: dict[str, torch.Tensor]) -> dict:
    """num_classes and aux_loss read off the tensor shapes (CLIP-style: no config file needed)."""
    return {"num_classes": state["head.classifier.weight"].shape[0], "aux_loss": "aux_head.classifier.weight" in state}


def mask_rcnn_overrides(state: dict[str, torch.Tensor]) -> dict:
    """num_classes (with background) from the classifier; BatchNorm (eps 1e-5) when the file carries BatchNorm's
    num_batches_tracked counters (random init, v2), else the frozen eps-0 norm of the official v1 weights."""
    overrides = {"num_classes": state["roi_heads.box_predictor.cls_score.weight"].shape[0]}
    if any(k.endswith("num_batches_tracked") for k in state):
        overrides.update(norm="bn", norm_eps=1e-5)
    else:
        overrides.update(norm="frozen", norm_eps=0.0)
    return overrides


OVERRIDES = {arch: segmentation_overrides for arch in RULES}
OVERRIDES.update({arch: mask_rcnn_overrides for arch in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")})
HEAD_KEY = {arch: "head.classifier.weight" for arch in RULES}
HEAD_KEY.update({arch: "roi_heads.box_predictor.cls_score.weight" for arch in OVERRIDES if arch.startswith("maskrcnn")})


def convert(checkpoint: str | os.PathLike | dict, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    state, where = load_source(checkpoint)
    state = rename(state, RULES[arch], DROPS[arch], where)
    overrides = OVERRIDES[arch](state) if HEAD_KEY[arch] in state else {}
    return validate(state, arch, where, **overrides), overrides
