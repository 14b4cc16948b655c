"""Fast NMS (Bolya et al., YOLACT 2019): NMS as one matrix operation.

Classic NMS visits boxes in score order and drops a box if a *kept* higher-scored box overlaps it.
Fast NMS drops a box if *any* higher-scored box overlaps it (kept or not), which turns the loop into
`triu(IoU).max(dim=0) <= threshold`. It suppresses slightly more, and runs as a few batched tensor ops.

Follows dbolya/yolact layers/functions/detection.py (fast_nms, cc_fast_nms) with the same sorts; its IoU
(box_utils.py jaccard: no +1, no epsilon) is ops/boxes.py box_iou in the same float order, so detections match
the original exactly. Boxes are xyxy in any consistent unit (YOLACT passes relative boxes_rel).
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from minseg.ops import forms, reference
from minseg.ops.boxes import box_iou


def _empty(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index = torch.zeros(0, dtype=torch.int64, device=scores.device)
    return index, index.clone(), scores.new_zeros(0)


def fast_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, top_k: int = 200,
             max_detections: int = 100, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class Fast NMS, YOLACT's evaluation default.

    boxes: Tensor[N, 4] xyxy candidates; scores: Tensor[C, N] per-class scores of each candidate.
    Per class, the `top_k` highest-scored candidates are compared; a candidate survives when its IoU with
    every higher-scored candidate of its class is <= iou_threshold. Survivors of all classes are sorted by
    score and the first `max_detections` returned. There is no score threshold here (YOLACT filters
    candidates by their best class score before calling this), so a low class score can survive.
    Returns (index Tensor[K] into boxes, class Tensor[K] in 0..C-1, score Tensor[K]), scores descending.
    impl: "auto", "cpu", "gpu" (one form) or "reference" (`minseg.ops.reference.fast_nms`, a loop over candidates;
    equal to the fast form exactly).
    """
    if forms.choose(impl, scores) == "reference":
        return reference.fast_nms(boxes, scores, iou_threshold, top_k, max_detections)
    C, N = scores.shape
    if guard_or_false(N == 0):  # (unknown when exported: the general path handles no candidates too)
        return _empty(scores)
    scores, order = scores.sort(1, descending=True)
    order = order[:, :top_k].contiguous()  # (C, D)
    scores = scores[:, :top_k]
    D = order.shape[1]
    candidates = boxes[order.view(-1), :].view(C, D, 4)  # (C, D, 4)

    iou = box_iou(candidates, candidates).triu_(diagonal=1)  # only pairs (higher-scored i, lower j)
    # the original's iou.max(dim=1) <= threshold (NaN: dropped), as `any`, which also takes D = 0
    survives = ~((iou > iou_threshold) | iou.isnan()).any(dim=1)  # (C, D)

    keep = torch.where(survives.view(-1))[0]  # class-major flat positions
    # (D >= 1 here in eager; an exported graph also runs this with no candidates, where D = 0 divides nothing)
    classes, order, scores = keep // torch.sym_max(D, 1), order.view(-1)[keep], scores.reshape(-1)[keep]
    scores, best = scores.sort(0, descending=True)
    best = best[:max_detections]
    return order[best], classes[best], scores[:max_detections]


def cross_class_fast_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5,
                         top_k: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-agnostic Fast NMS (YOLACT's --cross_class_nms): each candidate takes its best class, the `top_k`
    best candidates are compared regardless of class. No max_detections cap, as in the original.

    boxes: Tensor[N, 4] xyxy; scores: Tensor[C, N]. Returns (index Tensor[K] into boxes, class Tensor[K],
    score Tensor[K]), scores descending.
    """
    if scores.shape[1] == 0:
        return _empty(scores)
    scores, classes = scores.max(dim=0)
    order = scores.sort(0, descending=True)[1][:top_k]
    candidates = boxes[order]  # (D, 4)
    iou = box_iou(candidates, candidates).triu_(diagonal=1)
    order = order[iou.max(dim=0).values <= iou_threshold]
    return order, classes[order], scores[order]
