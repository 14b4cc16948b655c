"""Parity of FCN and DeepLabV3 against torchvision.models.segmentation, from torchvision's own seeded init."""
from __future__ import annotations

import torch

import minseg
from minseg_ref.common import ParityRow, Tally

TOLERANCE = 1e-5  # max abs diff relative to the output's scale (float32 rounding level)
NAMES = ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"]


def build_pair(name: str, num_classes: int = 21, aux_loss: bool = False, seed: int = 0):
    """(torchvision model with its own seeded random init, minseg model converted from its state dict)."""
    import torchvision

    torch.manual_seed(seed)
    ref = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                          num_classes=num_classes, aux_loss=aux_loss).eval()
    state = minseg.convert("torchvision", ref.state_dict(), arch=name)
    ours = minseg.create_model(name, num_classes=num_classes, aux_loss=aux_loss)
    ours.load_state_dict(state, strict=True)
    return ref, ours.eval()


def compare(ref, ours, x: torch.Tensor, tally: Tally) -> None:
    with torch.no_grad():
        a, b = ref(x), ours(x)
    if set(a) != set(b):
        raise AssertionError(f"output keys {sorted(b)} != {sorted(a)}")
    for key in a:
        tally.add(b[key], a[key])


def check(name: str) -> ParityRow:
    ref, ours = build_pair(name, aux_loss=True, seed=0)
    tally = Tally()
    g = torch.Generator().manual_seed(0)
    compare(ref, ours, torch.randn(2, 3, 333, 517, generator=g), tally)
    return ParityRow(name, f"torchvision {name}", tally.max_abs, tally.max_rel, tally.max_rel <= TOLERANCE,
                     "aux on; batch 2 at 333x517")


CHECKS = {name: (f"torchvision.models.segmentation.{name}", lambda name=name: check(name)) for name in NAMES}
