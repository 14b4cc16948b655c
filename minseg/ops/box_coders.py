"""Box coders: boxes <-> regression deltas (dx, dy, dw, dh), in each original's exact float order.

Both originals use the R-CNN parameterisation: centre offsets relative to the reference box size, log-ratios
of sizes, each multiplied by a weight; decoding clamps dw, dh at log(1000/16) before `exp`. They differ only
in small details that change the last bits, which parity needs, so each is written out in its own order:

- `BoxCoder`: torchvision/models/detection/_utils.py (BoxCoder, encode_boxes); Mask R-CNN uses weights
  (1, 1, 1, 1) in the RPN and (10, 10, 5, 5) in the box head.
- `Box2BoxTransform`: detectron2/modeling/box_regression.py; decodes in float32 whatever the input dtype.

Both have one interface, so a head takes either: `encode(targets, references)` -> deltas Tensor[N, 4] of the
target boxes relative to the reference boxes (anchors or proposals), and `decode(deltas, references)` ->
boxes. Boxes are absolute xyxy `Tensor[N, 4]`; deltas for K classes per box are `Tensor[N, K*4]` laid out
(dx, dy, dw, dh) per class.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """torchvision's BoxCoder.

    encode(targets, references): Tensor[N, 4] x2 -> Tensor[N, 4] (torchvision's `encode_single`).
    decode(deltas, references): Tensor[N, K*4], Tensor[N, 4] -> Tensor[N, K*4] (torchvision's `decode_single`;
    its list-taking `decode` is `decode_single` on the concatenation, reshaped to (N, K, 4)).
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = DEFAULT_SCALE_CLAMP):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        weights = torch.as_tensor(self.weights, dtype=targets.dtype, device=targets.device)
        wx, wy, ww, wh = weights[0], weights[1], weights[2], weights[3]
        ex_widths = references[:, 2:3] - references[:, 0:1]  # (N, 1)
        ex_heights = references[:, 3:4] - references[:, 1:2]
        ex_ctr_x = references[:, 0:1] + 0.5 * ex_widths
        ex_ctr_y = references[:, 1:2] + 0.5 * ex_heights
        gt_widths = targets[:, 2:3] - targets[:, 0:1]
        gt_heights = targets[:, 3:4] - targets[:, 1:2]
        gt_ctr_x = targets[:, 0:1] + 0.5 * gt_widths
        gt_ctr_y = targets[:, 1:2] + 0.5 * gt_heights
        # kept: weight * difference, then / size (not weight * (difference / size)): the original's order.
        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.cat((dx, dy, dw, dh), dim=1)  # (N, 4)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        boxes = references.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx  # (N, K)
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        pred = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
        return pred.flatten(1)  # (N, K, 4) -> (N, K*4)


class Box2BoxTransform:
    """detectron2's Box2BoxTransform.

    encode(targets, references): Tensor[N, 4] x2 -> Tensor[N, 4] (detectron2's `get_deltas(references, targets)`).
    decode(deltas, references): Tensor[N, K*4], Tensor[N, 4] -> Tensor[N, K*4] float32 (`apply_deltas`).
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, targets: Tensor, references: Tensor) -> Tensor:
        src_boxes, target_boxes = references, targets
        src_widths = src_boxes[:, 2] - src_boxes[:, 0]
        src_heights = src_boxes[:, 3] - src_boxes[:, 1]
        src_ctr_x = src_boxes[:, 0] + 0.5 * src_widths
        src_ctr_y = src_boxes[:, 1] + 0.5 * src_heights
        target_widths = target_boxes[:, 2] - target_boxes[:, 0]
        target_heights = target_boxes[:, 3] - target_boxes[:, 1]
        target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
        target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights
        wx, wy, ww, wh = self.weights
        dx = wx * (target_ctr_x - src_ctr_x) / src_widths
        dy = wy * (target_ctr_y - src_ctr_y) / src_heights
        dw = ww * torch.log(target_widths / src_widths)
        dh = wh * torch.log(target_heights / src_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)  # (N, 4)

    def decode(self, deltas: Tensor, references: Tensor) -> Tensor:
        deltas = deltas.float()  # kept: the original decodes in float32 whatever comes in
        boxes = references.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx  # (N, K)
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        x1 = pred_ctr_x - 0.5 * pred_w
        y1 = pred_ctr_y - 0.5 * pred_h
        x2 = pred_ctr_x + 0.5 * pred_w
        y2 = pred_ctr_y + 0.5 * pred_h
        return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)  # (N, K, 4) -> (N, K*4)
