"""minseg: compact, readable PyTorch reimplementations of classic segmentation models, proven equal to the originals."""
from minseg.errors import CheckpointError
from minseg.registry import create_model, list_models
from minseg.convert import convert
from minseg.weights import VERSION as __version__

__all__ = ["CheckpointError", "convert", "create_model", "list_models", "__version__"]
