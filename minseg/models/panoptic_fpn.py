"""Panoptic FPN (Kirillov et al. 2019), as detectron2 builds it (COCO-PanopticSegmentation configs).

One network, two outputs: a Mask R-CNN (ResNet + FPN, RPN, box and mask heads) finds the "things", and a light
semantic head on the same FPN maps labels the "stuff"; panoptic fusion merges both into one segment id per pixel.

    batch of BGR images -> normalise, pad to /32 -> ResNet (stride in the 1x1) -> FPN p2..p6
        -> SemSegFPNHead(p2..p5)                                     -> sem_seg logits (padded size)
        -> RPN (p2..p6) -> RoI heads (p2..p5)                        -> boxes, scores, classes, 28x28 mask probs
    per image: rescale to (height, width), paste masks, crop+resize sem_seg, fuse -> panoptic_seg, segments_info

In train mode the same network returns detectron2's six losses instead (forward_train): the semantic head's cross
entropy, the RPN's and the RoI heads' (Mask R-CNN's) losses, with detectron2's matching, sampling and weights.

A fresh build takes detectron2's own initialisation (detectron2_init). Its default norms are detectron2's for an
ImageNet-initialised backbone (MODEL.RESNETS.NORM "FrozenBN", FREEZE_AT 2), with which random init diverges (0..255
pixels pass identity statistics unnormalised); norm="GN" or "BN" with freeze_at=0 trains from scratch as detectron2's
configs/Misc/scratch_* do (those also put GN in the FPN and the RoI heads, which minseg does not offer).

Follows detectron2 modeling/meta_arch/panoptic_fpn.py (PanopticFPN.forward, .inference) and rcnn.py
(preprocess_image); the RPN, RoI heads and FPN are the shared Mask R-CNN modules configured the detectron2 way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minseg.backbones.resnet import ResNet, resnet_config
from minseg.heads.matching import BalancedSampler
from minseg.heads.panoptic_fusion import FusionConfig, combine_semantic_and_instances
from minseg.heads.roi_heads import RoIHeads, RoIHeadsConfig
from minseg.heads.rpn import RPN, RPNConfig
from minseg.heads.semantic import SemSegFPNConfig, SemSegFPNHead, sem_seg_loss
from minseg.models._inputs import check_image_list
from minseg.models._options import (MAX_CLASSES, MAX_SIDE, check_choice, check_float, check_floats, check_int,
                                    set_checked, shown)
from minseg.models._predict import inference
from minseg.models.mask_rcnn import check_targets
from minseg.necks.fpn import FPN, FPNConfig
from minseg.ops.anchors import DefaultAnchorGenerator
from minseg.ops.box_coders import Box2BoxTransform
from minseg.ops.layers import FrozenBatchNorm2d, c2_msra_fill, c2_xavier_fill
from minseg.ops.masks import paste_masks_detectron2
from minseg.ops.poolers import MultiScaleRoIAlign, assign_levels_detectron2


# MODEL.RESNETS.NORM -> minseg's norm (ops/layers.py make_norm): detectron2 layers/batch_norm.py get_norm
RESNET_NORMS = {"FrozenBN": "frozen_bn", "BN": "bn", "GN": "gn"}


@dataclass(frozen=True, kw_only=True)
class PanopticFPNConfig:
    """What a Panoptic FPN variant fixes (its ResNet depth) and the create_model options, detectron2's config values."""
    depth: int                                              # ResNet depth, 50 or 101
    num_classes: int = 80                                   # things, contiguous 0..79 (background is index 80)
    num_sem_seg_classes: int = 54                           # 53 stuff classes + 0 = "things"
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR, 0..255 (MSRA weights)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisibility: int = 32
    min_size_test: int = 800                                # predict(): ResizeShortestEdge(800, 1333)
    max_size_test: int = 1333
    mask_threshold: float = 0.5                             # pasted mask probability >= this is foreground
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # training
    norm: str = "FrozenBN"                                  # MODEL.RESNETS.NORM: "FrozenBN", "BN" or "GN" (scratch)
    freeze_at: int = 2                                      # MODEL.BACKBONE.FREEZE_AT: stem and res2 (layer1) frozen
    sem_seg_loss_weight: float = 0.5                        # SEM_SEG_HEAD.LOSS_WEIGHT
    ignore_value: int = 255                                 # SEM_SEG_HEAD.IGNORE_VALUE: unlabelled sem_seg pixels

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, 1, MAX_CLASSES)
        check_int("num_sem_seg_classes", self.num_sem_seg_classes, 1, MAX_CLASSES)
        set_checked(self, "pixel_mean", check_floats("pixel_mean", self.pixel_mean, 3, -1e3, 1e3))
        set_checked(self, "pixel_std", check_floats("pixel_std", self.pixel_std, 3, 1e-6, 1e3))
        check_int("size_divisibility", self.size_divisibility, 1, 128)
        check_int("min_size_test", self.min_size_test, 1, MAX_SIDE)
        check_int("max_size_test", self.max_size_test, 1, MAX_SIDE)
        check_float("mask_threshold", self.mask_threshold, 0.0, 1.0)
        check_choice("norm", self.norm, tuple(RESNET_NORMS))
        check_int("freeze_at", self.freeze_at, 0, 5)
        check_float("sem_seg_loss_weight", self.sem_seg_loss_weight, 0.0, 1e3)
        check_int("ignore_value", self.ignore_value, 0, 65535)
        if not isinstance(self.fusion, FusionConfig):
            raise TypeError(f"fusion must be a FusionConfig, got {shown(self.fusion)}")


class PanopticFPN(nn.Module):
    """list[{"image": Tensor[3, H, W] BGR 0..255, "height", "width"}] -> per image {"instances": {"boxes" Tensor[K, 4],
    "scores" Tensor[K], "labels" Tensor[K] (0..79), "masks" Tensor[K, height, width] bool}, "sem_seg"
    Tensor[54, height, width], "panoptic_seg" Tensor[height, width] int32, "segments_info" list[dict]}."""

    def __init__(self, cfg: PanopticFPNConfig, backbone: ResNet, fpn: FPN, rpn: RPN, roi_heads: RoIHeads,
                 sem_seg_head: SemSegFPNHead):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.sem_seg_head = sem_seg_head
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    def preprocess(self, batch: list[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise each image, then zero-pad all to one size divisible by 32 (right and bottom);
        (Tensor[N, 3, Hp, Wp], unpadded (h, w) per image). Follows detectron2 structures/image_list.py."""
        if not isinstance(batch, (list, tuple)) or not batch:
            raise ValueError("expected a non-empty list of {'image': Tensor[3, H, W], 'height', 'width'} dicts")
        if not all(isinstance(item, dict) and "image" in item for item in batch):
            raise ValueError("each input needs 'image': a Tensor[3, H, W] (BGR, 0..255)")
        # uint8 too, as detectron2's DatasetMapper gives it (the subtraction below makes it float)
        check_image_list([item["image"] for item in batch], "a Tensor[3, H, W] (BGR, 0..255)", uint8_ok=True)
        images = [(item["image"].to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std for item in batch]
        sizes = [(im.shape[1], im.shape[2]) for im in images]
        # pad to ceil(side / d) * d, in integers (symbolic sizes under torch.export), of positive numbers only: the
        # ONNX exporter's integer division truncates
        d = self.cfg.size_divisibility
        hp = (functools.reduce(torch.sym_max, [h for h, _ in sizes]) + d - 1) // d * d
        wp = (functools.reduce(torch.sym_max, [w for _, w in sizes]) + d - 1) // d * d
        return torch.stack([F.pad(im, (0, wp - im.shape[2], 0, hp - im.shape[1])) for im in images]), sizes  # zeros

    def forward(self, batch: list[dict]) -> list[dict] | dict[str, torch.Tensor]:
        if self.training:
            return self.forward_train(batch)
        # 1. normalise and pad; ResNet; FPN
        images, sizes = self.preprocess(batch)
        features = self.fpn(self.backbone(images))                      # {"p2": Tensor[N, 256, Hp/4, Wp/4], ..., "p6"}
        # 2. semantic logits at the padded size
        sem_seg = self.sem_seg_head([features[k] for k in ("p2", "p3", "p4", "p5")])  # (N, 54, Hp, Wp)
        # 3. proposals, then detections with 28x28 mask probabilities, at the network's input scale
        proposals = self.rpn(features, sizes, tuple(images.shape[-2:]))  # per image {"boxes", "scores" (logits)}
        detections = self.roi_heads(features, [p["boxes"] for p in proposals], sizes)
        # 4. per image: back to the requested size, then fusion
        results = []
        for item, size, sem, det in zip(batch, sizes, sem_seg, detections):
            height, width = torch.sym_int(item.get("height", size[0])), torch.sym_int(item.get("width", size[1]))
            sem = sem_seg_postprocess(sem, size, height, width)
            instances = detector_postprocess(det, size, height, width, self.cfg.mask_threshold)
            panoptic, segments = combine_semantic_and_instances(
                instances["scores"], instances["labels"], instances["masks"], sem.argmax(dim=0), self.cfg.fusion,
                num_labels=sem.shape[0])
            results.append({"instances": instances, "sem_seg": sem, "panoptic_seg": panoptic, "segments_info": segments})
        return results

    def forward_train(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        """Each entry also holding "instances": {"boxes" Tensor[K, 4] xyxy, "labels" Tensor[K] int64 0..79, "masks"
        Tensor[K, H, W] bool} and "sem_seg" Tensor[H, W] int64 (0 things, 1..53 stuff, 255 ignored), at the size
        of "image" -> {"loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"},
        in detectron2's order. Random anchor and proposal sampling draws from torch's global generator as
        detectron2 does: RPN image by image, then the RoI heads image by image."""
        check_training_inputs(batch)
        # 1. normalise and pad; ResNet; FPN
        images, sizes = self.preprocess(batch)
        N, _, Hp, Wp = images.shape
        features = self.fpn(self.backbone(images))
        # 2. semantic head: cross entropy at the padded size, the padding ignored (ImageList pad value 255)
        sem_seg = self.sem_seg_head([features[k] for k in ("p2", "p3", "p4", "p5")])  # (N, 54, Hp, Wp)
        targets = torch.full((N, Hp, Wp), self.cfg.ignore_value, dtype=torch.int64, device=images.device)
        for target, item, (h, w) in zip(targets, batch, sizes):
            target[:h, :w].copy_(item["sem_seg"])
        losses = {"loss_sem_seg": sem_seg_loss(sem_seg, targets, self.cfg.ignore_value, self.cfg.sem_seg_loss_weight)}
        # 3. RPN losses on sampled anchors; its train-mode proposals
        instances = [{k: v.to(images.device) for k, v in item["instances"].items()} for item in batch]
        proposals, rpn = self.rpn.forward_train(features, sizes, (Hp, Wp), [t["boxes"] for t in instances])
        # 4. box and mask losses on sampled proposals (gt boxes appended)
        heads = self.roi_heads.forward_train(features, [p["boxes"] for p in proposals], sizes, instances)
        losses.update(loss_rpn_cls=rpn["loss_objectness"], loss_rpn_loc=rpn["loss_rpn_box_reg"],
                      loss_cls=heads["loss_classifier"], loss_box_reg=heads["loss_box_reg"],
                      loss_mask=heads["loss_mask"])
        return losses

    @inference
    def predict(self, images) -> list[dict]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image the forward() dict at the image's
        own size, as detectron2's DefaultPredictor computes it (PIL bilinear resize of the uint8 image, shortest
        side 800, longest at most 1333)."""
        from minseg.image import load_rgb_list

        results = []
        for image in load_rgb_list(images):
            h, w = image.height, image.width
            newh, neww = resize_shortest_edge(h, w, self.cfg.min_size_test, self.cfg.max_size_test)
            if min(newh, neww) < 1:
                raise ValueError(f"image of {w}x{h} is too elongated: resized to shortest side "
                                 f"{self.cfg.min_size_test}, longest at most {self.cfg.max_size_test}, a side would "
                                 f"be 0 px; crop it")
            # PIL filters each channel alone, so resizing RGB then flipping equals the original's resize of BGR
            rgb = np.asarray(image.resize((neww, newh), resample=_pil_bilinear()))
            bgr = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1]).astype("float32")).permute(2, 0, 1)
            results.extend(self([{"image": bgr.to(self.pixel_mean.device), "height": h, "width": w}]))
        return results


def check_training_inputs(batch: list[dict]) -> None:
    """Clear errors for a train-mode batch without its targets (ValueError, as torchvision's train mode)."""
    if not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError("expected a non-empty list of {'image', 'instances', 'sem_seg'} dicts")
    for i, item in enumerate(batch):
        missing = [k for k in ("image", "instances", "sem_seg") if not isinstance(item, dict) or k not in item]
        if missing:
            raise ValueError(f"in train mode each input needs 'image', 'instances' and 'sem_seg'; input {i} lacks "
                             f"{missing}")
        sem_seg, shape = item["sem_seg"], tuple(item["image"].shape[-2:])
        if not isinstance(sem_seg, torch.Tensor) or tuple(sem_seg.shape) != shape:
            raise ValueError(f"input {i}: sem_seg must be a Tensor{list(shape)} (the image's size), got "
                             f"{tuple(sem_seg.shape) if isinstance(sem_seg, torch.Tensor) else type(sem_seg).__name__}")
    check_targets([item["image"] for item in batch], [item["instances"] for item in batch])


def freeze_stages(backbone: ResNet, freeze_at: int) -> None:
    """detectron2 ResNet.freeze(freeze_at): the stem (freeze_at >= 1) and the residual stages res2..res{freeze_at}
    (minseg's layer1..layer{freeze_at - 1}) stop training: requires_grad False, and a BatchNorm there becomes a
    FrozenBatchNorm2d holding its statistics (CNNBlockBase.freeze); FrozenBN and GN norms keep their modules."""
    frozen = tuple(["conv1.", "bn1."] if freeze_at >= 1 else []) + tuple(f"layer{k}." for k in range(1, freeze_at))
    for name, m in list(backbone.named_modules()):
        if isinstance(m, nn.BatchNorm2d) and (name + ".").startswith(frozen):
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent), child, FrozenBatchNorm2d.from_batch_norm(m, "batch_norm"))
    for name, p in backbone.named_parameters():
        if name.startswith(frozen):
            p.requires_grad_(False)


def normal_fill(m: nn.Module, std: float) -> None:
    nn.init.normal_(m.weight, std=std)
    nn.init.zeros_(m.bias)


def detectron2_init(model: PanopticFPN) -> None:
    """Give every layer the initialisation detectron2 gives it when it builds the model (a random-init build, and
    the class-specific layers that fine-tuning with another num_classes re-initialises):
        backbone convs                 c2_msra_fill      modeling/backbone/resnet.py (BasicStem, BottleneckBlock)
        box head fcs                   c2_xavier_fill    roi_heads/box_head.py FastRCNNConvFCHead
        cls_score / bbox_pred          normal 0.01 / 0.001, bias 0   roi_heads/fast_rcnn.py FastRCNNOutputLayers
        mask head convs and deconv     c2_msra_fill      roi_heads/mask_head.py MaskRCNNConvUpsampleHead
        mask predictor                 normal 0.001, bias 0          (same)
        sem-seg head convs, predictor  c2_msra_fill      meta_arch/semantic_seg.py SemSegFPNHead
    The FPN (c2_xavier_fill) and RPN (normal 0.01, bias 0) constructors already initialise as detectron2's, and
    every norm starts as weight 1, bias 0 (statistics 0 and 1)."""
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    heads = model.roi_heads
    convs += [m for m in heads.mask_head.conv.modules() if isinstance(m, nn.Conv2d)] + [heads.mask_head.deconv]
    convs += [m for m in model.sem_seg_head.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        c2_msra_fill(m)
    for fc in heads.box_head.fc:
        c2_xavier_fill(fc)
    normal_fill(heads.box_predictor.cls_score, 0.01)
    normal_fill(heads.box_predictor.bbox_pred, 0.001)
    normal_fill(heads.mask_head.predictor, 0.001)


def _pil_bilinear():
    from PIL import Image

    return Image.BILINEAR


def resize_shortest_edge(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(new h, new w): shortest side to `short`, longest at most `max_size`, rounded half up.
    Follows detectron2 data/transforms/augmentation_impl.py ResizeShortestEdge.get_output_shape (Python floats)."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def sem_seg_postprocess(logits: torch.Tensor, size: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Tensor[C, Hp, Wp] logits at the padded size -> Tensor[C, height, width]: crop to the unpadded (h, w), then
    bilinear resize (that order: cropping first would change the border values). detectron2 postprocessing.py."""
    # the crop as a gather of rows and columns: a slice's end would make torch.export decide whether the image
    # fills its padded size (a guard on the size)
    rows, columns = (torch.arange(n, device=logits.device) for n in size)
    logits = logits.index_select(1, rows).index_select(2, columns)[None]
    return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]


def detector_postprocess(det: dict[str, torch.Tensor], size: tuple[int, int], height: int, width: int,
                         mask_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Detections at the network's input scale (boxes Tensor[K, 4], scores, labels, mask_probs Tensor[K, 1, M, M]) ->
    boxes scaled to (height, width), clipped, empty ones dropped, masks pasted there as Tensor[K', height, width]
    bool. Follows detectron2 modeling/postprocessing.py detector_postprocess."""
    scale_x, scale_y = width / size[1], height / size[0]
    boxes = det["boxes"].clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    x1, y1, x2, y2 = boxes.unbind(1)
    boxes = torch.stack([x1.clamp(min=0, max=width), y1.clamp(min=0, max=height),
                         x2.clamp(min=0, max=width), y2.clamp(min=0, max=height)], dim=-1)
    keep = torch.where(((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0))[0]
    boxes, probs = boxes[keep], det["mask_probs"][keep]
    masks = paste_masks_detectron2(probs[:, 0], boxes, (height, width), mask_threshold)
    return {"boxes": boxes, "scores": det["scores"][keep], "labels": det["labels"][keep], "masks": masks}


# The shared Mask R-CNN modules, set to what detectron2's Base-RCNN-FPN.yaml does (spec section 12)
DETECTRON2_FPN = FPNConfig(upsample="scale2")                  # interpolate(scale_factor=2), LastLevelMaxPool p6
def detectron2_rpn() -> RPN:
    cfg = RPNConfig(decode_per_level=True, objectness="logits", score_thresh=None,  # NMS on raw logits, no threshold
                    min_size=0.0, min_size_strict=True,                            # keep boxes with w > 0 and h > 0
                    drop_nonfinite=True,
                    post_nms_top_n_train=1000,                                     # POST_NMS_TOPK_TRAIN, per image
                    smooth_l1_beta=0.0, loss_normalizer="batch_size")              # L1; sums / (256 * N)
    # exact anchors at strides 4..64 (sizes 32..512, one per level), deltas unweighted; matcher and sampler as
    # torchvision's (IoU 0.3 / 0.7 with low-quality matches; 256 anchors, half positive)
    return RPN(cfg, DefaultAnchorGenerator(), Box2BoxTransform((1.0, 1.0, 1.0, 1.0)))


def detectron2_roi_heads(num_classes: int) -> RoIHeads:
    cfg = RoIHeadsConfig(num_classes=num_classes, background="last",
                         min_size=None, drop_nonfinite=True,                     # no small-box removal
                         smooth_l1_beta=0.0,                                     # L1 box loss
                         mask_target_aligned=True, mask_target_threshold=0.5)    # BitMasks.crop_and_resize
    # ROIAlignV2 (aligned, adaptive sampling) at fixed scales, detectron2's level rule
    pool = dict(aligned=True, level_rule=assign_levels_detectron2, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32])
    levels = ["p2", "p3", "p4", "p5"]
    # 512 proposals per image, a quarter positive at most; background label K, samples kept in randperm order
    sampler = BalancedSampler(512, 0.25, background_label=num_classes, sort=False)
    return RoIHeads(cfg, MultiScaleRoIAlign(levels, 7, 0, **pool), MultiScaleRoIAlign(levels, 14, 0, **pool),
                    Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), sampler=sampler)


def panoptic_fpn(cfg: PanopticFPNConfig) -> PanopticFPN:
    backbone = ResNet(resnet_config(cfg.depth, stride_in_1x1=True, norm=RESNET_NORMS[cfg.norm], norm_eps=1e-5,
                                    out_features=("c2", "c3", "c4", "c5")))
    model = PanopticFPN(cfg, backbone, FPN(DETECTRON2_FPN), detectron2_rpn(), detectron2_roi_heads(cfg.num_classes),
                        SemSegFPNHead(SemSegFPNConfig(num_classes=cfg.num_sem_seg_classes)))
    detectron2_init(model)
    freeze_stages(backbone, cfg.freeze_at)
    return model


def panoptic_fpn_resnet50_config(**options) -> PanopticFPNConfig:
    """detectron2's COCO-PanopticSegmentation/panoptic_fpn_R_50_3x."""
    return PanopticFPNConfig(depth=50, **options)


def panoptic_fpn_resnet101_config(**options) -> PanopticFPNConfig:
    """detectron2's COCO-PanopticSegmentation/panoptic_fpn_R_101_3x."""
    return PanopticFPNConfig(depth=101, **options)
