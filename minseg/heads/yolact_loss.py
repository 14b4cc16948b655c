"""YOLACT's training objective: prior matching with crowds, OHEM class loss, smooth-L1 boxes, the lincomb mask loss
and the semantic segmentation loss.

Follows dbolya/yolact @902073d `layers/modules/multibox_loss.py` (MultiBoxLoss with the yolact_base /
yolact_resnet50 cfg: lincomb masks, crop, emulate-RoI-pooling normalisation, OHEM 3:1, semantic loss on) and
`layers/box_utils.py` (match, jaccard, encode, log_sum_exp), in the original's float order so that the losses and
the discrete choices (positives, hard negatives, mask subsample) are the original's.

Targets per image: {"boxes": Tensor[K, 4] boxes_rel (x1y1x2y2, 0..1), "labels": Tensor[K] int64 0..C-2 (-1 for
crowds), "masks": Tensor[K, S, S] 0/1, "num_crowds": int} with the crowds as the last num_crowds objects. Crowds only
make priors neutral; their labels and masks are never used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minseg.ops.yolact_boxes import crop_masks, encode_yolact, priors_to_xyxy


@dataclass(frozen=True)
class YolactLossConfig:
    """MultiBoxLoss's arguments and the cfg values it reads (yolact_base_config's)."""
    pos_iou_thresh: float = 0.5     # positive_iou_threshold: best IoU >= this (or forced) -> positive
    neg_iou_thresh: float = 0.4     # negative_iou_threshold: best IoU < this -> background, in between neutral
    crowd_iou_thresh: float = 0.7   # a non-positive prior covered by a crowd beyond this (inter / its area): neutral
    negpos_ratio: int = 3           # ohem_negpos_ratio: hard negatives per positive, per image
    masks_to_train: int = 100       # positives per image that train a mask (a random subsample beyond)
    box_alpha: float = 1.5          # bbox_alpha
    class_alpha: float = 1          # conf_alpha
    mask_alpha: float = 6.125       # mask_alpha
    semantic_alpha: float = 1       # semantic_segmentation_alpha


@dataclass
class PriorMatch:
    """One image's assignment: labels Tensor[P] int64 (c + 1 positive, 0 background, -1 neutral), gt_index
    Tensor[P] (the matched object, meaningful at positives), best_iou Tensor[P] (before forcing)."""
    labels: torch.Tensor
    gt_index: torch.Tensor
    best_iou: torch.Tensor


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Tensor[A, 4], Tensor[B, 4] xyxy -> intersection areas Tensor[A, B] (box_utils.py intersect)."""
    max_xy = torch.min(a[:, None, 2:], b[None, :, 2:])  # (A, B, 2)
    min_xy = torch.max(a[:, None, :2], b[None, :, :2])  # (A, B, 2)
    wh = (max_xy - min_xy).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def match_priors(priors_xyxy: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, crowd_boxes: torch.Tensor,
                 cfg: YolactLossConfig) -> PriorMatch:
    """box_utils.py match for one image: priors_xyxy Tensor[P, 4], boxes Tensor[K, 4] and labels Tensor[K] of the
    non-crowd objects, crowd_boxes Tensor[Kc, 4].

    Each prior takes the object of highest IoU (ties: the lowest index); then, best object first, every object claims
    its best still-free prior (IoU set to 2, so it is positive whatever its IoU). IoU >= pos_iou_thresh: positive,
    < neg_iou_thresh: background, between: neutral. A non-positive prior whose best crowd covers more than
    crowd_iou_thresh of it becomes neutral. No objects: every prior background (the original has no such case).
    """
    P, K = priors_xyxy.shape[0], boxes.shape[0]
    if K == 0:
        best_iou = priors_xyxy.new_zeros(P)
        match = PriorMatch(labels.new_zeros(P), labels.new_zeros(P), best_iou)
    else:
        inter = box_intersection(boxes, priors_xyxy)                                         # (K, P)
        overlaps = inter / (box_area(boxes)[:, None] + box_area(priors_xyxy)[None, :] - inter)  # (K, P) IoU
        best_iou, gt_index = overlaps.max(0)                                                 # (P,)
        best_iou_before_forcing = best_iou.clone()
        for _ in range(K):  # the original's loop: each object in turn, highest overlap first, claims one prior
            best_prior_iou, best_prior = overlaps.max(1)  # (K,)
            j = best_prior_iou.max(0).indices
            i = best_prior[j]
            overlaps[:, i] = -1  # prior i is taken
            overlaps[j, :] = -1  # object j is done
            best_iou[i] = 2
            gt_index[i] = j
        classes = labels[gt_index] + 1
        classes[best_iou < cfg.pos_iou_thresh] = -1
        classes[best_iou < cfg.neg_iou_thresh] = 0
        match = PriorMatch(classes, gt_index, best_iou_before_forcing)
    if crowd_boxes.shape[0] > 0 and cfg.crowd_iou_thresh < 1:
        covered = box_intersection(priors_xyxy, crowd_boxes) / box_area(priors_xyxy)[:, None]  # (P, Kc)
        match.labels[(match.labels <= 0) & (covered.max(1).values > cfg.crowd_iou_thresh)] = -1
    return match


def mining_loss(conf: torch.Tensor) -> torch.Tensor:
    """OHEM's sort key: conf logits Tensor[N, P, C] -> -log softmax(background) Tensor[N, P].

    box_utils.py log_sum_exp: ONE maximum over the whole batch is subtracted (kept: it sets the rounding of the
    key, and the hard negatives are chosen by it).
    """
    N, P, C = conf.shape
    flat = conf.detach().reshape(N * P, C)
    x_max = flat.max()
    return (torch.log(torch.sum(torch.exp(flat - x_max), 1)) + x_max - flat[:, 0]).view(N, P)


def hard_negatives(mining: torch.Tensor, labels: torch.Tensor, negpos_ratio: int) -> torch.Tensor:
    """ohem_conf_loss's selection: Tensor[N, P] sort keys and prior labels -> Tensor[N, P] bool, per image the
    negpos_ratio * num_pos background priors of highest key (at most P - 1 ranks).

    Positives and neutrals are zeroed and then dropped, as in the original. Equal keys are ordered by torch's
    default (unstable) sort, the original's call, so ties at the cut-off fall as they do in the original on CPU.
    """
    pos, neutral = labels > 0, labels < 0
    mining = mining.masked_fill(pos | neutral, 0)
    order = mining.sort(1, descending=True).indices  # (N, P)
    rank = order.argsort(1)                           # rank of each prior in that order
    num_neg = torch.clamp(negpos_ratio * pos.sum(1, keepdim=True), max=labels.shape[1] - 1)  # (N, 1)
    return (rank < num_neg) & ~pos & ~neutral


def class_loss(conf: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Softmax cross entropy summed over positives and hard negatives (batch-major prior order)."""
    keep = (labels > 0) | neg
    return F.cross_entropy(conf[keep], labels[keep], reduction="none").sum()


def masks_to_train_subsample(num_pos: int, masks_to_train: int) -> torch.Tensor:
    """Which of an image's positives train a mask: all (Tensor[num_pos] 0..num_pos-1) or, beyond masks_to_train,
    torch.randperm(num_pos)[:masks_to_train] drawn from the global generator, as the original does per image."""
    if num_pos > masks_to_train:
        return torch.randperm(num_pos)[:masks_to_train]
    return torch.arange(num_pos)


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Object masks Tensor[K, S, S] -> Tensor[K, h, w] float 0/1: bilinear (align_corners=False), then > 0.5."""
    with torch.no_grad():
        return F.interpolate(masks[None].float(), size, mode="bilinear", align_corners=False)[0].gt(0.5).float()


def mask_loss(proto: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lincomb_mask_loss for one image's trained positives: prototypes Tensor[h, w, k], coefficients Tensor[m, k],
    their gt boxes Tensor[m, 4] (boxes_rel) and gt masks Tensor[h, w, m] (0/1 at the prototypes' size) ->
    Tensor[m], per positive BCE(crop(sigmoid(proto @ coeff), gt box, padding 1), gt mask) summed over the map,
    divided by the gt box's area in prototype pixels, times h * w (mask_proto_normalize_emulate_roi_pooling).
    """
    h, w, _ = proto.shape
    pred = crop_masks(torch.sigmoid(proto @ coeffs.t()), boxes)  # (h, w, m)
    loss = F.binary_cross_entropy(torch.clamp(pred, 0, 1), targets, reduction="none")
    box_w = (boxes[:, 2] - boxes[:, 0]) * w
    box_h = (boxes[:, 3] - boxes[:, 1]) * h
    return loss.sum(dim=(0, 1)) / box_w / box_h * (h * w)


def image_mask_loss(proto: torch.Tensor, coeffs: torch.Tensor, positives: torch.Tensor, gt_index: torch.Tensor,
                    gt_box: torch.Tensor, masks: torch.Tensor,
                    masks_to_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lincomb_mask_loss's per-image step: prototypes Tensor[h, w, k], coefficients Tensor[P, k], the positive
    priors Tensor[n] (in prior order), gt_index / gt_box of every prior, the object masks Tensor[K, S, S] ->
    (mask_loss of the trained positives Tensor[m], scaled by n / m when subsampled; those priors Tensor[m])."""
    h, w, _ = proto.shape
    used = positives[masks_to_train_subsample(len(positives), masks_to_train).to(positives.device)]
    targets = downsample_masks(masks, (h, w)).permute(1, 2, 0).contiguous()[:, :, gt_index[used]]  # (h, w, m)
    loss = mask_loss(proto, coeffs[used], gt_box[used], targets)
    if len(used) < len(positives):
        loss = loss * (len(positives) / len(used))
    return loss, used


def semantic_target(masks: torch.Tensor, labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Object masks Tensor[K, S, S] and labels Tensor[K] -> Tensor[num_classes, h, w] 0/1: per class the union of
    its masks, each bilinearly resized to (h, w) and > 0.5."""
    target = masks.new_zeros(num_classes, *size, dtype=torch.float32)
    if masks.shape[0] > 0:
        down = downsample_masks(masks, size)  # (K, h, w)
        for k, c in enumerate(labels.tolist()):
            target[c] = torch.maximum(target[c], down[k])
    return target


def semantic_loss(segm: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """semantic_segmentation_loss for one image: logits Tensor[C-1, h, w], object masks Tensor[K, S, S], labels
    Tensor[K] -> BCE-with-logits against semantic_target, summed over classes and pixels."""
    C, h, w = segm.shape
    target = semantic_target(masks, labels, C, (h, w)).to(segm)
    return F.binary_cross_entropy_with_logits(segm, target, reduction="sum")


@dataclass
class BatchTargets:
    """Per-prior targets of a batch: labels / gt_index Tensor[N, P] int64, loc_t and gt_box Tensor[N, P, 4]
    (encoded offsets and boxes_rel of the matched object), objects: per image its non-crowd (boxes, labels, masks)."""
    labels: torch.Tensor
    gt_index: torch.Tensor
    loc_t: torch.Tensor
    gt_box: torch.Tensor
    objects: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def match_batch(priors: torch.Tensor, targets: list[dict], cfg: YolactLossConfig) -> BatchTargets:
    """MultiBoxLoss.forward's matching: each image's crowds (its last num_crowds objects) split off, the rest
    matched to the priors Tensor[P, 4] (cx, cy, w, h) by match_priors."""
    N, P = len(targets), priors.shape[0]
    priors_xyxy = priors_to_xyxy(priors)
    labels = torch.zeros(N, P, dtype=torch.int64, device=priors.device)
    gt_index = torch.zeros_like(labels)
    loc_t, gt_box = priors.new_zeros(N, P, 4), priors.new_zeros(N, P, 4)
    objects = []
    for b, t in enumerate(targets):
        K = t["boxes"].shape[0] - int(t["num_crowds"])
        boxes, crowds = t["boxes"][:K].to(priors.dtype), t["boxes"][K:].to(priors.dtype)
        objects.append((boxes, t["labels"][:K], t["masks"][:K]))
        m = match_priors(priors_xyxy, boxes, t["labels"][:K], crowds, cfg)
        labels[b], gt_index[b] = m.labels, m.gt_index
        if K > 0:
            gt_box[b] = boxes[m.gt_index]
            loc_t[b] = encode_yolact(gt_box[b], priors)
    return BatchTargets(labels, gt_index, loc_t, gt_box, objects)


def yolact_loss(out: dict[str, torch.Tensor], targets: list[dict], cfg: YolactLossConfig) -> dict[str, torch.Tensor]:
    """MultiBoxLoss.forward + train.py's reduction: train-mode outputs and per-image targets ->
    {"box", "mask", "class", "semantic"} (B, M, C, S).

    box: smooth-L1 (beta 1) summed over positives and coordinates, * box_alpha; mask: mask_loss summed over the
    trained positives of every image (scaled by num_pos / masks_to_train where subsampled) * mask_alpha / h / w;
    class: OHEM cross entropy sum * class_alpha; these three divided by the number of positives in the batch.
    semantic: semantic_loss summed over images / h / w * semantic_alpha, divided by the batch size. The dict is in
    the original's order, so sum(losses.values()) adds as train.py does.
    """
    loc, conf, coeffs, proto, segm = out["loc"], out["conf"], out["mask"], out["proto"], out["segm"]
    N = loc.shape[0]
    if len(targets) != N:
        raise ValueError(f"got {len(targets)} targets for a batch of {N} images")
    for i, t in enumerate(targets):
        if missing := {"boxes", "labels", "masks", "num_crowds"} - set(t):
            raise ValueError(f"target {i} lacks {', '.join(sorted(missing))}")
    t = match_batch(out["priors"], targets, cfg)
    pos = t.labels > 0
    losses = {"box": F.smooth_l1_loss(loc[pos], t.loc_t[pos], reduction="sum") * cfg.box_alpha}
    # masks: per image, over (a subsample of) its positives
    h, w = proto.shape[1:3]
    loss_m = proto.new_zeros(())
    for b, (_, _, masks) in enumerate(t.objects):
        positives = pos[b].nonzero()[:, 0]
        if len(positives) > 0:  # an image without positives draws no subsample, as in the original
            per_mask, _ = image_mask_loss(proto[b], coeffs[b], positives, t.gt_index[b], t.gt_box[b], masks,
                                          cfg.masks_to_train)
            loss_m = loss_m + per_mask.sum()
    losses["mask"] = loss_m * cfg.mask_alpha / h / w
    # classes: positives and the hard negatives
    neg = hard_negatives(mining_loss(conf), t.labels, cfg.negpos_ratio)
    losses["class"] = cfg.class_alpha * class_loss(conf, t.labels, neg)
    # semantic segmentation of P3
    loss_s = sum(semantic_loss(segm[b], masks, labels) for b, (_, labels, masks) in enumerate(t.objects))
    losses["semantic"] = loss_s / segm.shape[-2] / segm.shape[-1] * cfg.semantic_alpha
    # normalisation: per positive in the batch (the original divides by 0 in a batch without objects: here by 1)
    num_pos = pos.sum().float().clamp(min=1)
    for k in ("box", "mask", "class"):
        losses[k] = losses[k] / num_pos
    losses["semantic"] = losses["semantic"] / N
    return losses
