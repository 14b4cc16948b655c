"""minseg: compact, readable PyTorch reimplementations of classic segmentation models, proven equal to the originals.

`create_model`, `list_models` (minseg.api) and `__version__` load on first use, so that `import minseg.ops` (or any
other layer) loads that layer alone. `convert` is imported here: its package holds only the dispatch to the per-source
converters, which load when called (and binding the function now keeps `minseg.convert` the function even after
a converter module is imported).
"""
from __future__ import annotations

import importlib

from minseg.convert import convert
from minseg.errors import CheckpointError, DownloadError

__all__ = ["CheckpointError", "DownloadError", "convert", "create_model", "list_models", "__version__"]

_LAZY = {"create_model": "minseg.api", "list_models": "minseg.api", "__version__": "minseg.weights"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'minseg' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), "VERSION" if name == "__version__" else name)
