"""YOLACT's box arithmetic: square priors, encoding and decoding with variances (0.1, 0.2), coordinate sanitising
and mask crop.

Follows dbolya/yolact `yolact.py` (PredictionModule.make_priors) and `layers/box_utils.py` (point_form, encode,
decode, sanitize_coordinates, crop) operation for operation, so the results are bitwise equal to the original's on CPU.

Conventions (all relative to the network input, 0..1, never clipped):
  priors_cxcywh  Tensor[P, 4] prior boxes as (cx, cy, w, h)
  boxes_rel      Tensor[..., 4] decoded boxes as (x1, y1, x2, y2)
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def yolact_priors(feature_sizes: Sequence[tuple[int, int]], scales: Sequence[float], aspect_ratios: Sequence[float],
                  max_size: int, square: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """Prior boxes of every level, in the order the head predicts them: level, then row y, column x, anchor.

    feature_sizes: (H, W) of each level; scales: one pixel scale per level (e.g. 24, 48, ... for P3..P7);
    aspect_ratios: the per-location ratios (1, 1/2, 2); max_size: the configured input size (550), used to
    normalise even when the actual input differs, as the original does.
    square=True keeps the original's `use_square_anchors` quirk: h = w, so every prior is a square whose side
    is scale * sqrt(ratio) / max_size (kept: the released weights were trained with it).
    Returns priors_cxcywh Tensor[P, 4] float32, computed in float64 and rounded once, like the original's
    Python-float loop.
    """
    levels = []
    for (H, W), scale in zip(feature_sizes, scales, strict=True):
        # side lengths per anchor, exactly as the original's Python floats: (scale * sqrt(a)) / max_size
        ws = [scale * math.sqrt(a) / max_size for a in aspect_ratios]
        hs = ws if square else [scale / math.sqrt(a) / max_size for a in aspect_ratios]
        A = len(ws)
        cx = (torch.arange(W, dtype=torch.float64) + 0.5) / W
        cy = (torch.arange(H, dtype=torch.float64) + 0.5) / H
        grid = torch.empty(H, W, A, 4, dtype=torch.float64)
        grid[..., 0] = cx[None, :, None]
        grid[..., 1] = cy[:, None, None]
        grid[..., 2] = torch.tensor(ws, dtype=torch.float64)
        grid[..., 3] = torch.tensor(hs, dtype=torch.float64)
        levels.append(grid.reshape(H * W * A, 4))  # (H*W*A, 4), rows ordered (y, x, anchor)
    return torch.cat(levels).float().to(device=device, non_blocking=True)  # host to GPU without a sync


def decode_yolact(loc: torch.Tensor, priors_cxcywh: torch.Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> torch.Tensor:
    """SSD-style decoding: Tensor[..., P, 4] offsets + priors Tensor[P, 4] -> boxes_rel Tensor[..., P, 4].

    Float order of layers/box_utils.py decode (kept for bitwise parity): the offset is scaled by the variance
    first, then by the prior size, and x2 = x1 + w rather than cx + w / 2.
    """
    cxcy = priors_cxcywh[..., :2] + loc[..., :2] * variances[0] * priors_cxcywh[..., 2:]
    wh = priors_cxcywh[..., 2:] * torch.exp(loc[..., 2:] * variances[1])
    x1y1 = cxcy - wh / 2
    return torch.cat([x1y1, wh + x1y1], dim=-1)


def priors_to_xyxy(priors_cxcywh: torch.Tensor) -> torch.Tensor:
    """Tensor[P, 4] (cx, cy, w, h) -> Tensor[P, 4] (x1, y1, x2, y2), as box_utils.py point_form (cx - w / 2)."""
    cxcy, wh = priors_cxcywh[:, :2], priors_cxcywh[:, 2:]
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1)


def encode_yolact(boxes_rel: torch.Tensor, priors_cxcywh: torch.Tensor,
                  variances: tuple[float, float] = (0.1, 0.2)) -> torch.Tensor:
    """The regression targets decode_yolact inverts: boxes_rel Tensor[P, 4] matched to priors Tensor[P, 4] ->
    offsets Tensor[P, 4] ((dcx, dcy) / (variance * prior wh), log(wh / prior wh) / variance).

    Float order of box_utils.py encode (kept for parity): centre offset divided by variance * prior size in one go.
    """
    cxcy = (boxes_rel[:, :2] + boxes_rel[:, 2:]) / 2 - priors_cxcywh[:, :2]
    cxcy = cxcy / (variances[0] * priors_cxcywh[:, 2:])
    wh = (boxes_rel[:, 2:] - boxes_rel[:, :2]) / priors_cxcywh[:, 2:]
    return torch.cat([cxcy, torch.log(wh) / variances[1]], 1)


def sanitize_coordinates(a: torch.Tensor, b: torch.Tensor, size: int, padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative coordinates Tensor[K] (a pair such as x1, x2) -> absolute (low, high) floats in [0, size].

    Scaled by `size`, ordered so low <= high, widened by `padding` and clamped to the image (box_utils.py
    sanitize_coordinates with cast=False).
    """
    a, b = a * size, b * size
    low, high = torch.min(a, b), torch.max(a, b)
    return torch.clamp(low - padding, min=0), torch.clamp(high + padding, max=size)


def crop_masks(masks: torch.Tensor, boxes_rel: torch.Tensor, padding: int = 1) -> torch.Tensor:
    """Zero every mask outside its (padded) box: Tensor[H, W, K] masks, Tensor[K, 4] boxes_rel -> Tensor[H, W, K].

    The bounds stay floats in mask pixels; a pixel (row, col) is kept when x1 <= col < x2 and y1 <= row < y2
    (box_utils.py crop, padding 1 as the original's default).
    """
    H, W, K = masks.shape
    x1, x2 = sanitize_coordinates(boxes_rel[:, 0], boxes_rel[:, 2], W, padding)
    y1, y2 = sanitize_coordinates(boxes_rel[:, 1], boxes_rel[:, 3], H, padding)
    cols = torch.arange(W, device=masks.device, dtype=x1.dtype).view(1, W, 1)
    rows = torch.arange(H, device=masks.device, dtype=x1.dtype).view(H, 1, 1)
    keep = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)  # (H, W, K)
    return masks * keep.to(masks.dtype)
