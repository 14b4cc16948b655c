"""detectron2's FPN, RPN and standard RoI heads (box + mask) at inference, for Panoptic FPN.

Interim home: these belong in the shared Mask R-CNN modules (necks/fpn.py, heads/rpn.py, heads/roi_heads.py) as
detectron2 options of one implementation; they move there as soon as those modules land. Differences from
torchvision's Mask R-CNN kept here on purpose (spec section 12): unrounded anchors at nominal strides, NMS on raw
logits per level, boxes kept when w > 0 and h > 0, aligned RoIAlign with adaptive sampling and detectron2's level
rule, background as the LAST class, no small-box removal, class-specific masks.
Follows detectron2 modeling/backbone/fpn.py, proposal_generator/{rpn,proposal_utils}.py, roi_heads/*.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minseg.ops.anchors import DefaultAnchorGenerator
from minseg.ops.box_coders import Box2BoxTransform
from minseg.ops.boxes import batched_nms
from minseg.ops.poolers import MultiScaleRoIAlign

LEVELS = ("p2", "p3", "p4", "p5", "p6")


def clip(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Tensor[K, 4] clamped to x in [0, w], y in [0, h] (detectron2 structures/boxes.py Boxes.clip)."""
    h, w = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1.clamp(min=0, max=w), y1.clamp(min=0, max=h), x2.clamp(min=0, max=w),
                        y2.clamp(min=0, max=h)), dim=-1)


class FPN(nn.Module):
    """{"c2".."c5"} -> {"p2".."p6"}: 1x1 laterals, nearest x2 top-down on the PRE-output map, 3x3 outputs,
    p6 = p5 subsampled by 2 (LastLevelMaxPool)."""

    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048), out_channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feats = [c[f"c{k}"] for k in (2, 3, 4, 5)]
        t = self.lateral[3](feats[3])
        outs = [self.output[3](t)]
        for i in (2, 1, 0):
            t = self.lateral[i](feats[i]) + F.interpolate(t, scale_factor=2.0, mode="nearest")  # lateral + top-down
            outs.insert(0, self.output[i](t))
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(LEVELS, outs))


class RPN(nn.Module):
    """features {"p2".."p6"} + unpadded sizes -> per image {"boxes": Tensor[P, 4], "logits": Tensor[P]},
    objectness descending (P <= post_nms_topk)."""

    def __init__(self, channels: int = 256, num_anchors: int = 3, pre_nms_topk: int = 1000,
                 post_nms_topk: int = 1000, nms_thresh: float = 0.7):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        self.anchor_generator = DefaultAnchorGenerator()
        self.box_coder = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
        self.pre_nms_topk, self.post_nms_topk, self.nms_thresh = pre_nms_topk, post_nms_topk, nms_thresh

    def forward(self, features: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        feats = [features[k] for k in LEVELS]
        N = feats[0].shape[0]
        boxes, logits, levels = [], [], []
        for i, (f, anchors) in enumerate(zip(feats, self.anchor_generator(feats))):
            t = F.relu(self.conv(f))
            lg, dl = self.cls_logits(t), self.bbox_pred(t)
            _, A, H, W = lg.shape
            lg = lg.permute(0, 2, 3, 1).flatten(1)                              # (N, H*W*A)
            dl = dl.view(N, A, 4, H, W).permute(0, 3, 4, 1, 2).flatten(1, -2)    # (N, H*W*A, 4)
            decoded = self.box_coder.apply_deltas(dl.reshape(-1, 4), anchors.expand(N, -1, -1).reshape(-1, 4))
            k = min(lg.shape[1], self.pre_nms_topk)
            top, idx = lg.topk(k, dim=1)                                         # on raw logits, per level
            boxes.append(decoded.view(N, -1, 4)[torch.arange(N, device=f.device)[:, None], idx])
            logits.append(top)
            levels.append(torch.full((k,), i, dtype=torch.int64, device=f.device))
        boxes, logits, levels = torch.cat(boxes, 1), torch.cat(logits, 1), torch.cat(levels)
        out = []
        for n, size in enumerate(sizes):
            b, s, lvl = boxes[n], logits[n], levels
            ok = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
            b, s, lvl = clip(b[ok], size), s[ok], lvl[ok]
            keep = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
            b, s, lvl = b[keep], s[keep], lvl[keep]
            keep = batched_nms(b, s, lvl, self.nms_thresh)[: self.post_nms_topk]  # NMS per level, on logits
            out.append({"boxes": b[keep], "logits": s[keep]})
        return out


class RoIHeads(nn.Module):
    """features p2..p5 + proposals -> per image {"boxes": Tensor[K, 4], "scores": Tensor[K], "labels": Tensor[K]
    (0..num_classes-1), "mask_probs": Tensor[K, 1, 28, 28]} at the network's input scale."""

    def __init__(self, num_classes: int = 80, channels: int = 256, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(channels * 7 * 7, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.cls_score = nn.Linear(1024, num_classes + 1)          # background is the LAST column
        self.bbox_pred = nn.Linear(1024, num_classes * 4)          # class-specific, no background rows
        self.mask_fcn = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(4))
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.mask_predictor = nn.Conv2d(channels, num_classes, 1)
        scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        self.box_pooler = MultiScaleRoIAlign(7, 0, aligned=True, level_rule="detectron2", scales=scales)
        self.mask_pooler = MultiScaleRoIAlign(14, 0, aligned=True, level_rule="detectron2", scales=scales)
        self.box_coder = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def forward(self, features: dict[str, torch.Tensor], proposals: list[dict[str, torch.Tensor]],
                sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        feats = [features[k] for k in LEVELS[:4]]
        proposal_boxes = [p["boxes"] for p in proposals]
        counts = [len(b) for b in proposal_boxes]
        # box head: pooled 7x7 -> 2 fc -> class scores and class-specific boxes
        x = self.box_pooler(feats, proposal_boxes).flatten(1)                  # (R, 256*7*7)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        probs = F.softmax(self.cls_score(x), dim=-1).split(counts)
        boxes = self.box_coder.apply_deltas(self.bbox_pred(x), torch.cat(proposal_boxes)).split(counts)
        detections = [self.detect(b, p, size) for b, p, size in zip(boxes, probs, sizes)]
        # mask head at the detected boxes: 4 convs, deconv x2, per-class 1x1; the predicted class's channel
        m = self.mask_pooler(feats, [d["boxes"] for d in detections])           # (K, 256, 14, 14)
        for conv in self.mask_fcn:
            m = F.relu(conv(m))
        m = self.mask_predictor(F.relu(self.deconv(m)))                         # (K, num_classes, 28, 28)
        labels = torch.cat([d["labels"] for d in detections])
        mask_probs = m[torch.arange(len(m), device=m.device), labels][:, None].sigmoid()  # (K, 1, 28, 28)
        for d, p in zip(detections, mask_probs.split([len(d["labels"]) for d in detections])):
            d["mask_probs"] = p
        return detections

    def detect(self, boxes: torch.Tensor, probs: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """One image: Tensor[R, C*4] boxes, Tensor[R, C+1] probabilities -> kept boxes, scores, labels.
        Follows detectron2 roi_heads/fast_rcnn.py fast_rcnn_inference_single_image."""
        ok = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        boxes, scores = boxes[ok], probs[ok][:, :-1]                             # drop background (last)
        boxes = clip(boxes.reshape(-1, 4), size).view(-1, self.num_classes, 4)  # (R, C, 4)
        candidates = scores > self.score_thresh                                 # strict >
        index = candidates.nonzero()                                            # (K, 2) proposal, class
        boxes, scores = boxes[candidates], scores[candidates]
        keep = batched_nms(boxes, scores, index[:, 1], self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": index[keep, 1]}


def build_fpn() -> FPN:
    return FPN()


def build_rpn() -> RPN:
    return RPN()


def build_roi_heads(num_classes: int) -> RoIHeads:
    return RoIHeads(num_classes)
