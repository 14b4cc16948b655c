"""Mask R-CNN v1/v2 against torchvision on the same weights and images: the full eval path (resize, backbone,
RPN, heads, mask pasting), with a peaky classifier so both keep 100 detections per image."""
from __future__ import annotations

import torch

from minseg_ref.bench import BenchRow, compare_sides

NAMES = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]


def forwards(model_name: str, device: str) -> dict:
    """torchvision's seeded init (peaky classifier) and minseg converted from it, on two images 480x640, 427x640."""
    from minseg_ref.parity_maskrcnn import build_pair, images

    ref, ours = build_pair(model_name, seed=0)
    ref, ours = ref.to(device), ours.to(device)
    xs = [x.to(device) for x in images([(480, 640), (427, 640)])]
    return {"ours": lambda: ours(xs), "original": lambda: ref(xs)}


def bench(device: str, model_name: str, repeats: int = 3) -> dict:
    """ABAB-interleaved medians on two images (480x640, 427x640): {"model", "device", "input", "ours_ms",
    "original_ms", "ratio", "ours_peak_mb", "original_peak_mb", "detections"}."""
    pair = forwards(model_name, device)
    with torch.inference_mode():
        detections = [len(d["labels"]) for d in pair["ours"]()]
    t_ours, t_ref, p_ours, p_ref = compare_sides(forwards, [model_name], device, repeats, pair)
    return {"model": model_name, "device": device, "input": "2 images 480x640+427x640", "ours_ms": t_ours,
            "original_ms": t_ref, "ratio": t_ours / t_ref, "ours_peak_mb": p_ours, "original_peak_mb": p_ref,
            "detections": detections}


def bench_row(device: str, repeats: int, model_name: str) -> BenchRow:
    r = bench(device, model_name, repeats)
    return BenchRow(model_name, device, "2x 480x640/427x640", r["ours_ms"], r["original_ms"], r["ours_peak_mb"],
                    r["original_peak_mb"], f"detections per image {r['detections']}")


BENCHES = {name: (lambda device, repeats, name=name: bench_row(device, repeats, name)) for name in NAMES}
