"""Model registry: a plain dict from name to builder, plus create_model / list_models."""
from __future__ import annotations

import difflib
import inspect
import json
from typing import Callable

import torch

from minseg.errors import CheckpointError
from minseg.models import deeplabv3, fcn
from minseg.models import yolact
from minseg.models import unet
from minseg.models import panoptic_fpn
from minseg.models import mask_rcnn

MODELS: dict[str, Callable[..., torch.nn.Module]] = {
    "fcn_resnet50": fcn.fcn_resnet50,
    "fcn_resnet101": fcn.fcn_resnet101,
    "deeplabv3_resnet50": deeplabv3.deeplabv3_resnet50,
    "deeplabv3_resnet101": deeplabv3.deeplabv3_resnet101,
    "yolact_resnet50": yolact.yolact_resnet50,
    "yolact_resnet101": yolact.yolact_resnet101,
    "yolact_im700": yolact.yolact_im700,
    "yolact_darknet53": yolact.yolact_darknet53,
    "unet_resnet34": unet.unet_resnet34,
    "panoptic_fpn_resnet50": panoptic_fpn.panoptic_fpn_resnet50,
    "panoptic_fpn_resnet101": panoptic_fpn.panoptic_fpn_resnet101,
    "maskrcnn_resnet50_fpn": mask_rcnn.maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": mask_rcnn.maskrcnn_resnet50_fpn_v2,
}


def list_models() -> list[str]:
    return sorted(MODELS)


def create_model(name: str, *, weights: str | None = None, **overrides) -> torch.nn.Module:
    """Build model `name` (random init), then load a minseg .safetensors file if `weights` is given.

    `weights="official"` downloads, verifies and converts the checkpoint listed in weights/manifest.json
    (cached; see minseg/download.py). Overrides recorded in the weight file at conversion (e.g.
    num_classes) are applied first; explicit `overrides` win. The model is returned in eval mode.
    """
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}{hint}")
    builder = MODELS[name]
    state = None
    if weights == "official":
        from minseg.download import download

        weights = str(download(name))
    if weights is not None:
        from minseg.weights import load_weights

        state, meta = load_weights(weights)
        if meta["arch"] != name:
            raise CheckpointError(f"{weights}: weights are for {meta['arch']!r}, not {name!r}")
        overrides = {**json.loads(meta.get("overrides") or "{}"), **overrides}
    accepted = inspect.signature(builder).parameters
    unknown = [k for k in overrides if k not in accepted]
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    model = builder(**overrides)
    if state is not None:
        from minseg.weights import load_into

        load_into(model, state, what=str(weights))
    return model.eval()
