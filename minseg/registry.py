"""Model registry: a plain dict from name to (the variant's config function, the architecture's builder).

Each config function fixes what its variant is (depth, v1 or v2, input size) and takes the options as keywords;
its config's fields with a default are exactly the options create_model accepts, checked in the config's
__post_init__. This layer builds models with random weights only: loading weight files, official or not, is
minseg.api's (above weights, convert and download).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from torch import nn

from minseg.models import deeplabv3, fcn, mask_rcnn, panoptic_fpn, unet, yolact

MODELS: dict[str, tuple[Callable[..., Any], Callable[[Any], nn.Module]]] = {
    "fcn_resnet50": (fcn.fcn_resnet50_config, fcn.fcn),
    "fcn_resnet101": (fcn.fcn_resnet101_config, fcn.fcn),
    "deeplabv3_resnet50": (deeplabv3.deeplabv3_resnet50_config, deeplabv3.deeplabv3),
    "deeplabv3_resnet101": (deeplabv3.deeplabv3_resnet101_config, deeplabv3.deeplabv3),
    "unet_resnet34": (unet.unet_resnet34_config, unet.unet),
    "maskrcnn_resnet50_fpn": (mask_rcnn.maskrcnn_resnet50_fpn_config, mask_rcnn.mask_rcnn),
    "maskrcnn_resnet50_fpn_v2": (mask_rcnn.maskrcnn_resnet50_fpn_v2_config, mask_rcnn.mask_rcnn),
    "yolact_resnet50": (yolact.yolact_resnet50_config, yolact.yolact),
    "yolact_resnet101": (yolact.yolact_resnet101_config, yolact.yolact),
    "yolact_im700": (yolact.yolact_im700_config, yolact.yolact),
    "yolact_darknet53": (yolact.yolact_darknet53_config, yolact.yolact),
    "panoptic_fpn_resnet50": (panoptic_fpn.panoptic_fpn_resnet50_config, panoptic_fpn.panoptic_fpn),
    "panoptic_fpn_resnet101": (panoptic_fpn.panoptic_fpn_resnet101_config, panoptic_fpn.panoptic_fpn),
}


def list_models() -> list[str]:
    return sorted(MODELS)


def check_name(name: str, /) -> None:
    """ValueError naming the closest known names unless `name` is a model name."""
    if isinstance(name, str) and name in MODELS:
        return
    close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4) if isinstance(name, str) else []
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
    raise ValueError(f"unknown model {name!r}{hint}")


def options(name: str, /) -> list[str]:
    """The create_model options of model `name`: its config's fields that have a default."""
    check_name(name)
    variant, _ = MODELS[name]
    return [f.name for f in dataclasses.fields(variant())
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]


def model_config(name: str, /, **overrides) -> Any:
    """The frozen config of model `name` with `overrides` applied. ValueError for an unknown name (naming the closest
    ones) or a value out of range, TypeError for an unknown option or a value of the wrong type; one line each."""
    accepted = options(name)
    unknown = [k for k in overrides if k not in accepted]
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    variant, _ = MODELS[name]
    try:
        return variant(**overrides)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


def build_model(name: str, /, **overrides) -> nn.Module:
    """Model `name` with random weights (in train mode, as built), its config checked first (see model_config)."""
    cfg = model_config(name, **overrides)
    _, build = MODELS[name]
    return build(cfg)
