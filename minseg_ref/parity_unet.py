"""Parity of unet_resnet34 against segmentation_models_pytorch.Unet("resnet34"), from smp's own seeded init."""
from __future__ import annotations

import torch
from torch import nn

import minseg
from minseg_ref.common import ParityRow, Tally

TOLERANCE = 1e-5  # max abs diff relative to the output's scale (float32 rounding level); measured: 0 (bitwise)


def perturb_norms(model: nn.Module, seed: int) -> None:
    """Seeded non-trivial BatchNorm statistics and affine parameters.

    A fresh init has mean 0, var 1, weight 1, bias 0 in every BatchNorm, where eval-mode BN is nearly the
    identity and a converter that swapped running_mean with bias (say) would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def build_smp(num_classes: int = 3, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """smp.Unet("resnet34") with smp's own seeded random init, BatchNorms perturbed (see perturb_norms), in eval."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    ref = smp.Unet("resnet34", encoder_weights=None, classes=num_classes, in_channels=in_channels)
    perturb_norms(ref, seed + 1000)
    return ref.eval()


def build_pair(num_classes: int = 3, in_channels: int = 3, seed: int = 0):
    """(smp model, minseg model converted from its state dict), both in eval mode."""
    ref = build_smp(num_classes, in_channels, seed)
    state = minseg.convert("smp", ref.state_dict(), arch="unet_resnet34")
    ours = minseg.create_model("unet_resnet34", num_classes=num_classes, in_channels=in_channels)
    ours.load_state_dict(state, strict=True)
    return ref, ours.eval()


def compare(ref: nn.Module, ours: nn.Module, x: torch.Tensor, tally: Tally) -> bool:
    """Adds |ours(x) - ref(x)| to `tally`; True when the outputs are bitwise equal."""
    with torch.no_grad():
        a, b = ref(x), ours(x)
    tally.add(b, a)  # raises AssertionError on a shape mismatch
    return torch.equal(a, b)


def check() -> ParityRow:
    tally = Tally()
    g = torch.Generator().manual_seed(0)
    equal = True
    ref, ours = build_pair(num_classes=3, seed=0)
    equal &= compare(ref, ours, torch.randn(2, 3, 224, 320, generator=g), tally)
    equal &= compare(ref, ours, torch.randn(1, 3, 225, 321, generator=g), tally)  # smp accepts sizes not divisible by 32
    detail = f"3 classes; inputs 2x3x224x320 + 1x3x225x321; {'bitwise equal' if equal else 'not bitwise equal'}"
    return ParityRow("unet_resnet34", 'smp.Unet("resnet34")', tally.max_abs, tally.max_rel, tally.max_rel <= TOLERANCE, detail)


CHECKS = {"unet_resnet34": ('smp.Unet("resnet34")', check)}
