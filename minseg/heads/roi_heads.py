"""Mask R-CNN's RoI heads (He et al. 2017): boxes and classes from pooled 7x7 features, masks from 14x14.

    proposals -> multi-scale RoIAlign 7x7 -> box head (2 fc, or 4 conv + 1 fc) -> class logits, class deltas
        -> softmax, decode one box per class, clip -> (score > thresh) -> NMS per class -> best detections_per_img
    detections -> multi-scale RoIAlign 14x14 -> 4 conv (+ norm) + ReLU -> 2x2 deconv + ReLU -> 1x1 per class
        -> sigmoid, the detected class's channel -> mask probabilities Tensor[K, 1, 28, 28]

One implementation for both originals at inference. The two poolers (ops/poolers.py) and the box coder
(ops/box_coders.py) are passed in; `RoIHeadsConfig` holds the rest of what the originals do differently:
  torchvision (models/detection/roi_heads.py, postprocess_detections, maskrcnn_inference): background is
    class 0 of every layer (cls_score, bbox_pred, mask predictor all have K+1 outputs) and labels are 1..K;
    RoIAlign aligned=False, sampling 2, its level rule and scales inferred from the image sizes; boxes with a
    side < 1e-2 are dropped before NMS.
  detectron2 (roi_heads/fast_rcnn.py fast_rcnn_inference, mask_head.py mask_rcnn_inference): background is the
    LAST classifier column, no background box or mask (K boxes, K masks), labels 0..K-1; ROIAlignV2 (aligned,
    adaptive sampling) at fixed scales 1/4..1/32 with its level rule; non-finite rows dropped; no size filter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minseg.heads.matching import BalancedSampler, Matcher
from minseg.heads.rpn import box_regression_loss
from minseg.ops.boxes import batched_nms, box_iou, clip_boxes_to_image
from minseg.ops.layers import c2_msra_fill, make_norm
from minseg.ops.poolers import MultiScaleRoIAlign, shared_feature_tables
from minseg.ops.roi_align import roi_align


@dataclass(frozen=True)
class RoIHeadsConfig:
    num_classes: int = 90                     # foreground classes K (torchvision COCO: 90 ids + background)
    background: str = "first"                 # "first": torchvision layout (K+1 everywhere); "last": detectron2
    channels: int = 256
    # box head: box_convs 3x3 conv(+norm)+ReLU layers, then flatten and box_fcs fc+ReLU layers
    box_convs: int = 0                        # torchvision v2: 4
    box_fcs: int = 2                          # torchvision v2: 1
    fc_dim: int = 1024
    norm: str | None = None                   # norm after the head convs (torchvision v2: "bn")
    norm_eps: float = 1e-5
    # selection
    score_thresh: float = 0.05                # keep class scores > this (both originals: strict)
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float | None = 1e-2             # drop boxes with a side < this (torchvision); None: keep all
    drop_nonfinite: bool = False              # drop proposals whose boxes or scores are inf/NaN (detectron2)
    # mask head
    mask_convs: int = 4
    mask_channels: int = 256
    # training (torchvision's defaults; detectron2 fast_rcnn.py / mask_head.py: 0.0, True, 0.5)
    smooth_l1_beta: float = 1 / 9             # box loss smooth-L1 beta; 0.0 is plain L1
    mask_target_aligned: bool = False         # RoIAlign of the gt masks with the half-pixel shift (BitMasks
                                              # crop_and_resize) or without (project_masks_on_boxes)
    mask_target_threshold: float | None = None  # binarise the resampled targets at >= this; None: soft targets


def conv_norm_relu(cin: int, cout: int, norm: str | None, eps: float) -> nn.Sequential:
    """3x3 conv (+ norm) + ReLU, indexed 0/1(/2) like torchvision's Conv2dNormActivation."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm is None)
    layers = [conv] if norm is None else [conv, make_norm(norm, cout, eps)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class BoxHead(nn.Module):
    """Pooled Tensor[R, C, 7, 7] -> Tensor[R, fc_dim]: convs (TwoMLPHead has none; FastRCNNConvFCHead has 4),
    flatten, fcs."""

    def __init__(self, cfg: RoIHeadsConfig):
        super().__init__()
        C = cfg.channels
        self.conv = nn.ModuleList(conv_norm_relu(C, C, cfg.norm, cfg.norm_eps) for _ in range(cfg.box_convs))
        dims = [C * 7 * 7] + [cfg.fc_dim] * cfg.box_fcs
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        for m in self.conv.modules():  # torchvision's FastRCNNConvFCHead init (detectron2's c2_msra_fill)
            if isinstance(m, nn.Conv2d):
                c2_msra_fill(m)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.conv:
            x = conv(x)
        x = x.flatten(1)  # (R, C*7*7)
        for fc in self.fc:
            x = F.relu(fc(x))
        return x


class BoxPredictor(nn.Module):
    """Tensor[R, fc_dim] -> class logits Tensor[R, K+1], class-specific deltas Tensor[R, B*4] (B = K+1 with the
    background first, K with it last)."""

    def __init__(self, cfg: RoIHeadsConfig):
        super().__init__()
        K = cfg.num_classes
        self.cls_score = nn.Linear(cfg.fc_dim, K + 1)
        self.bbox_pred = nn.Linear(cfg.fc_dim, (K + 1 if cfg.background == "first" else K) * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """Pooled Tensor[K, C, 14, 14] -> mask logits Tensor[K, M, 28, 28] (M = K+1 or K classes)."""

    def __init__(self, cfg: RoIHeadsConfig):
        super().__init__()
        C, D = cfg.channels, cfg.mask_channels
        self.conv = nn.ModuleList(conv_norm_relu(C if i == 0 else D, D, cfg.norm, cfg.norm_eps)
                                  for i in range(cfg.mask_convs))
        self.deconv = nn.ConvTranspose2d(D, D, 2, stride=2)
        self.predictor = nn.Conv2d(D, cfg.num_classes + (cfg.background == "first"), 1)
        for name, p in self.named_parameters():  # torchvision's MaskRCNNHeads / MaskRCNNPredictor init
            if name.endswith("weight") and p.dim() == 4:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
            elif name.startswith("conv") and name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.conv:
            x = conv(x)
        return self.predictor(F.relu(self.deconv(x)))


class RoIHeads(nn.Module):
    """features {"p2".."p5"}, proposals per image Tensor[P_i, 4], image sizes -> per image {"boxes": Tensor[K, 4],
    "scores": Tensor[K], "labels": Tensor[K] int64, "mask_probs": Tensor[K, 1, 28, 28]} at the network's input
    scale, by decreasing score.

    box_pooler, mask_pooler: MultiScaleRoIAlign to 7x7 and 14x14 (each original's level rule, alignment and
    sampling); box_coder: `encode` / `decode` with the box head's weights (ops/box_coders.py); matcher,
    sampler: training's proposal assignment (heads/matching.py; default torchvision's). `forward_train`
    returns the losses instead.
    """

    def __init__(self, cfg: RoIHeadsConfig, box_pooler: MultiScaleRoIAlign, mask_pooler: MultiScaleRoIAlign,
                 box_coder, matcher: Matcher | None = None, sampler: BalancedSampler | None = None):
        super().__init__()
        if cfg.background not in ("first", "last"):
            raise ValueError(f"background must be 'first' or 'last', got {cfg.background!r}")
        self.cfg = cfg
        self.box_pooler, self.mask_pooler, self.box_coder = box_pooler, mask_pooler, box_coder
        # training only: proposal matching (IoU >= 0.5 foreground) and sampling (512 per image, a quarter
        # positive at most), torchvision's
        self.matcher = matcher or Matcher([0.5], [0, 1])
        self.sampler = sampler or BalancedSampler(512, 0.25)
        self.box_head = BoxHead(cfg)
        self.box_predictor = BoxPredictor(cfg)
        self.mask_head = MaskHead(cfg)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        counts = [p.shape[0] for p in proposals]  # (not len(): a data-dependent size when exported)
        with shared_feature_tables():  # the two poolers read one channels-last copy of the pyramid, freed after
            # 1. box head on every proposal, then per image selection
            x = self.box_head(self.box_pooler(features, proposals, image_sizes))   # (R, fc_dim)
            class_logits, box_deltas = self.box_predictor(x)
            boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))         # (R, B*4)
            probs = F.softmax(class_logits, dim=-1)                                 # (R, K+1)
            detections = [self.select(b, p, size) for b, p, size in
                          zip(boxes.split(counts), probs.split(counts), image_sizes)]
            # 2. mask head at the detected boxes; keep the channel of each box's class
            mask_boxes = [d["boxes"] for d in detections]
            pooled = self.mask_pooler(features, mask_boxes, image_sizes)            # (K, C, 14, 14)
        mask_logits = self.mask_head(pooled)
        labels = torch.cat([d["labels"] for d in detections])
        index = torch.arange(labels.shape[0], device=labels.device)
        mask_probs = mask_logits.sigmoid()[index, labels][:, None]                 # (K, 1, 28, 28)
        for d, m in zip(detections, mask_probs.split([d["labels"].shape[0] for d in detections])):
            d["mask_probs"] = m
        return detections

    def select(self, boxes: Tensor, probs: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """One image: boxes Tensor[R, B*4], class probabilities Tensor[R, K+1] -> kept detections."""
        cfg = self.cfg
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1) if cfg.drop_nonfinite else None
        R, B = boxes.shape[0], boxes.shape[1] // 4
        boxes = clip_boxes_to_image(boxes.reshape(R, B, 4), size)                    # (R, B, 4)
        labels = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
        if cfg.background == "first":
            boxes, scores, labels = boxes[:, 1:], probs[:, 1:], labels[:, 1:]       # labels 1..K
        else:
            scores, labels = probs[:, :-1], labels[:, :-1]                          # labels 0..K-1
        keep = scores > cfg.score_thresh                                            # (R, K)
        if cfg.min_size is not None:
            ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
            keep &= (ws >= cfg.min_size) & (hs >= cfg.min_size)
        if finite is not None:  # checked before clipping: an infinite coordinate clips to a finite one
            keep &= finite[:, None]
        # every (proposal, class) pair is a candidate, proposal-major as in both originals; one host read
        keep = torch.where(keep.reshape(-1))[0]
        boxes, scores, labels = boxes.reshape(-1, 4)[keep], scores.reshape(-1)[keep], labels.reshape(-1)[keep]
        keep = batched_nms(boxes, scores, labels, cfg.nms_thresh)[: cfg.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}

    def forward_train(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                      targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of the box and mask heads (torchvision roi_heads.py, training branch; detectron2 roi_heads.py
        StandardROIHeads with label_and_sample_proposals when the background is last).

        proposals: per image Tensor[P_i, 4] (no gradient); targets: per image {"boxes": Tensor[G_i, 4],
        "labels": Tensor[G_i] int64 (1..K with the background first, 0..K-1 with it last), "masks":
        Tensor[G_i, H_i, W_i] uint8 or bool}, all at the network's input scale
        -> {"loss_classifier", "loss_box_reg", "loss_mask"}.
        The sampler's order is kept: sorted by candidate (torchvision's sampled mask) or positives then negatives
        in randperm order (detectron2's sampled_idxs).
        """
        background = 0 if self.cfg.background == "first" else self.cfg.num_classes
        # 1. per image: the gt boxes join the proposals; match, sample, label
        boxes, labels, matches = [], [], []
        for props, t in zip(proposals, targets):
            gt_boxes, gt_labels = t["boxes"].to(props.dtype), t["labels"]
            props = torch.cat((props, gt_boxes))
            match, match_label = self.matcher(box_iou(gt_boxes, props))              # (P,), (P,)
            label = gt_labels[match] if len(gt_boxes) else torch.zeros_like(match)
            label = torch.where(match_label == 1, label,                             # matched: the gt's class
                                torch.where(match_label == 0, background, -1))       # background, ignored
            (pos, neg), = self.sampler([label])
            keep = torch.cat((pos, neg))
            if self.sampler.sort:
                keep = keep.sort()[0]  # in proposal order, as torchvision's sampled mask
            boxes.append(props[keep])
            labels.append(label[keep])
            matches.append(match[keep])
        with shared_feature_tables():  # the two poolers read one channels-last copy of the pyramid, freed after
            # 2. box head on the sampled proposals
            x = self.box_head(self.box_pooler(features, boxes, image_sizes))         # (S, fc_dim)
            class_logits, box_deltas = self.box_predictor(x)
            pos = [torch.where((lab >= 0) & (lab != background))[0] for lab in labels]
            mask_boxes = [b[p] for b, p in zip(boxes, pos)]                          # the positives' boxes
            gt_of_pos = torch.cat([t["boxes"].to(b.dtype)[m[p]] for t, b, m, p in zip(targets, boxes, matches, pos)])
            targets_pos = self.box_coder.encode(gt_of_pos, torch.cat(mask_boxes))  # (P, 4)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_deltas, torch.cat(labels), targets_pos,
                                                          background, self.cfg.smooth_l1_beta)
            # 3. mask head on the positives, against the gt masks cropped to them
            pooled = self.mask_pooler(features, mask_boxes, image_sizes)             # (M, C, 14, 14)
        mask_logits = self.mask_head(pooled)                                         # (M, K(+1), 28, 28)
        mask_targets = [project_masks(t["masks"], b, m[p], mask_logits.shape[-1], self.cfg.mask_target_aligned,
                                      self.cfg.mask_target_threshold)
                        for t, b, m, p in zip(targets, mask_boxes, matches, pos)]
        mask_labels = torch.cat([lab[p] for lab, p in zip(labels, pos)])
        loss_mask = maskrcnn_loss(mask_logits, mask_labels, torch.cat(mask_targets))
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}


def fastrcnn_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, targets_pos: Tensor,
                  background: int = 0, beta: float = 1 / 9) -> tuple[Tensor, Tensor]:
    """Box head losses over the S sampled proposals (torchvision's fastrcnn_loss; detectron2's
    FastRCNNOutputLayers.losses with background K and beta 0.0).

    class_logits Tensor[S, K+1], box_deltas Tensor[S, B*4] (a box per class column, the background's too when
    it is first), labels Tensor[S]: a class or `background`; targets_pos Tensor[P, 4]: the encoded gt boxes of
    the P positives (labels other than the background), in order.
      loss_classifier = mean over S of cross entropy
      loss_box_reg    = sum over positives of smooth_l1(deltas of the gt class - target, beta) / S
    """
    S = class_logits.shape[0]
    pos = torch.where((labels >= 0) & (labels != background))[0]
    deltas = box_deltas.reshape(S, -1, 4)[pos, labels[pos]]                          # (P, 4)
    box_loss = box_regression_loss(deltas, targets_pos, beta) / labels.numel()
    return F.cross_entropy(class_logits, labels), box_loss


def project_masks(gt_masks: Tensor, boxes: Tensor, matches: Tensor, M: int, aligned: bool = False,
                  threshold: float | None = None) -> Tensor:
    """Mask targets: each box's matched gt mask Tensor[G, H, W] cropped to the box and resampled to M x M by
    RoIAlign (adaptive sampling) -> Tensor[len(boxes), M, M] in 0..1. torchvision's project_masks_on_boxes:
    not aligned, soft values; detectron2's BitMasks.crop_and_resize: aligned, then >= 0.5 as 0/1."""
    rois = torch.cat((matches.to(boxes)[:, None], boxes), dim=1)                      # (B, 5)
    targets = roi_align(gt_masks[:, None].to(rois), rois, (M, M), 1.0, aligned=aligned)[:, 0]
    return targets if threshold is None else (targets >= threshold).to(targets.dtype)


def maskrcnn_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """Mean over the positives' M x M pixels of BCE(sigmoid(logit of the gt class's channel), target).
    mask_logits Tensor[P, K+1, M, M], labels Tensor[P], mask_targets Tensor[P, M, M]. No positives: 0, still
    connected to the graph (torchvision's mask_logits.sum() * 0)."""
    if mask_targets.numel() == 0:
        return mask_logits.sum() * 0
    index = torch.arange(labels.shape[0], device=labels.device)
    return F.binary_cross_entropy_with_logits(mask_logits[index, labels], mask_targets)
