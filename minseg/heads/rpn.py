"""Region Proposal Network (Ren et al. 2015) on an FPN: objectness and box deltas for A anchors per location.

    per level p2..p6: 3x3 conv(s) + ReLU -> 1x1 objectness Tensor[N, A, H, W], 1x1 deltas Tensor[N, A*4, H, W]
    decode deltas at the anchors -> per level keep the top pre_nms_top_n by objectness
    per image: clip to the image, drop small boxes, (score threshold), NMS within each level, keep post_nms_top_n

One implementation for both originals at inference. The anchor generator and the box coder are passed in
(ops/anchors.py, ops/box_coders.py); `RPNConfig` holds the rest of what they do differently:
  torchvision (models/detection/rpn.py, RegionProposalNetwork.filter_proposals): AnchorGenerator (rounded
    anchors, strides from the padded size), BoxCoder decode of all levels at once, scores are sigmoid
    probabilities, boxes kept when both sides >= 1e-3, then scores >= 0.0.
  detectron2 (proposal_generator/rpn.py + proposal_utils.py find_top_rpn_proposals): DefaultAnchorGenerator
    (exact anchors at nominal strides), Box2BoxTransform decode per level, scores stay logits, non-finite boxes
    dropped, boxes kept when both sides > 0, no score threshold.
Both then run NMS per level (batched_nms with the level as the class) and keep the first post_nms_top_n, which
are already sorted by score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minseg.heads.matching import BalancedSampler, Matcher
from minseg.ops.boxes import batched_nms, box_iou, clip_boxes_to_image


@dataclass(frozen=True)
class RPNConfig:
    in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    channels: int = 256
    conv_depth: int = 1                       # 3x3 conv + ReLU layers before the 1x1s (torchvision v2: 2)
    decode_per_level: bool = False            # torchvision decodes all levels in one call, detectron2 level by
                                              # level; vectorised exp rounds a call's tail apart, so it is kept
    pre_nms_top_n_test: int = 1000            # per level
    post_nms_top_n_test: int = 1000           # per image
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 2000
    nms_thresh: float = 0.7
    objectness: str = "sigmoid"               # scores returned and thresholded: "sigmoid" (torchvision) | "logits"
    score_thresh: float | None = 0.0          # keep scores >= this (torchvision); None: no threshold
    min_size: float = 1e-3                    # keep boxes whose sides pass this size test
    min_size_strict: bool = False             # False: sides >= min_size (torchvision); True: > (detectron2, 0.0)
    drop_nonfinite: bool = False              # drop boxes or scores that are inf/NaN first (detectron2)
    # training losses (torchvision's defaults; detectron2 rpn.py RPN.losses: beta 0.0 and "batch_size")
    smooth_l1_beta: float = 1 / 9             # box loss smooth-L1 beta; 0.0 is plain L1
    loss_normalizer: str = "sampled"          # "sampled": objectness mean over the samples, positives first, box
                                              # sum / #samples (torchvision); "batch_size": both summed in anchor
                                              # order / (batch_size_per_image * N) (detectron2)


class RPN(nn.Module):
    """features {"p2": Tensor[N, C, H2, W2], ...} -> per image {"boxes": Tensor[P, 4] xyxy, "scores": Tensor[P]},
    P <= post_nms_top_n, by decreasing score.

    anchor_generator: `generator(feature_maps, padded_size)` -> per level Tensor[H*W*A, 4] (ops/anchors.py);
    box_coder: `encode(targets, anchors)` / `decode(deltas, anchors)` (ops/box_coders.py, weights (1, 1, 1, 1));
    matcher, sampler: training's anchor assignment (heads/matching.py; default torchvision's).
    `forward_train` also returns the losses.
    """

    def __init__(self, cfg: RPNConfig, anchor_generator: nn.Module, box_coder, matcher: Matcher | None = None,
                 sampler: BalancedSampler | None = None):
        super().__init__()
        if cfg.objectness not in ("sigmoid", "logits"):
            raise ValueError(f"objectness must be 'sigmoid' or 'logits', got {cfg.objectness!r}")
        if cfg.loss_normalizer not in ("sampled", "batch_size"):
            raise ValueError(f"loss_normalizer must be 'sampled' or 'batch_size', got {cfg.loss_normalizer!r}")
        self.cfg = cfg
        self.anchor_generator, self.box_coder = anchor_generator, box_coder
        # training only: anchor matching and sampling (both originals: IoU >= 0.7 fg, < 0.3 bg, best anchor of
        # each gt fg; 256 anchors per image, half positive at most)
        self.matcher = matcher or Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
        self.sampler = sampler or BalancedSampler(256, 0.5)
        A = anchor_generator.num_anchors_per_location()[0]  # the same on every level (one shared head)
        C = cfg.channels
        self.conv = nn.ModuleList(nn.Conv2d(C, C, 3, padding=1) for _ in range(cfg.conv_depth))
        self.cls_logits = nn.Conv2d(C, A, 1)
        self.bbox_pred = nn.Conv2d(C, A * 4, 1)
        for m in self.modules():  # both originals: normal(std=0.01), zero bias
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def head(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits Tensor[N, H*W*A] and deltas Tensor[N, H*W*A, 4], location-major."""
        logits, deltas = [], []
        for f in feats:
            N = f.shape[0]
            t = f
            for conv in self.conv:
                t = F.relu(conv(t))
            lg, dl = self.cls_logits(t), self.bbox_pred(t)
            _, A, H, W = lg.shape
            logits.append(lg.permute(0, 2, 3, 1).reshape(N, -1))                        # (N, H*W*A)
            deltas.append(dl.view(N, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, 4))  # (N, H*W*A, 4)
        return logits, deltas

    def decode(self, deltas: list[Tensor], anchors: list[Tensor]) -> Tensor:
        """Per-level deltas and anchors -> proposals Tensor[N, sum H*W*A, 4]."""
        N = deltas[0].shape[0]
        if self.cfg.decode_per_level:
            out = [self.box_coder.decode(d.reshape(-1, 4), a.expand(N, -1, -1).reshape(-1, 4)).view(N, -1, 4)
                   for d, a in zip(deltas, anchors)]
            return torch.cat(out, dim=1)
        codes = torch.cat(deltas, dim=1).reshape(-1, 4)                                 # (N*R, 4)
        boxes = torch.cat(anchors).repeat(N, 1)                                        # (N*R, 4)
        return self.box_coder.decode(codes, boxes).view(N, -1, 4)

    def forward(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                padded_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        """features: the FPN levels of a padded batch Tensor[N, 3, *padded_size]; image_sizes: each image's
        unpadded (height, width)."""
        feats = [features[k] for k in self.cfg.in_features]
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(feats, padded_size)  # per level, the same for every image
        return self.propose(logits, deltas, anchors, image_sizes)

    def forward_train(self, features: dict[str, Tensor], image_sizes: list[tuple[int, int]],
                      padded_size: tuple[int, int], gt_boxes: list[Tensor]
                      ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """As forward (with the train-mode top-n), plus the losses for gt_boxes: per image Tensor[G_i, 4] xyxy
        at the network's input scale -> (proposals, {"loss_objectness", "loss_rpn_box_reg"})."""
        feats = [features[k] for k in self.cfg.in_features]
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(feats, padded_size)
        proposals = self.propose(logits, deltas, anchors, image_sizes)
        return proposals, self.losses(logits, deltas, torch.cat(anchors), gt_boxes)

    def losses(self, logits: list[Tensor], deltas: list[Tensor], anchors: Tensor,
               gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        """Objectness and box losses on a sample of anchors (torchvision rpn.py compute_loss; detectron2 rpn.py
        RPN.losses with loss_normalizer "batch_size").

        anchors: Tensor[R, 4], all levels. Per image: match anchors to the gt boxes, sample positives and
        negatives; then over the batch's S sampled anchors, with D = S (torchvision) or batch_size_per_image * N
        (detectron2, whatever was sampled)
          loss_objectness  = sum over S of BCE(sigmoid(logit), label) / D
          loss_rpn_box_reg = sum over positives of smooth_l1(delta - encode(gt, anchor), beta) / D
        """
        N, R = len(gt_boxes), anchors.shape[0]
        logits = torch.cat(logits, dim=1).reshape(-1)                                 # (N*R,) image-major
        deltas = torch.cat(deltas, dim=1).reshape(-1, 4)                              # (N*R, 4)
        matched = [self.matcher(box_iou(gt, anchors)) for gt in gt_boxes]            # per image (R,), (R,)
        samples = self.sampler([labels for _, labels in matched])
        # positives of every image, then negatives of every image, as torchvision's masks give them
        pos = torch.cat([p + i * R for i, (p, _) in enumerate(samples)])
        neg = torch.cat([n + i * R for i, (_, n) in enumerate(samples)])
        sampled = torch.cat((pos, neg))
        labels = torch.cat([lab for _, lab in matched]).float()                      # (N*R,) 1 / 0 / -1
        # regression targets of the positives only (torchvision encodes every anchor, the same values)
        gt_of_pos = torch.cat([gt[m[p]] for gt, (m, _), (p, _) in zip(gt_boxes, matched, samples)])
        targets = self.box_coder.encode(gt_of_pos, anchors[pos % R])
        if self.cfg.loss_normalizer == "sampled":  # torchvision: a mean over the samples, in that order
            normalizer = sampled.numel()
            objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled])
        else:  # detectron2: its loss reads the sampled labels through a mask, so in anchor order
            normalizer = self.sampler.batch_size_per_image * N
            sampled = sampled.sort()[0]
            objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled],
                                                                 reduction="sum") / normalizer
        box_loss = box_regression_loss(deltas[pos], targets, self.cfg.smooth_l1_beta) / normalizer
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def propose(self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per-level logits Tensor[N, R_l] and deltas Tensor[N, R_l, 4] at anchors Tensor[R_l, 4] -> proposals
        per image (the train-mode top-n in train mode). Nothing here carries gradients."""
        cfg = self.cfg
        N = logits[0].shape[0]
        proposals = self.decode([d.detach() for d in deltas], anchors)              # (N, R, 4)
        # 1. top pre_nms_top_n per level, by logit
        pre_nms_top_n = cfg.pre_nms_top_n_train if self.training else cfg.pre_nms_top_n_test
        top_idx, levels, start = [], [], 0
        for i, lg in enumerate(logits):
            k = min(pre_nms_top_n, lg.shape[1])
            top_idx.append(lg.detach().topk(k, dim=1)[1] + start)
            levels.append(torch.full((k,), i, dtype=torch.int64, device=lg.device))
            start += lg.shape[1]
        top_idx, levels = torch.cat(top_idx, dim=1), torch.cat(levels)              # (N, K), (K,)
        batch = torch.arange(N, device=top_idx.device)[:, None]
        scores = torch.cat(logits, dim=1).detach()[batch, top_idx]                  # (N, K)
        if cfg.objectness == "sigmoid":
            scores = scores.sigmoid()
        boxes = proposals[batch, top_idx]                                           # (N, K, 4)
        # 2. per image: filter, NMS within each level, best post_nms_top_n
        post_nms_top_n = cfg.post_nms_top_n_train if self.training else cfg.post_nms_top_n_test
        return [self.select(b, s, levels, size, post_nms_top_n) for b, s, size in zip(boxes, scores, image_sizes)]

    def select(self, boxes: Tensor, scores: Tensor, levels: Tensor, size: tuple[int, int],
               post_nms_top_n: int) -> dict[str, Tensor]:
        """One image's candidates Tensor[K, 4], Tensor[K], levels Tensor[K] -> kept proposals."""
        cfg = self.cfg
        clipped = clip_boxes_to_image(boxes, size)
        ws, hs = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        if cfg.min_size_strict:
            keep = (ws > cfg.min_size) & (hs > cfg.min_size)
        else:
            keep = (ws >= cfg.min_size) & (hs >= cfg.min_size)
        if cfg.score_thresh is not None:
            keep &= scores >= cfg.score_thresh  # kept: >=, torchvision's "backwards compatibility"
        if cfg.drop_nonfinite:  # on the unclipped boxes: an infinite coordinate clips to a finite one
            keep &= torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        keep = torch.where(keep)[0]  # one host read for the three selections
        boxes, scores, levels = clipped[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, cfg.nms_thresh)[:post_nms_top_n]
        return {"boxes": boxes[keep], "scores": scores[keep]}


def box_regression_loss(deltas: Tensor, targets: Tensor, beta: float) -> Tensor:
    """Sum over all elements of smooth_l1(deltas - targets, beta) (torchvision's F.smooth_l1_loss); beta 0.0 is
    |deltas - targets|, written so as in detectron2's fvcore smooth_l1_loss (its default, beta < 1e-5)."""
    if beta == 0.0:
        return (deltas - targets).abs().sum()
    return F.smooth_l1_loss(deltas, targets, beta=beta, reduction="sum")
