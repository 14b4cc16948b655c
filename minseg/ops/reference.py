"""The plain math of minseg's operators: one short function per operator, loops over bins, boxes and masks.

Read these to learn what an operator computes; the fast forms (`minseg.ops.roi_align`, `nms`, the pastes,
`fast_nms`, panoptic fusion) compute the same thing in a few large tensor steps, and each names its reference
here and states how equal they are. The tests hold every fast form equal to its reference, and every reference
equal to a float64 formula or to the original (torchvision, detectron2, YOLACT).

Each function follows its original's arithmetic where it matters (the float type of a position, which side of a
threshold is kept, the order of ties), so the equalities can be exact; a comment marks each such choice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------------- RoIAlign

def _bilinear(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """image Tensor[C, H, W] at the point (y, x) (0-dim tensors of image's dtype), as RoIAlign samples it:
    0 outside [-1, H] x [-1, W]; a point in [-1, 0] reads row (column) 0; one past H - 1 reads the last row."""
    C, H, W = image.shape
    if not (-1.0 <= y <= H and -1.0 <= x <= W):  # also NaN
        return image[:, 0, 0] * 0.0  # weight 0 on pixel (0, 0): an inf or NaN there still shows, as in the kernel
    y, x = y.clamp(min=0), x.clamp(min=0)
    y0, x0 = int(y), int(x)
    y1, x1 = y0 + 1, x0 + 1
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = torch.full_like(y, y0)
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = torch.full_like(x, x0)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    # four products, summed left to right (torchvision's kernel order)
    return hy * hx * image[:, y0, x0] + hy * lx * image[:, y0, x1] + ly * hx * image[:, y1, x0] + ly * lx * image[:, y1, x1]


def roi_align(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """RoIAlign (He et al. 2017): each output bin is the mean of a g_h x g_w grid of bilinear samples.

    input: Tensor[N, C, H, W]; rois: Tensor[K, 5] (batch index, x1, y1, x2, y2) in image coordinates, mapped
    onto the feature map by `spatial_scale`. Returns Tensor[K, C, Ph, Pw].
    With `aligned`, pixel centres sit at .5 (the RoI is shifted by half a pixel); without it a RoI is at least
    1x1. g = sampling_ratio, or ceil(roi size / P) per RoI and axis when sampling_ratio <= 0.
    Positions are computed in the input's float type, as torchvision's kernel does.
    """
    Ph, Pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    K, C = rois.shape[0], input.shape[1]
    out = input.new_zeros((K, C, Ph, Pw))
    offset = 0.5 if aligned else 0.0
    for k in range(K):
        b, x1, y1, x2, y2 = rois[k].to(input.dtype)
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
        bin_h, bin_w = roi_h / Ph, roi_w / Pw
        g_h = sampling_ratio if sampling_ratio > 0 else int(torch.ceil(roi_h / Ph))
        g_w = sampling_ratio if sampling_ratio > 0 else int(torch.ceil(roi_w / Pw))
        count = max(g_h * g_w, 1)
        image = input[int(b)]
        for ph in range(Ph):
            for pw in range(Pw):
                total = input.new_zeros(C)
                for iy in range(g_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / g_h
                    for ix in range(g_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / g_w
                        total = total + _bilinear(image, y, x)
                out[k, :, ph, pw] = total / count
    return out


# --------------------------------------------------------------------------------------------------------- NMS

def _iou(a: Tensor, b: Tensor) -> float:
    """IoU of two xyxy boxes (Tensor[4]) in their float type, no +1, as torchvision's nms kernel computes it."""
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = w * h
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area_a + area_b - inter))


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: visit boxes by descending score; keep a box unless a kept box overlaps it by IoU >
    iou_threshold. boxes: Tensor[N, 4] xyxy; scores: Tensor[N]. Returns kept indices, by descending score.
    Equal scores are visited in index order. The IoU (in the boxes' float type) is compared with the threshold
    as a Python float (double), as torchvision's kernel compares a float with a double; a NaN IoU (two empty
    boxes) suppresses nothing."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    keep: list[int] = []
    for i in order:
        if all(not _iou(boxes[j], boxes[i]) > iou_threshold for j in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category `idxs` (Tensor[N] int), never across. Returns kept indices by descending score."""
    keep = [torch.where(idxs == c)[0][nms(boxes[idxs == c], scores[idxs == c], iou_threshold)]
            for c in torch.unique(idxs).tolist()]
    keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
    return keep[torch.argsort(scores[keep], descending=True, stable=True)]


def fast_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.5, top_k: int = 200,
             max_detections: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """Fast NMS (Bolya et al. 2019): per class, among its top_k candidates by score, a candidate survives when
    its IoU with EVERY higher-scored candidate (suppressed or not) is <= iou_threshold. Survivors of all classes
    are sorted by score and the first max_detections returned.

    boxes: Tensor[N, 4] xyxy; scores: Tensor[C, N]. Returns (index into boxes, class, score), each Tensor[K].
    Kept as YOLACT: `<=` (an IoU equal to the threshold survives), compared in float32.
    """
    threshold = float(torch.tensor(iou_threshold, dtype=torch.float32))  # the original compares in float32
    kept = []  # (score, class, index)
    for c in range(scores.shape[0]):
        order = torch.argsort(scores[c], descending=True, stable=True)[:top_k].tolist()
        for pos, j in enumerate(order):
            if all(_iou(boxes[i], boxes[j]) <= threshold for i in order[:pos]):
                kept.append((float(scores[c, j]), c, j))
    kept = sorted(kept, key=lambda t: -t[0])[:max_detections]  # a stable sort: ties stay class-major
    index = torch.tensor([j for _, _, j in kept], dtype=torch.int64)
    classes = torch.tensor([c for _, c, _ in kept], dtype=torch.int64)
    return index, classes, scores[classes, index]


# ---------------------------------------------------------------------------------------------- mask pasting

def paste_masks_torchvision(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """torchvision's paste (Detectron1 style), one mask at a time: pad the M x M mask by `padding` zeros, grow
    its box about the centre by (M + 2 padding) / M, truncate the box to integers, resize the padded mask
    bilinearly (align_corners=False) to the box's integer size and copy the part inside the image into a zero
    image. masks: Tensor[N, 1, M, M]; boxes: Tensor[N, 4] xyxy. Returns Tensor[N, 1, H, W]."""
    H, W = image_shape
    N, _, M, _ = masks.shape
    out = masks.new_zeros((N, 1, H, W))
    scale = (M + 2 * padding) / M
    for n in range(N):
        x1, y1, x2, y2 = boxes[n]  # 0-dim tensors: the growth is computed in the boxes' float type, as torchvision
        half_w, half_h = (x2 - x1) * 0.5 * scale, (y2 - y1) * 0.5 * scale
        cx, cy = (x2 + x1) * 0.5, (y2 + y1) * 0.5
        x0, y0, x1, y1 = (int(v) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))  # truncation
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        padded = F.pad(masks[n, 0], (padding,) * 4)
        resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        # the image window [y0, y1] x [x0, x1] clipped to the image, and the matching part of the resized mask
        top, bottom, left, right = max(y0, 0), min(y1 + 1, H), max(x0, 0), min(x1 + 1, W)
        if top < bottom and left < right:
            out[n, 0, top:bottom, left:right] = resized[top - y0:bottom - y0, left - x0:right - x0]
    return out


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int],
                           threshold: float = 0.5) -> Tensor:
    """detectron2's paste, one mask at a time: sample the mask (bilinear, grid_sample with align_corners=False)
    at the centres of the image pixels mapped into the float box, and threshold (>= threshold; soft * 255 as
    uint8 when threshold < 0). Only the window [floor(x1) - 1, ceil(x2) + 1) x [floor(y1) - 1, ceil(y2) + 1),
    clipped to the image, is sampled (detectron2's CPU path); the rest stays 0.
    masks: Tensor[N, M, M]; boxes: Tensor[N, 4] xyxy. Returns Tensor[N, H, W] bool (uint8 when threshold < 0)."""
    H, W = image_shape
    out = torch.zeros(len(masks), H, W, dtype=torch.bool if threshold >= 0 else torch.uint8)
    for n, (mask, box) in enumerate(zip(masks.float(), boxes)):
        left, top = max(math.floor(box[0]) - 1, 0), max(math.floor(box[1]) - 1, 0)
        right, bottom = min(math.ceil(box[2]) + 1, W), min(math.ceil(box[3]) + 1, H)
        if bottom <= top or right <= left:
            continue
        # pixel centres in [-1, 1] box coordinates, in the original's float order
        ys = (torch.arange(top, bottom, dtype=torch.float32) + 0.5 - box[1]) / (box[3] - box[1]) * 2 - 1
        xs = (torch.arange(left, right, dtype=torch.float32) + 0.5 - box[0]) / (box[2] - box[0]) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=2)  # (h, w, (x, y))
        soft = F.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0]
        out[n, top:bottom, left:right] = soft >= threshold if threshold >= 0 else (soft * 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------- panoptic fusion

def panoptic_fusion(scores: Tensor, labels: Tensor, masks: Tensor, semantic: Tensor, *,
                    instances_score_thresh: float = 0.5, overlap_thresh: float = 0.5, stuff_area_thresh: int = 4096,
                    things_label: int = 0) -> tuple[Tensor, list[dict]]:
    """Panoptic FPN's fusion (Kirillov et al. 2019; detectron2's combine_semantic_and_instance_outputs), one
    instance at a time: things by descending score (stop below instances_score_thresh) each take their free
    pixels unless empty or more than overlap_thresh of the mask is taken; then each stuff class (ascending,
    not things_label) fills its free pixels if at least stuff_area_thresh remain.
    scores Tensor[K], labels Tensor[K], masks Tensor[K, H, W] bool, semantic Tensor[H, W] int64 ->
    (panoptic Tensor[H, W] int32, 0 = void; segments_info in id order, as detectron2 returns them)."""
    panoptic = torch.zeros(semantic.shape, dtype=torch.int32)
    segments: list[dict] = []
    for i in torch.argsort(-scores).tolist():  # kept: argsort of -scores, as the original
        if scores[i] < instances_score_thresh:
            break
        area = int(masks[i].sum())
        if area == 0 or int((masks[i] & (panoptic > 0)).sum()) / area > overlap_thresh:
            continue
        panoptic[masks[i] & (panoptic == 0)] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "isthing": True, "score": float(scores[i]),
                         "category_id": int(labels[i]), "instance_id": i})
    for label in torch.unique(semantic).tolist():
        free = (semantic == label) & (panoptic == 0)
        if label == things_label or int(free.sum()) < stuff_area_thresh:
            continue
        panoptic[free] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "isthing": False, "category_id": label, "area": int(free.sum())})
    return panoptic, segments
