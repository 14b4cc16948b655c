"""Anchor generators for the RPN: one set of cell anchors per FPN level, tiled over its feature grid.

Both originals tile the same way (location-major, anchor-minor: index = (y * W + x) * A + a) but build the
cell anchors and the grid strides differently:

- torchvision (models/detection/anchor_utils.py, AnchorGenerator): cell anchors are rounded to integers
  (torch.round, half to even) in float32; the stride of a level is padded_image_size // grid_size.
- detectron2 (modeling/anchor_generator.py, DefaultAnchorGenerator): cell anchors are exact float64 maths
  stored as float32, no rounding; strides are the nominal 4, 8, ..., offset 0.0.

Both are called the same way, so the RPN takes either: `generator(feature_maps, padded_size)` -> one
Tensor[H_l*W_l*A, 4] per level, and `generator.num_anchors_per_location()` -> A per level.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def torchvision_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Tensor[R*S, 4] zero-centred xyxy anchors, ratio-major (aspect ratio = height / width), rounded."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)  # (R*S,)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def detectron2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Tensor[S*R, 4] zero-centred xyxy anchors, size-major: w = sqrt(s^2 / a), h = a * w, in float64."""
    anchors = []
    for size in sizes:
        area = size**2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_anchors(cell_anchors: Tensor, grid_size: tuple[int, int], stride: tuple[float, float],
                 offset: float = 0.0) -> Tensor:
    """Tile cell anchors Tensor[A, 4] over a (H, W) grid -> Tensor[H*W*A, 4], row-major then anchor.

    The anchor of cell (y, x) is centred at ((x + offset) * stride_w, (y + offset) * stride_h).
    """
    H, W = grid_size
    stride_h, stride_w = stride
    device = cell_anchors.device
    # (a stride from sizes is a torch.SymInt under torch.export: an integer whatever its value)
    if offset == 0.0 and all(isinstance(s, torch.SymInt) or float(s).is_integer() for s in stride):
        # torchvision's integer shifts (int64 arange * stride); equal to detectron2's float arange for offset 0
        shifts_x = torch.arange(0, W, dtype=torch.int64, device=device) * torch.sym_int(stride_w)
        shifts_y = torch.arange(0, H, dtype=torch.int64, device=device) * torch.sym_int(stride_h)
    else:
        shifts_x = torch.arange(offset * stride_w, W * stride_w, step=stride_w, dtype=torch.float32, device=device)
        shifts_y = torch.arange(offset * stride_h, H * stride_h, step=stride_h, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # (H, W) each
    shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # (H*W, 4)
    return (shifts.view(-1, 1, 4) + cell_anchors.view(1, -1, 4)).reshape(-1, 4)  # (H*W*A, 4)


class AnchorGenerator(nn.Module):
    """torchvision's AnchorGenerator as a function of feature-map and image sizes.

    sizes[l] and aspect_ratios[l] give the anchors of level l (Mask R-CNN: ((32,), (64,), ..., (512,)) and
    ((0.5, 1.0, 2.0),) * 5). forward(feature_maps, padded_size) -> per level Tensor[H_l*W_l*A_l, 4] in the
    dtype and device of the feature maps; the same anchors serve every image of the batch (torchvision
    concatenates the levels).
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = ((128, 256, 512),),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),)):
        super().__init__()
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = tuple(aspect_ratios) * len(sizes)
        self.sizes, self.aspect_ratios = tuple(sizes), tuple(aspect_ratios)
        self.cell_anchors = [torchvision_cell_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def forward(self, feature_maps: list[Tensor], padded_size: tuple[int, int]) -> list[Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        anchors = []
        for cells, feature in zip(self.cell_anchors, feature_maps):
            H, W = feature.shape[-2:]
            # kept: stride = padded size // grid size, so a level whose size is not an exact divisor
            # (e.g. 800 // 13 = 61 on p6) gets torchvision's stride, not the nominal one
            stride = (padded_size[0] // H, padded_size[1] // W)
            cells = cells.to(device=device, dtype=dtype, non_blocking=True)  # host to GPU without a sync
            anchors.append(grid_anchors(cells, (H, W), stride))
        return anchors


class DefaultAnchorGenerator(nn.Module):
    """detectron2's DefaultAnchorGenerator: fixed strides, offset 0.0 by default, unrounded cell anchors.

    forward(feature_maps, padded_size=None) -> list of Tensor[H_l*W_l*A, 4] float32, one per level (the padded
    size is not needed: the strides are fixed). The cell anchors are buffers (`cell_anchors.{l}` in detectron2's state dict, non-persistent here).
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
                 strides: Sequence[int] = (4, 8, 16, 32, 64), offset: float = 0.0):
        super().__init__()
        if len(aspect_ratios) == 1 and len(sizes) > 1:
            aspect_ratios = tuple(aspect_ratios) * len(sizes)
        self.strides, self.offset = tuple(strides), offset
        self._cells = [detectron2_cell_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        for i, cells in enumerate(self._cells):
            self.register_buffer(f"cell_anchors_{i}", cells, persistent=False)

    def num_anchors_per_location(self) -> list[int]:
        return [len(c) for c in self._cells]

    def forward(self, feature_maps: list[Tensor], padded_size: tuple[int, int] | None = None) -> list[Tensor]:
        out = []
        for i, feature in enumerate(feature_maps):
            cells = getattr(self, f"cell_anchors_{i}")
            H, W = feature.shape[-2:]
            stride = self.strides[i]
            out.append(grid_anchors(cells.to(feature.device), (H, W), (stride, stride), self.offset).float())
        return out
