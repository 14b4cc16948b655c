"""Parity rows for listed models whose original has no outputs here: structure only, and why.

panoptic_fpn_resnet101: detectron2 cannot be installed here and the shared fixtures record only the R-50
model's outputs. What can be checked is the checkpoint's structure: the R-101 key list (derived from the
recorded R-50 list and the spec: res4 holds 23 blocks, 585 entries) converts with every key consumed, loads
with strict=True, and the model runs end to end. (The YOLACT variants' structure rows live in parity_yolact.)
"""
from __future__ import annotations

import torch

import minseg
from minseg_ref import parity_panoptic as panoptic
from minseg_ref.common import ParityRow

ARCH = "panoptic_fpn_resnet101"
ORIGINAL = "detectron2 panoptic_fpn_R_101_3x key list"
ENTRIES = 585


def check() -> ParityRow:
    _, meta, folder = panoptic.load_fixture()
    keys = panoptic.r101_keys(panoptic.read_keys(folder))
    converted = panoptic.convert_synthetic(panoptic.synthetic_state(keys, meta), ARCH)
    model = minseg.create_model(ARCH)
    model.load_state_dict(converted, strict=True)  # raises, naming the keys, on any mismatch
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        (out,) = model.eval()([{"image": image, "height": 48, "width": 72}])
    problems = [name for name, ok in {
        f"{ENTRIES} checkpoint entries": len(keys) == ENTRIES,
        "every entry converted": len(converted) == ENTRIES,
        "sem_seg 54x48x72": out["sem_seg"].shape == (54, 48, 72),
        "panoptic_seg 48x72 int32": out["panoptic_seg"].shape == (48, 72) and out["panoptic_seg"].dtype == torch.int32,
    }.items() if not ok]
    detail = (f"{ENTRIES} keys consumed, strict load, runs; no recorded outputs of the R-101 original, so no numeric claim"
              if not problems else f"FAIL: {', '.join(problems)}")
    return ParityRow(ARCH, ORIGINAL, float("nan"), float("nan"), not problems, detail, checks="structure only")


CHECKS = {ARCH: (ORIGINAL, check)}
