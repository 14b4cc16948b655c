"""minseg.convert(source, checkpoint, *, arch): an original's checkpoint -> a minseg state dict.

All checkpoint naming lives in this package, one module per source; each exposes
`convert(checkpoint, arch) -> (state_dict, overrides)` where overrides (e.g. num_classes) are what
create_model needs to accept the result.
"""
from __future__ import annotations

import importlib
import os

import torch

from minseg.errors import CheckpointError

SOURCES = {
    "torchvision": "minseg.convert.torchvision",
    "smp": "minseg.convert.smp",
    "yolact": "minseg.convert.yolact",
    "detectron2": "minseg.convert.detectron2",
}


def convert_with_overrides(source: str, checkpoint: str | os.PathLike | dict, *, arch: str) -> tuple[dict, dict]:
    """Like convert(), also returning the create_model overrides the weights need (e.g. {'num_classes': 3})."""
    from minseg.registry import check_name  # here, not above: `import minseg` loads this package, and no model

    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    check_name(arch)  # ValueError naming the closest names
    module = importlib.import_module(SOURCES[source])
    if arch not in module.ARCHS:
        raise CheckpointError(f"source {source!r} has no converter for {arch!r} (it converts: {', '.join(module.ARCHS)})")
    return module.convert(checkpoint, arch)


def convert(source: str, checkpoint: str | os.PathLike | dict, *, arch: str) -> dict[str, torch.Tensor]:
    """Convert an ORIGINAL's checkpoint (path or in-memory state dict) for minseg model `arch`.

    The result loads with strict=True into create_model(arch) (for a non-default class count, pass the
    same num_classes). Raises CheckpointError listing any key no rule accounts for.
    """
    return convert_with_overrides(source, checkpoint, arch=arch)[0]
