"""Multi-scale RoI pooling for FPNs: each RoI is pooled from the pyramid level that suits its size.

FPN paper eq. 1: level = floor(k0 + log2(sqrt(w * h) / 224)), clamped to the available levels. The two
originals place the epsilon differently, which moves boxes sitting exactly on a level boundary, so both are
here:
- torchvision (ops/poolers.py, LevelMapper): floor(k0 + log2(sqrt(area) / 224) + 1e-6)
- detectron2 (modeling/poolers.py, assign_boxes_to_levels): floor(k0 + log2(sqrt(area) / 224 + 1e-8))

Instead of one roi_align call per level, all levels go into one channels-last table and every RoI reads from
its own level's rows, in one pass and without data-dependent shapes. Per RoI the result is exactly what
roi_align on its level gives.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from minseg.ops.boxes import box_area
from minseg.ops import forms
from minseg.ops.forms import copy_to_device
from minseg.ops.roi_align import _compute_dtype, _pair, _pool, boxes_to_rois, feature_table


def assign_levels_torchvision(boxes: Tensor, k_min: int, k_max: int, canonical_scale: int = 224,
                              canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """torchvision's LevelMapper. boxes: Tensor[K, 4] xyxy -> Tensor[K] int64 level index minus k_min."""
    s = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return torch.clamp(levels, min=k_min, max=k_max).to(torch.int64) - k_min


def assign_levels_detectron2(boxes: Tensor, min_level: int, max_level: int, canonical_box_size: int = 224,
                             canonical_level: int = 4) -> Tensor:
    """detectron2's assign_boxes_to_levels. boxes: Tensor[K, 4] -> Tensor[K] int64 level minus min_level."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level


def multiscale_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                         output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool,
                         table: Tensor | None = None, *, impl: str = "auto") -> Tensor:
    """Pool each RoI from its level.

    features: per level Tensor[N, C, H_l, W_l]; rois: Tensor[K, 5] (batch index, xyxy in image pixels);
    levels: Tensor[K] int64 in [0, len(features)), any other value leaves the RoI zero (a box of negative area
    has a NaN size and so no level: both originals then pool it nowhere); scales: spatial scale of each level;
    table: the features' `feature_table`, when the caller already made it (to pool the same features twice with
    one copy); impl: "auto", "cpu" or "gpu", as roi_align's.
    Returns Tensor[K, C, Ph, Pw] in the features' dtype.
    """
    form = forms.choose(impl, features[0])
    if form == "reference":
        raise ValueError("multiscale_roi_align has no reference form; pool each level with roi_align(impl='reference')")
    dtype = _compute_dtype(features[0].dtype)
    device = rois.device
    rois = rois.to(dtype)
    assigned = (levels >= 0) & (levels < len(features))  # (K,)
    levels = levels.clamp(0, len(features) - 1)
    sizes = [f.shape[0] * f.shape[2] * f.shape[3] for f in features]
    first_row = copy_to_device([sum(sizes[:l]) for l in range(len(sizes))], torch.int64, device)  # (L,) level starts
    heights = copy_to_device([f.shape[2] for f in features], torch.int64, device)
    widths = copy_to_device([f.shape[3] for f in features], torch.int64, device)
    level_scale = copy_to_device(scales, dtype, device)
    height, width = heights[levels], widths[levels]  # (K,)
    base = first_row[levels] + rois[:, 0].long() * height * width
    table = feature_table(features, dtype) if table is None else table
    out = _pool(table, rois, base, height, width, level_scale[levels], _pair(output_size), sampling_ratio, aligned,
                fused=form == "gpu")
    return out.masked_fill_(~assigned[:, None, None, None], 0).to(features[0].dtype)


def infer_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """torchvision's _infer_scale: the power of two closest to feature height / image height."""
    approx = float(feature.shape[-2]) / float(image_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


class MultiScaleRoIAlign(nn.Module):
    """FPN RoI pooler with either original's level rule.

    level_rule "torchvision": torchvision's MultiScaleRoIAlign (aligned=False, sampling_ratio 2 in Mask
    R-CNN); scales inferred from the feature and image sizes when not given. "detectron2": detectron2's
    ROIPooler with ROIAlignV2 (aligned=True, sampling_ratio 0) and scales 1/4 .. 1/32.
    forward(features: list of Tensor[N, C, H_l, W_l] (finest first), boxes: list of N Tensor[L_i, 4],
    image_sizes: list of (height, width), used only to infer scales, table: optional `feature_table(features)`
    shared by poolers that read the same features) -> Tensor[sum L_i, C, Ph, Pw].
    """

    def __init__(self, output_size: int | tuple[int, int], sampling_ratio: int, *, aligned: bool = False,
                 level_rule: str = "torchvision", scales: list[float] | None = None,
                 canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if level_rule not in ("torchvision", "detectron2"):
            raise ValueError(f"level_rule must be 'torchvision' or 'detectron2', got {level_rule!r}")
        self.output_size, self.sampling_ratio, self.aligned = _pair(output_size), sampling_ratio, aligned
        self.level_rule, self.scales = level_rule, scales
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level

    def forward(self, features: list[Tensor], boxes: list[Tensor],
                image_sizes: list[tuple[int, int]] | None = None, table: Tensor | None = None) -> Tensor:
        scales = self.scales
        if scales is None:
            if not image_sizes:
                raise ValueError("image_sizes are needed to infer the scales of the levels")
            largest = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
            scales = [infer_scale(f, largest) for f in features]
        rois = boxes_to_rois(boxes)
        k_min = int(-torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item())
        k_max = int(-torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item())
        box_cat = torch.cat(boxes) if isinstance(boxes, (list, tuple)) else rois[:, 1:]
        if len(features) == 1:  # kept: both originals pool a single level without assigning levels
            levels = torch.zeros(len(box_cat), dtype=torch.int64, device=box_cat.device)
        elif self.level_rule == "torchvision":
            levels = assign_levels_torchvision(box_cat, k_min, k_max, self.canonical_scale, self.canonical_level)
        else:
            levels = assign_levels_detectron2(box_cat, k_min, k_max, self.canonical_scale, self.canonical_level)
        return multiscale_roi_align(features, rois, levels, scales, self.output_size, self.sampling_ratio,
                                    self.aligned, table)
