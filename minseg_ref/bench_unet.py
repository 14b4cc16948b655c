"""U-Net ResNet-34 against smp.Unet on the same weights and input."""
from __future__ import annotations

import torch

from minseg_ref.bench import BenchRow, compare_sides


def forwards(device: str) -> dict:
    """smp's seeded init (BatchNorms perturbed) and minseg converted from it, on one 512x512 image."""
    from minseg_ref.parity_unet import build_pair

    ref, ours = build_pair(num_classes=21, seed=0)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    return {"ours": lambda: ours(x), "original": lambda: ref(x)}


def bench(device: str, repeats: int) -> BenchRow:
    t_ours, t_ref, p_ours, p_ref = compare_sides(forwards, [], device, repeats)
    return BenchRow("unet_resnet34", device, "1x3x512x512", t_ours, t_ref, p_ours, p_ref)


BENCHES = {"unet_resnet34": bench}
