"""Panoptic fusion: instance masks and a semantic map -> one segment id per pixel (Kirillov et al. 2019, sec. 3).

Follows detectron2 modeling/meta_arch/panoptic_fpn.py (combine_semantic_and_instance_outputs), itself the heuristic
of panopticapi's combine_semantic_and_instance_predictions.py: things are laid down by descending score, each
skipped when mostly covered already; then each stuff class fills what is left when enough of it remains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusionConfig:
    instances_score_thresh: float = 0.5   # stop at the first instance scoring below this (scores >= it are used)
    overlap_thresh: float = 0.5           # skip an instance when more than this fraction of its mask is taken
    stuff_area_thresh: int = 4096         # skip a stuff class with fewer free pixels than this (output resolution)
    things_label: int = 0                 # semantic class that stands for "any thing"


def combine_semantic_and_instances(scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                                   semantic: torch.Tensor, cfg: FusionConfig = FusionConfig()
                                   ) -> tuple[torch.Tensor, list[dict]]:
    """Instances (scores Tensor[K], labels Tensor[K] int64 0..79, masks Tensor[K, H, W] bool) and the semantic
    argmax Tensor[H, W] int64 -> (panoptic Tensor[H, W] int32 with 0 = void, segments_info).

    segments_info lists, in id order, things as {"id", "isthing": True, "score", "category_id", "instance_id"}
    and stuff as {"id", "isthing": False, "category_id" (1..53), "area"}, as detectron2 returns them.
    """
    panoptic = torch.zeros_like(semantic, dtype=torch.int32)
    segments: list[dict] = []
    current_id = 0
    masks = masks.to(dtype=torch.bool, device=panoptic.device)

    # things, best first; kept: argsort is not stable, as in the original, so exact ties keep torch's order
    for i in torch.argsort(-scores):
        score = scores[i].item()
        if score < cfg.instances_score_thresh:
            break
        mask = masks[i]
        area = mask.sum().item()
        if area == 0:
            continue
        overlap = (mask & (panoptic > 0)).sum().item()
        if overlap * 1.0 / area > cfg.overlap_thresh:
            continue
        if overlap > 0:
            mask = mask & (panoptic == 0)
        current_id += 1
        panoptic[mask] = current_id
        segments.append({"id": current_id, "isthing": True, "score": score,
                         "category_id": labels[i].item(), "instance_id": i.item()})

    # stuff, in ascending class order, on whatever the things left free
    for label in torch.unique(semantic).cpu().tolist():
        if label == cfg.things_label:
            continue
        mask = (semantic == label) & (panoptic == 0)
        area = mask.sum().item()
        if area < cfg.stuff_area_thresh:
            continue
        current_id += 1
        panoptic[mask] = current_id
        segments.append({"id": current_id, "isthing": False, "category_id": label, "area": area})
    return panoptic, segments
