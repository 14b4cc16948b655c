"""Panoptic fusion: instance masks and a semantic map -> one segment id per pixel (Kirillov et al. 2019, sec. 3).

Follows detectron2 modeling/meta_arch/panoptic_fpn.py (combine_semantic_and_instance_outputs), itself the heuristic
of panopticapi's combine_semantic_and_instance_predictions.py: things are laid down by descending score, each
skipped when mostly covered already; then each stuff class fills what is left when enough of it remains.
The "gpu" form (`impl`, ops/forms.py; the default on GPUs) decides the things in a few dense steps instead of one
instance at a time; the result is the same. The plain math is `minseg.ops.reference.panoptic_fusion`.
Exported (torch.export), fusion reads nothing to the host (`_combine_traced`): the dense form with its fixpoint
as a bounded torch.while_loop, and segments_info as a dict of tensors (`segments_info_list` makes the dicts).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from minseg.ops import forms, reference


@dataclass(frozen=True)
class FusionConfig:
    instances_score_thresh: float = 0.5   # stop at the first instance scoring below this (scores >= it are used)
    overlap_thresh: float = 0.5           # skip an instance when more than this fraction of its mask is taken
    stuff_area_thresh: int = 4096         # skip a stuff class with fewer free pixels than this (output resolution)
    things_label: int = 0                 # semantic class that stands for "any thing"


def _place_things_one_at_a_time(masks: torch.Tensor, order: list[int], overlap_thresh: float,
                                panoptic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Instances `order` of masks Tensor[K, H, W] bool, best first, onto panoptic Tensor[H, W] int32 (all 0):
    each is skipped when empty or when more than overlap_thresh of it is taken already, else it takes its free
    pixels under the next id. Returns (panoptic, kept Tensor[len(order)] bool). No host read per instance."""
    areas = masks.flatten(1).sum(1).double()  # (K,)
    next_id = torch.zeros((), dtype=torch.int32, device=panoptic.device)
    kept = []
    for i in order:
        mask = masks[i]
        overlap = (mask & (panoptic > 0)).sum().double()
        # float64, as the original's Python floats; an empty mask is skipped
        keep = (areas[i] > 0) & ~(overlap / areas[i] > overlap_thresh)
        next_id = next_id + keep
        panoptic = torch.where(mask & (panoptic == 0) & keep, next_id, panoptic)  # only the free part of the mask
        kept.append(keep)
    return panoptic, torch.stack(kept) if kept else torch.zeros(0, dtype=torch.bool, device=panoptic.device)


def _place_things_fixpoint(masks: torch.Tensor, order: list[int], overlap_thresh: float,
                           panoptic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same decisions in a few dense steps (the GPU form: a kernel per step, not per instance).

    Instance j's decision depends only on the decisions before it (on which pixels kept instances i < j took),
    so iterating "decide every instance from the current guess", starting from "keep every non-empty one",
    fixes at least one more decision per step and stops at the one-at-a-time result (as Cluster-NMS does for
    NMS). Costs (n, H, W) temporaries per step; on the CPU one at a time is faster.
    """
    n = len(order)
    if n == 0:
        return panoptic, torch.zeros(0, dtype=torch.bool, device=panoptic.device)
    ranked = masks[forms.copy_to_device(order, torch.int64, masks.device)]  # (n, H, W) best first
    areas = ranked.flatten(1).sum(1).double()  # (n,)
    rank = torch.arange(n, device=masks.device)[:, None, None]
    keep = areas > 0
    while True:
        taken = ranked & keep[:, None, None]  # (n, H, W)
        owner = torch.where(taken.any(0), taken.view(torch.uint8).argmax(0), n)  # (H, W) first kept instance
        overlap = (ranked & (owner < rank)).flatten(1).sum(1).double()  # pixels taken by better kept ones
        decided = (areas > 0) & ~(overlap / areas > overlap_thresh)
        if torch.equal(decided, keep):
            break
        keep = decided
    ids = torch.cumsum(keep, 0, dtype=torch.int32)  # (n,) segment id of each kept instance
    return torch.where(owner < n, ids[owner.clamp(max=n - 1)], panoptic), keep


SEGMENT_FIELDS = ("id", "isthing", "category_id", "score", "instance_id", "area")


def segments_info_list(segments: dict[str, torch.Tensor]) -> list[dict]:
    """The exported form of segments_info (`_combine_traced`: Tensor[S] per SEGMENT_FIELDS, "score" and
    "instance_id" for things only, "area" for stuff only) -> detectron2's list of dicts."""
    rows = zip(*(segments[k].tolist() for k in SEGMENT_FIELDS))
    return [{"id": i, "isthing": True, "score": score, "category_id": c, "instance_id": inst} if thing else
            {"id": i, "isthing": False, "category_id": c, "area": area}
            for i, thing, c, score, inst, area in rows]


def _combine_traced(scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, semantic: torch.Tensor,
                    cfg: FusionConfig, num_labels: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """combine_semantic_and_instances with no host read, for exported graphs: the same panoptic map, and the same
    segments as Tensor[S] per field (SEGMENT_FIELDS; see `segments_info_list`). The things are decided as by
    `_place_things_fixpoint`, over all K instances best first, those after the first score below the threshold
    never kept; the fixpoint is a torch.while_loop bounded by K steps (each settles at least one decision).
    Stuff areas are counted per class among `num_labels` semantic classes."""
    K, device = scores.shape[0], scores.device
    masks = masks.to(torch.bool)
    order = torch.argsort(-scores)
    ranked_scores = scores[order]
    considered = torch.cumsum(ranked_scores < cfg.instances_score_thresh, 0) == 0  # before the first one below
    ranked = masks[order]  # (K, H, W) best first
    areas = ranked.flatten(1).sum(1).double()
    rank = torch.arange(K, device=device)[:, None, None]
    candidate = (areas > 0) & considered

    def first_owner(keep: torch.Tensor) -> torch.Tensor:  # (H, W): the first kept instance on each pixel, else K
        taken = ranked & keep[:, None, None]
        return torch.cat((taken, taken.new_ones((1, *taken.shape[1:])))).to(torch.uint8).argmax(0)  # row K: all

    def decide(keep: torch.Tensor) -> torch.Tensor:
        overlap = (ranked & (first_owner(keep) < rank)).flatten(1).sum(1).double()  # pixels taken by better ones
        return candidate & ~(overlap / areas > cfg.overlap_thresh)

    def body(keep: torch.Tensor, changed: torch.Tensor, steps: torch.Tensor):
        new = decide(keep)
        return new, (new != keep).any(), steps + 1

    bound = torch.full((), K, device=device)
    keep = torch.while_loop(lambda keep, changed, steps: changed & (steps < bound), body,
                            (candidate.clone(), torch.ones((), dtype=torch.bool, device=device),  # (no alias: ONNX)
                             torch.zeros((), dtype=torch.int64, device=device)))[0]
    ids = torch.cumsum(keep, 0, dtype=torch.int32)  # (K,) segment id of each kept instance
    panoptic = torch.cat((ids, ids.new_zeros(1)))[first_owner(keep)]  # (H, W), 0 where no thing

    # stuff, in ascending class order, on what the things left free, ids after the things'
    ones = torch.ones(semantic.numel(), dtype=torch.int64, device=device)
    present = torch.zeros(num_labels, dtype=torch.int64, device=device).scatter_add_(0, semantic.flatten(), ones) > 0
    free = torch.where(panoptic == 0, semantic, num_labels).flatten()  # num_labels: taken by a thing
    free_area = torch.zeros(num_labels + 1, dtype=torch.int64, device=device).scatter_add_(0, free, ones)[:-1]
    classes = torch.arange(num_labels, device=device)
    laid = present & (classes != cfg.things_label) & (free_area >= cfg.stuff_area_thresh)
    stuff_id = torch.where(laid, keep.sum(dtype=torch.int32) + torch.cumsum(laid, 0, dtype=torch.int32), 0)
    panoptic = torch.where(panoptic == 0, stuff_id[semantic], panoptic)

    things, stuff = torch.where(keep)[0], torch.where(laid)[0]
    T, S = things.shape[0], stuff.shape[0]
    segments = {"id": torch.cat((ids[things], stuff_id[stuff])).long(),
                "isthing": torch.cat((keep.new_ones(T), keep.new_zeros(S))),
                "category_id": torch.cat((labels[order[things]], stuff)),
                "score": torch.cat((ranked_scores[things], ranked_scores.new_zeros(S))),
                "instance_id": torch.cat((order[things], order.new_full((S,), -1))),
                "area": torch.cat((free_area.new_zeros(T), free_area[stuff]))}
    return panoptic, segments


def combine_semantic_and_instances(scores: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                                   semantic: torch.Tensor, cfg: FusionConfig = FusionConfig(), *,
                                   impl: str = "auto", num_labels: int | None = None
                                   ) -> tuple[torch.Tensor, list[dict]]:
    """Instances (scores Tensor[K], labels Tensor[K] int64 0..79, masks Tensor[K, H, W] bool) and the semantic
    argmax Tensor[H, W] int64 -> (panoptic Tensor[H, W] int32 with 0 = void, segments_info).

    segments_info lists, in id order, things as {"id", "isthing": True, "score", "category_id", "instance_id"}
    and stuff as {"id", "isthing": False, "category_id" (1..53), "area"}, as detectron2 returns them.
    impl: "auto", "cpu" (one instance at a time), "gpu" (dense fixpoint) or "reference"
    (`minseg.ops.reference.panoptic_fusion`); all three give the same result. Exported, segments_info is a dict
    of tensors (`_combine_traced`, which needs num_labels: the number of semantic classes).
    """
    if torch.compiler.is_compiling():
        return _combine_traced(scores, labels, masks, semantic, cfg, num_labels)
    form = forms.choose(impl, semantic)
    if form == "reference":
        return reference.panoptic_fusion(scores, labels, masks, semantic, **dataclasses.asdict(cfg))
    panoptic = torch.zeros_like(semantic, dtype=torch.int32)
    masks = masks.to(dtype=torch.bool, device=panoptic.device)

    # things, best first; kept: argsort is not stable, as in the original, so exact ties keep torch's order.
    # The scores are read once; the decisions stay on the device until they are all made.
    order = torch.argsort(-scores)
    sorted_scores = scores[order].tolist()
    count = next((j for j, s in enumerate(sorted_scores) if s < cfg.instances_score_thresh), len(sorted_scores))
    order = order[:count].tolist()
    place = _place_things_fixpoint if form == "gpu" else _place_things_one_at_a_time
    panoptic, kept = place(masks, order, cfg.overlap_thresh, panoptic)
    segments: list[dict] = []
    labels_host = labels.tolist()
    for j, keep in enumerate(kept.tolist()):
        if keep:
            i = order[j]
            segments.append({"id": len(segments) + 1, "isthing": True, "score": sorted_scores[j],
                             "category_id": labels_host[i], "instance_id": i})

    # stuff, in ascending class order, on whatever the things left free. Stuff classes do not overlap, so each
    # one's free area can be counted before any is laid down, and all are laid down at once by a class -> id table
    present = torch.unique(semantic).tolist()
    free = torch.where(panoptic == 0, semantic + 1, 0).flatten()  # 0: taken by a thing
    free_area = torch.bincount(free, minlength=max(present, default=0) + 2).tolist()
    stuff_id = [0] * (len(free_area) - 1)  # semantic class -> segment id, 0: not laid down
    for label in present:
        if label == cfg.things_label or free_area[label + 1] < cfg.stuff_area_thresh:
            continue
        stuff_id[label] = len(segments) + 1
        segments.append({"id": stuff_id[label], "isthing": False, "category_id": label, "area": free_area[label + 1]})
    stuff = forms.copy_to_device(stuff_id, torch.int32, panoptic.device)[semantic]  # (H, W)
    return torch.where(panoptic == 0, stuff, panoptic), segments
