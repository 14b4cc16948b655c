"""dbolya/yolact checkpoints (`yolact_base_54_800000.pth`, `yolact_resnet50_54_800000.pth`, ...) -> minseg.

The original saves `torch.save(model.state_dict())`: a plain dict of tensors, the 2019 releases in the legacy
(non-zip) format, with BatchNorm's `num_batches_tracked` counters. Its own `Yolact.load_weights` deletes two
kinds of keys before a strict load; the same deletions are named drops here. The training-only semantic
segmentation conv is kept (the semantic loss needs it).
"""
from __future__ import annotations

import os
import re

import torch

from minseg.convert.common import Drop, Rule, load_source, rename, validate
from minseg.errors import CheckpointError

RULES: list[Rule] = [
    # ResNetBackbone keeps its stages in a ModuleList `layers`; minseg's ResNet names them like torchvision
    (r"backbone\.layers\.0\.(.*)", r"backbone.layer1.\1"),
    (r"backbone\.layers\.1\.(.*)", r"backbone.layer2.\1"),
    (r"backbone\.layers\.2\.(.*)", r"backbone.layer3.\1"),
    (r"backbone\.layers\.3\.(.*)", r"backbone.layer4.\1"),
    (r"backbone\.layers\.4\.(.*)", r"backbone.layer5.\1"),  # DarkNet-53's fifth stage
    (r"backbone\.(conv1|bn1)\.(.*)", r"backbone.\1.\2"),
    (r"backbone\._preconv\.(.*)", r"backbone.stem.\1"),     # DarkNet-53's stem
    # FPN: lat_layers/pred_layers are stored coarse-to-fine (index 0 = C5/P5); minseg indexes them fine-to-coarse
    (r"fpn\.lat_layers\.0\.(.*)", r"fpn.lateral.2.\1"),
    (r"fpn\.lat_layers\.1\.(.*)", r"fpn.lateral.1.\1"),
    (r"fpn\.lat_layers\.2\.(.*)", r"fpn.lateral.0.\1"),
    (r"fpn\.pred_layers\.0\.(.*)", r"fpn.output.2.\1"),
    (r"fpn\.pred_layers\.1\.(.*)", r"fpn.output.1.\1"),
    (r"fpn\.pred_layers\.2\.(.*)", r"fpn.output.0.\1"),
    (r"fpn\.downsample_layers\.0\.(.*)", r"fpn.p6.\1"),
    (r"fpn\.downsample_layers\.1\.(.*)", r"fpn.p7.\1"),
    # proto_net is a Sequential with ReLUs and an interpolation between the convs (make_net)
    (r"proto_net\.0\.(.*)", r"protonet.convs.0.\1"),
    (r"proto_net\.2\.(.*)", r"protonet.convs.1.\1"),
    (r"proto_net\.4\.(.*)", r"protonet.convs.2.\1"),
    (r"proto_net\.8\.(.*)", r"protonet.up_conv.\1"),
    (r"proto_net\.10\.(.*)", r"protonet.out.\1"),
    # the shared PredictionModule: only prediction_layers.0 holds weights
    (r"prediction_layers\.0\.upfeature\.0\.(.*)", r"head.conv.\1"),
    (r"prediction_layers\.0\.bbox_layer\.(.*)", r"head.loc.\1"),
    (r"prediction_layers\.0\.conf_layer\.(.*)", r"head.conf.\1"),
    (r"prediction_layers\.0\.mask_layer\.(.*)", r"head.mask.\1"),
    (r"semantic_seg_conv\.(.*)", r"semantic.\1"),  # used by the semantic segmentation loss only
]

DROPS: list[Drop] = [
    (r"backbone\.layer(?!s\.).*", "old torchvision-style backbone.layerN keys; the original's load_weights deletes them"),
    (r"fpn\.downsample_layers\.([2-9]|\d\d+)\..*",
     "v1.0 checkpoints carry extra downsample layers; load_weights deletes those beyond num_downsample=2"),
]

ARCHS = {  # arch -> the backbone its checkpoints carry
    "yolact_resnet50": "ResNet-50",
    "yolact_resnet101": "ResNet-101",
    "yolact_im700": "ResNet-101",
    "yolact_darknet53": "DarkNet-53",
}


def fill_num_batches_tracked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add a zero `num_batches_tracked` beside every BatchNorm that lacks one (a strict load of a plain dict
    without them does the same in the original); the counter has no effect at inference."""
    out = {}
    for key, value in state.items():
        out[key] = value
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            if counter not in state:
                out[counter] = torch.zeros((), dtype=torch.int64)
    return out


def backbone_kind(state: dict[str, torch.Tensor]) -> str | None:
    """The backbone ("DarkNet-53", "ResNet-50", "ResNet-101") read off the key names, None if unclear."""
    if any(".conv_offset_mask." in k or k.startswith("maskiou_net.") for k in state):
        return "YOLACT++ (DCNv2, maskiou_net)"
    if any(k.startswith("backbone._preconv.") for k in state):
        return "DarkNet-53"
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layers\.2\.(\d+)\.", k))}
    return {6: "ResNet-50", 23: "ResNet-101"}.get(max(blocks) + 1 if blocks else -1)


def check_backbone(state: dict[str, torch.Tensor], arch: str, where: str) -> None:
    """A clear refusal, naming the archs that fit, when the checkpoint's backbone belongs to another variant."""
    kind = backbone_kind(state)
    if kind is not None and kind != ARCHS[arch]:
        fits = " or ".join(repr(a) for a, k in ARCHS.items() if k == kind)
        if not fits:
            raise CheckpointError(f"{where}: is a {kind} checkpoint; minseg converts YOLACT ({', '.join(ARCHS)}), "
                                  "not YOLACT++")
        raise CheckpointError(f"{where}: has a {kind} backbone; convert it with arch={fits}, not {arch!r}")


def convert(checkpoint: str | os.PathLike | dict, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    state, where = load_source(checkpoint)
    check_backbone(state, arch, where)
    state = fill_num_batches_tracked(rename(state, RULES, DROPS, where))
    overrides = {}
    if "head.conf.weight" in state and "head.loc.weight" in state:
        num_anchors = state["head.loc.weight"].shape[0] // 4
        num_classes = state["head.conf.weight"].shape[0] // max(num_anchors, 1)
        if num_classes != 81:
            overrides["num_classes"] = num_classes
    return validate(state, arch, where, **overrides), overrides
