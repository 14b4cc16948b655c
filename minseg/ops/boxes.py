"""Box operations on absolute-pixel xyxy boxes: area, IoU, clipping, NMS.

Drop-in equivalents of torchvision.ops (torchvision/ops/boxes.py and csrc/ops/cpu/nms_kernel.cpp), written
in plain tensor ops. Boxes are `Tensor[N, 4]` as (x1, y1, x2, y2) with no +1 on widths (the torchvision and
detectron2 convention).

NMS is exact greedy NMS: the same keep set in the same order as torchvision's CPU kernel, including which of
two tied scores wins (ties are visited in index order, as the kernel's stable sort does). Instead of
visiting boxes one by one, boxes are taken in score-sorted blocks; inside a block the greedy decision is the
unique fixpoint of "keep j unless a kept higher-scored box overlaps it", reached by a few boolean
matrix-vector steps (Cluster-NMS, Zheng et al. 2020); the block's kept boxes then suppress later boxes at once.

Under torch.export (and torch.compile) the number of boxes is a data-dependent size, so the traced form decides all
boxes as one block and runs the fixpoint as a `torch.while_loop` (an ONNX Loop): the same decisions, one graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from minseg.ops import forms, reference


def _upcast(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 and small ints -> int32, so products do not overflow (torchvision's rule)."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


BOX_FORMATS = ("xyxy", "xywh", "cxcywh")  # torchvision's box_convert names: corners, corner + size, centre + size


def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Tensor[..., 4] -> Tensor[...] areas: (x2 - x1) * (y2 - y1) for "xyxy", w * h for "xywh" and "cxcywh"."""
    if fmt not in BOX_FORMATS:
        raise ValueError(f"Unsupported Bounding Box area for given format {fmt}")
    boxes = _upcast(boxes)
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def _corners(boxes: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """Tensor[..., 4] in `fmt` -> top-left and bottom-right Tensor[..., 2], in torchvision's float order."""
    if fmt == "xyxy":
        return boxes[..., :2], boxes[..., 2:]
    if fmt == "xywh":
        return boxes[..., :2], boxes[..., :2] + boxes[..., 2:]
    return boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2  # cxcywh


def _inter_union(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> tuple[Tensor, Tensor]:
    area1 = box_area(boxes1, fmt)
    area2 = box_area(boxes2, fmt)
    lt1, rb1 = _corners(boxes1[..., :, None, :], fmt)  # (..., N, 1, 2)
    lt2, rb2 = _corners(boxes2[..., None, :, :], fmt)  # (..., 1, M, 2)
    lt = torch.max(lt1, lt2)  # (..., N, M, 2)
    rb = torch.min(rb1, rb2)  # (..., N, M, 2)
    wh = _upcast(rb - lt).clamp(min=0)  # (..., N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (..., N, M)
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Pairwise IoU: Tensor[..., N, 4], Tensor[..., M, 4] in `fmt` ("xyxy", "xywh" or "cxcywh") -> Tensor[..., N, M].

    Two empty boxes give 0/0 = NaN, as in torchvision. Rotated formats (torchvision's "cxcywhr", "xywhr",
    "xyxyxyxy") are not supported: ValueError.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"Unsupported format '{fmt}'. Supported formats: {BOX_FORMATS}.")
    inter, union = _inter_union(boxes1, boxes2, fmt)
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x to [0, width] and y to [0, height]. boxes: Tensor[..., 4]; size: (height, width)."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)  # (..., 2, 2) -> (..., 4)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (Tensor[K] int64) of the boxes whose width and height are both >= min_size."""
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _threshold_below(iou_threshold: float, dtype: torch.dtype) -> float:
    """The largest value t of `dtype` with t <= iou_threshold.

    torchvision compares a float32 IoU with a float64 threshold (`ovr > iou_threshold` in C++); a float32
    tensor compared with a Python float rounds the threshold to float32 instead. For float32 x,
    x > iou_threshold exactly when x > t, so comparing against t reproduces the C++ comparison.
    """
    if dtype == torch.float64 or not math.isfinite(iou_threshold):
        return iou_threshold
    t = np.float32(iou_threshold)  # numpy, not a tensor: no tensor is made while torch.export traces
    if float(t) > iou_threshold:
        t = np.nextafter(t, np.float32(-math.inf))
    return float(t)


def _overlaps(rows: tuple[Tensor, ...], cols: tuple[Tensor, ...], threshold: float) -> Tensor:
    """Bool Tensor[R, C]: IoU(row box, column box) > threshold, in the float order of nms_kernel.cpp.

    rows, cols: (x1, y1, x2, y2, area) as contiguous Tensor[R] / Tensor[C]; row-major output so that the
    reductions over columns below run along contiguous memory.
    """
    rx1, ry1, rx2, ry2, rarea = (t[:, None] for t in rows)
    cx1, cy1, cx2, cy2, carea = (t[None, :] for t in cols)
    w = torch.min(rx2, cx2).sub_(torch.max(rx1, cx1)).clamp_(min=0)  # (R, C)
    h = torch.min(ry2, cy2).sub_(torch.max(ry1, cy1)).clamp_(min=0)
    inter = w.mul_(h)
    union = (rarea + carea).sub_(inter)
    return inter.div_(union) > threshold


def _none_per_row(mask: Tensor) -> Tensor:
    """Bool Tensor[R, C] -> Bool Tensor[R]: no True in the row (a uint8 max: far faster than `any` on CPU; `any`
    where C is 0, which max does not take, and in exported graphs, where C may be 0 and ONNX has no bool view)."""
    if torch.compiler.is_compiling() or mask.shape[1] == 0:
        return ~mask.any(dim=1)
    return mask.view(torch.uint8).amax(dim=1) == 0


def _fixpoint(candidate: Tensor, inner: Tensor, steps_per_check: int = 1) -> Tensor:
    """Bool Tensor[B]: the greedy decisions of one block, k[j] = candidate[j] and no kept i < j overlaps j
    (inner Bool Tensor[B, B], inner[j, i] for i < j), iterated from k = candidate until it stops changing.
    Each convergence check is a host read: `steps_per_check` steps between checks. Traced (torch.export), the
    loop is a torch.while_loop (an ONNX Loop) checked every step and bounded by B steps, which always suffice
    (each step settles at least one more decision): the bound also ends it where a runtime's `any` of nothing
    is True (onnxruntime's)."""
    def step(k: Tensor) -> Tensor:
        return candidate & _none_per_row(inner & k[None, :])

    if torch.compiler.is_compiling():
        bound = torch.full((), candidate.shape[0], device=candidate.device)

        def body(k: Tensor, changed: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            new = step(k)
            return new, (new != k).any(), steps + 1

        k, steps = step(candidate), torch.ones((), dtype=torch.int64, device=candidate.device)
        return torch.while_loop(lambda k, changed, steps: changed & (steps < bound), body,
                                (k, (k != candidate).any(), steps))[0]
    k = candidate
    while True:
        for _ in range(steps_per_check - 1):
            k = step(k)
        new_k = step(k)
        if torch.equal(new_k, k):
            return k
        k = new_k


def _greedy_keep_one_block(boxes: Tensor, threshold: float, labels: Tensor | None = None) -> Tensor:
    """`_greedy_keep` with all N boxes in one block: the traced form (N is a data-dependent size in an exported
    graph, so it cannot be cut into blocks). The same decisions, with (N, N) temporaries."""
    x1, y1, x2, y2 = boxes.unbind(1)
    coords = (x1, y1, x2, y2, (x2 - x1) * (y2 - y1))
    over = _overlaps(coords, coords, threshold)  # (N, N)
    if labels is not None:
        over &= labels[:, None] == labels[None, :]
    candidate = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return _fixpoint(candidate, torch.tril(over, diagonal=-1))


def _greedy_keep(boxes: Tensor, threshold: float, labels: Tensor | None = None, block: int | None = None,
                 cpu: bool = True) -> Tensor:
    """Bool Tensor[N]: greedy NMS decisions for boxes already sorted by descending score.

    boxes: Tensor[N, 4]; labels: optional Tensor[N], non-decreasing (boxes grouped by class); when given, only
    boxes with equal labels suppress each other. Block by block: a box survives the earlier blocks when no box
    kept there overlaps it; inside the block the greedy rule "keep j unless a kept i < j overlaps it" has one
    solution, reached by iterating it from "keep every survivor" (as many steps as the longest chain).
    On CPU a block holds 512 boxes and each comparison step at most 2^18 pairs (1 MiB per float32
    temporary, within L2): fewer, larger steps cost less dispatch than many small ones. Measured on 2 cores,
    1000 to 20000 boxes, quiet or with one core busy: 512 was fastest among 181..1024 (181, which keeps every
    op under ATen's parallel grain, was 1.5-3x slower). `cpu` False is the "gpu" form: blocks of 4096 boxes,
    whole-block comparison steps, a convergence check every 4 steps (each check is a host read).
    """
    N = boxes.shape[0]
    if block is None:
        block = 512 if cpu else 4096
    steps_per_check = 1 if cpu else 4
    x1, y1, x2, y2 = boxes.t()
    coords = torch.stack((x1, y1, x2, y2, (x2 - x1) * (y2 - y1)))  # (5, N): x1, y1, x2, y2, area
    keep = torch.zeros(N, dtype=torch.bool, device=boxes.device)
    kept = coords[:, :0]  # (5, n) the boxes kept so far
    kept_labels = labels[:0] if labels is not None else None
    for start in range(0, N, block):
        stop = min(start + block, N)
        B = stop - start
        blk = coords[:, start:stop]  # (5, B)
        blk_labels = labels[start:stop] if labels is not None else None
        first = 0
        if labels is not None and kept.shape[1] > 0:
            # class-major order: only the kept boxes of this block's classes, a suffix of `kept`, can suppress
            first = int(torch.searchsorted(kept_labels, blk_labels[:1]))
        # compare the block with the earlier kept boxes, in column chunks, and with itself (in the last chunk)
        cols = torch.cat((kept[:, first:], blk), dim=1)  # (5, n_prev + B)
        col_labels = torch.cat((kept_labels[first:], blk_labels)) if labels is not None else None
        n_prev = cols.shape[1] - B
        step = max(B, (1 << 18) // B) if cpu else cols.shape[1]  # columns per comparison step
        candidate = torch.ones(B, dtype=torch.bool, device=boxes.device)
        inner = None
        for c1 in range(cols.shape[1], 0, -step):  # from the end, so the first chunk holds the whole block
            c0 = max(0, c1 - step)
            over = _overlaps(blk.unbind(0), cols[:, c0:c1].unbind(0), threshold)  # (B, c1 - c0)
            if labels is not None:
                over &= blk_labels[:, None] == col_labels[None, c0:c1]
            if inner is None:  # inner[j, i]: box i < j of the block overlaps box j
                inner = torch.tril(over[:, -B:], diagonal=-1)  # (B, B)
            candidate &= _none_per_row(over[:, :max(0, min(c1, n_prev) - c0)])  # earlier kept boxes
        k = _fixpoint(candidate, inner, steps_per_check)
        keep[start:stop] = k
        if stop < N:  # the next blocks compare with this block's kept boxes
            k = torch.where(k)[0]
            kept = torch.cat((kept, blk[:, k]), dim=1)
            if labels is not None:
                kept_labels = torch.cat((kept_labels, blk_labels[k]))
    return keep


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    """torchvision's nms_kernel checks, with its exception type (RuntimeError)."""
    if boxes.dim() != 2:
        raise RuntimeError(f"boxes should be a 2d tensor, got {boxes.dim()}D")
    if boxes.size(1) != 4:
        raise RuntimeError(f"boxes should have 4 elements in dimension 1, got {boxes.size(1)}")
    if scores.dim() != 1:
        raise RuntimeError(f"scores should be a 1d tensor, got {scores.dim()}D")
    if boxes.size(0) != scores.size(0):
        raise RuntimeError("boxes and scores should have same number of elements in dimension 0, "
                           f"got {boxes.size(0)} and {scores.size(0)}")
    if not boxes.is_floating_point():  # kept: unlike torchvision, mixed float types (autocast) are accepted
        raise RuntimeError(f"boxes should be a floating point tensor, got {boxes.dtype}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, impl: str = "auto") -> Tensor:
    """Greedy non-maximum suppression, identical to torchvision.ops.nms and to `minseg.ops.reference.nms`.

    boxes: Tensor[N, 4] xyxy; scores: Tensor[N]. A box is dropped when its IoU with a kept higher-scored box
    is > iou_threshold. Returns Tensor[K] int64 indices of kept boxes, by decreasing score. float16/bfloat16
    boxes are compared in float32 (torchvision's CPU kernel does not accept them).
    impl: "auto", "cpu", "gpu" (`_greedy_keep`'s block sizes; the same result) or "reference".
    Malformed arguments raise RuntimeError, as torchvision's kernel.
    """
    _check_nms_inputs(boxes, scores)
    form = forms.choose(impl, boxes)
    if guard_or_false(boxes.numel() == 0):  # (unknown while tracing: the general path handles no boxes too)
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes = _upcast(boxes)
    if form == "reference":
        return reference.nms(boxes, scores, iou_threshold).to(boxes.device)
    # a stable sort: torchvision's kernel visits tied scores in index order
    order = scores.sort(dim=0, descending=True, stable=True)[1]
    threshold = _threshold_below(iou_threshold, boxes.dtype)
    if torch.compiler.is_compiling():
        return order[_greedy_keep_one_block(boxes[order], threshold)]
    return order[_greedy_keep(boxes[order], threshold, cpu=form == "cpu")]


def _class_aware_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, cpu: bool) -> Tensor:
    """torchvision's `_batched_nms_vanilla` (NMS class by class, then all kept indices sorted by score).

    One greedy pass over the boxes grouped by class and stably sorted by score inside each class, where only
    boxes of the same class suppress each other: the order and the decisions of a per-class NMS.
    """
    boxes = _upcast(boxes)
    order = scores.sort(dim=0, descending=True, stable=True)[1]
    order = order[idxs[order].sort(stable=True)[1]]  # grouped by class, by score inside a class
    keep = _greedy_keep(boxes[order], _threshold_below(iou_threshold, boxes.dtype), labels=idxs[order], cpu=cpu)
    keep_mask = torch.empty_like(scores, dtype=torch.bool)
    keep_mask[order] = keep  # order is a permutation: every box gets its decision
    kept = torch.where(keep_mask)[0]
    # kept: torchvision orders the result with the default (unstable) sort, so ties may interleave classes
    return kept[scores[kept].sort(descending=True)[1]]


def _per_class_above(boxes: Tensor) -> int:
    """torchvision's switch: batched_nms runs per class above this many box coordinates."""
    return 4000 if boxes.device.type == "cpu" else 100_000


def _batched_nms_traced(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """batched_nms as one graph (torch.export): N is a data-dependent size there, so torchvision's switch cannot
    be a Python branch. Both of its paths are one greedy pass over boxes grouped by a label (the offset path:
    shifted boxes, all one label, by score; the per-class path: boxes by class, then score), whose inputs and
    final order are picked by tensor selects. The same kept indices, in the same order, as the eager paths."""
    N = boxes.shape[0]
    per_class = torch.full((), N * 4, device=boxes.device) > _per_class_above(boxes)  # a 0-dim bool tensor
    max_coordinate = torch.cat((boxes.flatten(), boxes.new_full((1,), -math.inf))).max()  # no boxes: -inf
    shifted = _upcast(boxes + (idxs.to(boxes) * (max_coordinate + 1))[:, None])  # the offset path's boxes
    by_score = scores.sort(dim=0, descending=True, stable=True)[1]
    by_class = by_score[idxs[by_score].sort(stable=True)[1]]
    order = torch.where(per_class, by_class, by_score)
    grouped = torch.where(per_class, _upcast(boxes), shifted)[order]
    labels = torch.where(per_class, idxs[order], 0)
    keep = _greedy_keep_one_block(grouped, _threshold_below(iou_threshold, grouped.dtype), labels)
    keep_mask = torch.empty_like(scores, dtype=torch.bool)
    keep_mask[order] = keep
    kept = torch.where(keep_mask)[0]
    by_class_result = kept[scores[kept].sort(descending=True)[1]]  # _class_aware_nms's unstable sort
    by_score_result = by_score[keep_mask[by_score]]  # nms's order[keep]
    torch._check(by_class_result.shape[0] == by_score_result.shape[0])
    return torch.where(per_class, by_class_result, by_score_result)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, impl: str = "auto") -> Tensor:
    """NMS independently per category, identical to torchvision.ops.batched_nms (the same kept set as
    `minseg.ops.reference.batched_nms` for non-negative boxes; equal scores may come out in another order).

    boxes: Tensor[N, 4] xyxy; scores: Tensor[N]; idxs: Tensor[N] int category of each box.
    Returns Tensor[K] int64 kept indices by decreasing score.

    Follows torchvision/ops/boxes.py, including its switch: up to 4000 box coordinates on CPU (100,000 on
    CUDA) it shifts each category's boxes by idx * (max coordinate + 1) and runs one NMS (the shifted float
    coordinates round differently, so the switch is kept for parity); above that it runs NMS per category.
    impl: as nms's.
    """
    form = forms.choose(impl, boxes)
    if guard_or_false(boxes.numel() == 0):  # (unknown while tracing: the general path handles no boxes too)
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    _check_nms_inputs(boxes, scores)  # after the empty case, as torchvision's
    if form == "reference":
        return reference.batched_nms(_upcast(boxes), scores, idxs, iou_threshold).to(boxes.device)
    if torch.compiler.is_compiling():
        return _batched_nms_traced(boxes, scores, idxs, iou_threshold)
    if boxes.numel() > _per_class_above(boxes):
        return _class_aware_nms(boxes, scores, idxs, iou_threshold, cpu=form == "cpu")
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)  # (N,) one float32 add, as torchvision's tensor(1) add
    return nms(boxes + offsets[:, None], scores, iou_threshold, impl=form)
