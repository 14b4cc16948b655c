"""torch.compile of each model's network part: does it compile with fullgraph=True, and are outputs equal?

    python -m minseg_ref.compile_check [NAME ...]
"""
from __future__ import annotations

import sys
import time

import torch

import minseg
from minseg_ref.common import Tally


def network_part(name: str):
    """(module, example input) for the tensor-in tensor-out part of model `name`."""
    model = minseg.create_model(name).eval()
    if name.startswith(("fcn", "deeplabv3", "unet", "yolact")):
        size = 550 if name.startswith("yolact") else 256
        return model, torch.randn(1, 3, size, size)
    return model.backbone, torch.randn(1, 3, 256, 320)  # detection models: backbone (+FPN where it is part of it)


def flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    return [t for v in out for t in flatten(v)]


def check(name: str) -> tuple[bool, float, float]:
    torch._dynamo.reset()
    module, x = network_part(name)
    with torch.no_grad():
        eager = flatten(module(x))
        start = time.perf_counter()
        try:
            compiled = torch.compile(module, fullgraph=True)
            got, fullgraph = flatten(compiled(x)), True
        except Exception:
            torch._dynamo.reset()
            got, fullgraph = flatten(torch.compile(module)(x)), False
    tally = Tally()
    for a, b in zip(got, eager):
        tally.add(a, b)
    return fullgraph, tally.max_rel, time.perf_counter() - start


def main(names: list[str]) -> None:
    for name in names or minseg.list_models():
        fullgraph, rel, seconds = check(name)
        print(f"{name:<26} fullgraph={fullgraph!s:<5} max rel diff vs eager {rel:.2e}  ({seconds:.0f}s incl. compile)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
