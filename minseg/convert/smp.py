"""segmentation_models_pytorch checkpoints -> minseg: smp.Unet("resnet34") -> unet_resnet34.

smp's encoder is a torchvision ResNet (fc and avgpool deleted), so its names below `encoder.` already
match minseg's ResNet; the decoder's Conv2dReLU is Sequential(conv, norm, relu) like minseg's ConvNormAct.
num_classes and in_channels are read off the tensor shapes.
"""
from __future__ import annotations

import os

import torch

from minseg.convert.common import Drop, Rule, load_source, rename, validate

UNET_RESNET: list[Rule] = [
    (r"encoder\.(conv1|bn1|layer[1-4])\.(.*)", r"backbone.\1.\2"),
    # UnetDecoderBlock: conv1 and conv2 are Conv2dReLU = Sequential(conv, bn, relu)
    (r"decoder\.blocks\.([0-9]+)\.conv([12])\.([01])\.(.*)", r"decoder.blocks.\1.conv\2.\3.\4"),
    # SegmentationHead: Sequential(conv, upsampling (Identity), activation)
    (r"segmentation_head\.0\.(weight|bias)", r"classifier.\1"),
]

UNET_DROPS: list[Drop] = [
    (r"classification_head\..*", "smp's optional auxiliary image classifier (aux_params); minseg's U-Net predicts masks only"),
]

RULES = {"unet_resnet34": UNET_RESNET}
DROPS = {"unet_resnet34": UNET_DROPS}
ARCHS = RULES  # the archs this source converts


def unet_overrides(state: dict[str, torch.Tensor]) -> dict:
    """num_classes and in_channels read off the tensor shapes (CLIP-style: no config file needed).
    A missing or malformed tensor gives no override; validate() then reports it."""
    overrides = {}
    for option, key, dim in (("num_classes", "classifier.weight", 0), ("in_channels", "backbone.conv1.weight", 1)):
        if key in state and state[key].dim() == 4 and state[key].shape[dim] > 0:
            overrides[option] = state[key].shape[dim]
    return overrides


def convert(checkpoint: str | os.PathLike | dict, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    state, where = load_source(checkpoint)
    state = rename(state, RULES[arch], DROPS[arch], where)
    overrides = unet_overrides(state)
    return validate(state, arch, where, **overrides), overrides
