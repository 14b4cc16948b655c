"""Multi-scale RoI pooling for FPNs: each RoI is pooled from the pyramid level that suits its size.

FPN paper eq. 1: level = floor(k0 + log2(sqrt(w * h) / 224)), clamped to the available levels. The two
originals place the epsilon differently, which moves boxes sitting exactly on a level boundary; the rule is a
function passed to the pooler, one per original:
- torchvision (ops/poolers.py, LevelMapper): floor(k0 + log2(sqrt(area) / 224) + 1e-6)
- detectron2 (modeling/poolers.py, assign_boxes_to_levels): floor(k0 + log2(sqrt(area) / 224 + 1e-8))

Instead of one roi_align call per level, all levels go into one channels-last table and every RoI reads from
its own level's rows (`roi_align_table`), in one pass and without data-dependent shapes. Per RoI the result is
exactly what roi_align on its level gives. Inside a `shared_feature_tables()` block, poolers that read the
same feature tensors share one table (RoIHeads' box and mask poolers: one copy of the pyramid, not two).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from minseg.ops.boxes import box_area
from minseg.ops import forms
from minseg.ops.forms import copy_to_device
from minseg.ops.feature_table import compute_dtype, feature_table
from minseg.ops.roi_align import _pair, boxes_to_rois, roi_align_table

LevelRule = Callable[[Tensor, int, int, int, int], Tensor]  # (boxes xyxy, k_min, k_max, canonical scale, level)


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


_tables: contextvars.ContextVar[list | None] = contextvars.ContextVar("minseg_feature_tables", default=None)


@contextlib.contextmanager
def shared_feature_tables() -> Iterator[None]:
    """Within the block (or the decorated function), poolers given the same feature tensors reuse one
    `feature_table` of them instead of copying the pyramid again (at 2x 800x1088 the copy of p2..p5 is ~150 MB
    and ~100-350 ms on 2 CPU cores). The features must not be changed in place inside the block; the tables
    are dropped when it ends. Per thread (a context variable); outside any block every call makes its own."""
    token = _tables.set([])
    try:
        yield
    finally:
        _tables.reset(token)


def _table_of(features: list[Tensor], dtype: torch.dtype) -> Tensor:
    """`feature_table(features, dtype)`, shared inside a `shared_feature_tables()` block."""
    cache = _tables.get()
    if cache is None:
        return feature_table(features, dtype)
    for feats, table in cache:  # a few entries at most; `is`: the same tensors, held alive by the cache
        if table.dtype == dtype and len(feats) == len(features) and all(a is b for a, b in zip(feats, features)):
            return table
    table = feature_table(features, dtype)
    cache.append((list(features), table))
    return table


def multiscale_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                         output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool, *,
                         impl: str = "auto") -> Tensor:
    """Pool each RoI from its level (minseg's list form of the pooler).

    features: per level Tensor[N, C, H_l, W_l]; rois: Tensor[K, 5] (batch index, xyxy in image pixels);
    levels: Tensor[K] int64 in [0, len(features)), any other value leaves the RoI zero (a box of negative area
    has a NaN size and so no level: both originals then pool it nowhere); scales: spatial scale of each level;
    impl: "auto", "cpu" or "gpu", as roi_align's. Returns Tensor[K, C, Ph, Pw] in the features' dtype.
    Gradients flow to the features, not to the RoIs (as torchvision's).
    """
    form = forms.choose(impl, features[0])
    if form == "reference":
        raise ValueError("multiscale_roi_align has no reference form; pool each level with roi_align(impl='reference')")
    dtype = compute_dtype(features[0].dtype)
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
    base = first_row[levels] + rois[:, 0].detach().long() * height * width
    out = roi_align_table(_table_of(features, dtype), rois, base, height, width, level_scale[levels], output_size,
                          sampling_ratio, aligned, impl=form)
    return out.masked_fill_(~assigned[:, None, None, None], 0).to(features[0].dtype)


def infer_scale(feature: Tensor, image_size: tuple[int, int]) -> float:
    """torchvision's _infer_scale: the power of two closest to feature height / image height.

    Under torch.export the sizes are symbolic and the scale is that of the sizes traced: the exported program
    keeps it for every size. For a feature of stride s <= 32 of an image padded to a multiple of s, that is the
    same scale, 1 / s, for any (largest, resized) image height over 77 px: at 77 or less, eager can round to 2 / s.
    """
    height, image_height = (size_hint(n) for n in (feature.shape[-2], image_size[0]))
    approx = float(height) / float(image_height)
    return 2 ** float(torch.tensor(approx).log2().round())


def size_hint(n: int | torch.SymInt) -> int:
    """A size, or the value a symbolic size (torch.export) had in the example it was traced with."""
    return n.node.hint if isinstance(n, torch.SymInt) else n


class MultiScaleRoIAlign(nn.Module):
    """FPN RoI pooler, a drop-in for torchvision.ops.MultiScaleRoIAlign (same constructor and forward).

    featmap_names: the keys of the levels to pool from (finest first); sampling_ratio, canonical_scale,
    canonical_level: as torchvision's. minseg's keyword-only additions: `aligned` (RoIAlign's half-pixel
    shift), `level_rule` (a function (boxes, k_min, k_max, canonical_scale, canonical_level) -> Tensor[K]
    level index; torchvision's by default, `assign_levels_detectron2` for detectron2's ROIPooler) and `scales`
    (the levels' spatial scales; inferred from the feature and image sizes when not given, as torchvision).
    forward(x: dict of Tensor[N, C, H_l, W_l], boxes: list of N Tensor[L_i, 4] xyxy in image pixels,
    image_shapes: list of (height, width)) -> Tensor[sum L_i, C, Ph, Pw].
    Unlike torchvision, inferred scales are not kept from the first call: each call infers them.
    """

    def __init__(self, featmap_names: list[str], output_size: int | tuple[int, int] | list[int],
                 sampling_ratio: int, *, canonical_scale: int = 224, canonical_level: int = 4,
                 aligned: bool = False, level_rule: LevelRule = assign_levels_torchvision,
                 scales: list[float] | None = None):
        super().__init__()
        self.featmap_names, self.output_size, self.sampling_ratio = featmap_names, _pair(output_size), sampling_ratio
        self.canonical_scale, self.canonical_level = canonical_scale, canonical_level
        self.aligned, self.level_rule, self.scales = aligned, level_rule, scales

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]  # kept: x's order, as torchvision
        scales = self.scales
        if scales is None:
            if not image_shapes:
                raise ValueError("images list should not be empty")
            largest = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
            scales = [infer_scale(f, largest) for f in features]
        rois = boxes_to_rois(boxes)
        box_cat = rois[:, 1:]
        if len(features) == 1:  # kept: both originals pool a single level without assigning levels
            levels = torch.zeros(len(box_cat), dtype=torch.int64, device=box_cat.device)
        else:
            k_min = int(-torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item())
            k_max = int(-torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item())
            levels = self.level_rule(box_cat, k_min, k_max, self.canonical_scale, self.canonical_level)
        return multiscale_roi_align(features, rois, levels, scales, self.output_size, self.sampling_ratio,
                                    self.aligned)

    def __repr__(self) -> str:  # torchvision's
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
                f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})")
