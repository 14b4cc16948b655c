"""`minseg bench` rows for Panoptic FPN. detectron2 cannot be installed here, so minseg's own time for the full
inference path (800x1067 input, 100 detections, masks pasted, sem-seg and panoptic fusion) is reported with
weights from the fixture's synthetic recipe, beside detectron2's published V100 figure."""
from __future__ import annotations

import torch

from minseg_ref.bench import BenchRow, ours_only

PUBLISHED_SECONDS = {"panoptic_fpn_resnet50": 0.053, "panoptic_fpn_resnet101": 0.066}  # MODEL_ZOO.md, V100


def forwards(arch: str, device: str) -> dict:
    """{"ours": the full inference path on one seeded 800x1067 image}; detectron2 cannot run here."""
    from minseg_ref.parity_panoptic import build_model

    model = build_model(arch).to(device)
    image = torch.rand(3, 800, 1067, generator=torch.Generator().manual_seed(0)).mul(255).to(device)
    batch = [{"image": image, "height": 480, "width": 640}]
    return {"ours": lambda: model(batch)}


def bench(arch: str, device: str, repeats: int) -> BenchRow:
    ms, peak = ours_only(forwards, [arch], device, repeats)
    return BenchRow(arch, device, "3x800x1067 -> 480x640", ms, None, peak, None,
                    f"original not runnable here; published {PUBLISHED_SECONDS[arch] * 1000:.0f} ms/im on a V100")


BENCHES = {arch: (lambda device, repeats, arch=arch: bench(arch, device, repeats)) for arch in PUBLISHED_SECONDS}
