"""torch.hub entry points: torch.hub.load("<path to a minseg clone>", "deeplabv3_resnet50", source="local",
weights="official" | "path/to/converted.safetensors" | None)."""
dependencies = ["torch", "numpy", "PIL", "safetensors"]

import minseg as _minseg


def _entry(name):
    def build(weights=None, **overrides):
        return _minseg.create_model(name, weights=weights, **overrides)

    build.__name__ = name
    build.__doc__ = f"minseg.create_model({name!r}, weights=..., **overrides)"
    return build


for _name in _minseg.list_models():
    globals()[_name] = _entry(_name)
