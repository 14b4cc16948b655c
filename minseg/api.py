"""minseg's Python API above the registry: create_model with weights (a file, or "official": download and convert).

    registry (random init)  <-  weights (read a .safetensors), convert, download  <-  this module  <-  cli
"""
from __future__ import annotations

import os

import torch

from minseg import registry
from minseg.download import download
from minseg.errors import CheckpointError
from minseg.registry import list_models
from minseg.weights import load_into, load_weights, read_overrides

__all__ = ["create_model", "list_models"]


def create_model(name: str, *, weights: str | os.PathLike | None = None, **overrides) -> torch.nn.Module:
    """Build model `name` (random init), then load a minseg .safetensors file if `weights` is given.

    `weights="official"` downloads, verifies and converts the checkpoint listed in weights/manifest.json
    (cached; see minseg/download.py). Overrides recorded in the weight file at conversion (e.g. num_classes) are
    applied first; explicit `overrides` win. Every option's type and range is checked before anything is built:
    ValueError / TypeError for the ones given here, CheckpointError naming the file for the file's. The model is
    returned in eval mode.
    """
    registry.model_config(name, **overrides)  # refuse a bad name or option before reading or downloading anything
    if weights == "official":
        weights = download(name)
    state = None
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"weights must be a path, 'official' or None, got {type(weights).__name__}")
        state, meta = load_weights(weights)
        if meta["arch"] != name:
            raise CheckpointError(f"{weights}: weights are for {meta['arch']!r}, not {name!r}")
        recorded = read_overrides(meta, weights)
        try:
            registry.model_config(name, **recorded)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{weights}: metadata overrides: {e}") from None
        overrides = {**recorded, **overrides}
    model = registry.build_model(name, **overrides)
    if state is not None:
        load_into(model, state, what=str(weights))
    return model.eval()
