"""Mask R-CNN (He et al. 2017) with a ResNet-50 FPN, as torchvision.models.detection builds it.

    images (list of Tensor[3, H_i, W_i], 0..1) -> normalise, resize (shorter side 800, longer <= 1333), pad to /32
        -> ResNet-50 c2..c5 -> FPN p2..p6 -> RPN: 1000 proposals per image
        -> RoI heads: boxes, scores, labels (1..90, COCO ids; 0 is background) and 28x28 mask probabilities
    per image: boxes scaled back to (H_i, W_i), masks pasted into the image -> {"boxes", "labels", "scores", "masks"}

`maskrcnn_resnet50_fpn` (v1): TwoMLPHead box head, no norms outside the backbone. `maskrcnn_resnet50_fpn_v2`
(Li et al. 2021, "Benchmarking detection transfer learning with vision transformers"): BatchNorm everywhere
(backbone, FPN, box and mask heads), 2 RPN convs, a 4-conv + 1-fc box head.

The backbone norm (`norm`, `norm_eps`) decides which torchvision model this equals:
  norm="frozen", norm_eps=0.0   (v1 default) torchvision's official COCO v1 weights: FrozenBatchNorm2d, whose eps
                                torchvision sets to 0.0 after loading them (overwrite_eps in mask_rcnn.py)
  norm="frozen", norm_eps=1e-5  a torchvision v1 model built with weights_backbone only
  norm="bn",     norm_eps=1e-5  a torchvision v1 model with random init (plain BatchNorm2d), and v2 (default)
`minseg.convert` picks "bn" when the checkpoint carries BatchNorm's num_batches_tracked counters.

Follows torchvision models/detection/{transform,generalized_rcnn,mask_rcnn}.py; the shared parts are
necks/fpn.py, heads/rpn.py and heads/roi_heads.py (configured the torchvision way here).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minseg.backbones.resnet import ResNet, resnet_config
from minseg.heads.roi_heads import RoIHeads, RoIHeadsConfig
from minseg.heads.rpn import RPN, RPNConfig
from minseg.models._inputs import check_image_list
from minseg.models._options import (MAX_BOXES, MAX_CLASSES, MAX_SIDE, check_choice, check_float, check_floats,
                                    check_int, set_checked)
from minseg.models._predict import inference
from minseg.necks.fpn import FPN, FPNConfig
from minseg.ops.anchors import AnchorGenerator
from minseg.ops.box_coders import BoxCoder
from minseg.ops.forms import copy_to_device
from minseg.ops.masks import paste_masks_torchvision
from minseg.ops.poolers import MultiScaleRoIAlign


@dataclass(frozen=True)
class TransformConfig:
    """torchvision's GeneralizedRCNNTransform at inference."""
    min_size: int = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32


def resize_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Scale that brings the shorter side to min_size unless the longer side would pass max_size (Python floats,
    as torchvision's _resize_image_and_masks; torch.sym_min/sym_max are min/max that also take the symbolic
    sizes of torch.export)."""
    return torch.sym_min(min_size / torch.sym_min(h, w), max_size / torch.sym_max(h, w))


class MaskRCNN(nn.Module):
    """model(images: list of Tensor[3, H, W] in 0..1) -> per image {"boxes": Tensor[K, 4] xyxy pixels,
    "labels": Tensor[K] int64, "scores": Tensor[K], "masks": Tensor[K, 1, H, W] probabilities}."""

    def __init__(self, transform: TransformConfig, backbone: ResNet, fpn: FPN, rpn: RPN, roi_heads: RoIHeads):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads

    def preprocess(self, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise and resize each image, zero-pad all to one size divisible by 32 (right and bottom).
        Returns (Tensor[N, 3, Hp, Wp], resized (h, w) per image). Follows torchvision transform.py."""
        t = self.transform
        check_image_list(images, "a floating-point Tensor[3, H, W] in 0..1")
        resized = []
        for i, image in enumerate(images):
            if self.training:  # kept: torchvision draws its random choice of min_size (one here) per image
                torch.empty(1).uniform_(0.0, 1.0)  # so the samplers' randperm draws that follow match its
            H, W = image.shape[1:]
            scale = resize_scale(H, W, t.min_size, t.max_size)
            size = (math.floor(H * scale), math.floor(W * scale))  # F.interpolate's output size for `scale`
            if not torch.compiler.is_compiling() and min(size) < 1:  # torchvision fails inside interpolate
                raise ValueError(f"image {i} of {H}x{W} is too elongated: resized by {scale:.4g} (shorter side "
                                 f"towards {t.min_size}, longer at most {t.max_size}) a side would be 0 px; crop it")
            mean = copy_to_device(t.image_mean, image.dtype, image.device)
            std = copy_to_device(t.image_std, image.dtype, image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            # torchvision passes scale_factor with recompute_scale_factor=True: the output size is floor(side *
            # scale) and the kernel steps by side / output, which is what passing that size does
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            resized.append(image)
        sizes = [(im.shape[1], im.shape[2]) for im in resized]
        # pad to ceil(side / d) * d in integers (the sizes may be symbolic: torch.export), written without a negative
        # floor division, which the ONNX exporter turns into a truncating one
        d = t.size_divisible
        hp = (functools.reduce(torch.sym_max, [h for h, _ in sizes]) + d - 1) // d * d
        wp = (functools.reduce(torch.sym_max, [w for _, w in sizes]) + d - 1) // d * d
        batch = torch.stack([F.pad(im, (0, wp - im.shape[2], 0, hp - im.shape[1])) for im in resized])  # zeros
        return batch, sizes

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        if self.training:
            if targets is None:
                raise ValueError("in train mode the model needs targets: per image {'boxes', 'labels', 'masks'}")
            return self.forward_train(images, targets)
        # 1. normalise, resize, pad; ResNet; FPN
        x, sizes = self.preprocess(images)
        original_sizes = [(im.shape[-2], im.shape[-1]) for im in images]
        features = self.fpn(self.backbone(x))                      # {"p2": Tensor[N, 256, Hp/4, Wp/4], ..., "p6"}
        # 2. proposals, then detections with 28x28 mask probabilities at the resized scale
        proposals = self.rpn(features, sizes, (x.shape[-2], x.shape[-1]))
        detections = self.roi_heads(features, [p["boxes"] for p in proposals], sizes)
        # 3. back to each image's own size
        return [postprocess(d, size, original) for d, size, original in zip(detections, sizes, original_sizes)]

    def forward_train(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Train mode: images and their targets {"boxes": Tensor[K, 4] xyxy pixels, "labels": Tensor[K] int64 in
        1..num_classes-1, "masks": Tensor[K, H, W] uint8} -> torchvision's five losses (their sum is the
        objective). Follows torchvision generalized_rcnn.py."""
        check_targets(images, targets)
        # 1. normalise, resize, pad the images; resize their targets the same way
        x, sizes = self.preprocess(images)
        tf = self.transform
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        targets = [resize_target(t, hw, size, resize_scale(*hw, tf.min_size, tf.max_size))
                   for t, hw, size in zip(targets, originals, sizes)]
        for i, t in enumerate(targets):  # torchvision checks after resizing
            bad = torch.where((t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1))[0]
            if len(bad):
                raise ValueError(f"image {i}: box {int(bad[0])} {t['boxes'][bad[0]].tolist()} (after resizing) has "
                                 "no positive width and height; boxes must be xyxy with x2 > x1, y2 > y1")
        features = self.fpn(self.backbone(x))
        # 2. RPN proposals and losses, then the RoI heads' losses on them
        proposals, rpn_losses = self.rpn.forward_train(features, sizes, (x.shape[-2], x.shape[-1]),
                                                       [t["boxes"] for t in targets])
        head_losses = self.roi_heads.forward_train(features, [p["boxes"] for p in proposals], sizes, targets)
        return {**head_losses, **rpn_losses}

    @inference
    def predict(self, images) -> list[dict[str, Tensor]]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image the forward() dict at the
        image's own size (torchvision's own preprocessing: 0..1 floats, the model's resize and normalisation)."""
        from minseg.image import load_rgb_list, to_tensor

        device = next(self.parameters()).device
        return [self([to_tensor(image).to(device)])[0] for image in load_rgb_list(images)]


def check_targets(images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
    """Clear errors for targets a train-mode forward cannot take (torchvision's checks, as ValueError/TypeError)."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"expected a list of {len(images)} target dicts, one per image, got {type(targets).__name__}"
                         + (f" of {len(targets)}" if isinstance(targets, (list, tuple)) else ""))
    for i, t in enumerate(targets):
        missing = [k for k in ("boxes", "labels", "masks") if k not in t]
        if missing:
            raise ValueError(f"target {i} lacks {missing}: each needs 'boxes', 'labels' and 'masks'")
        boxes, labels = t["boxes"], t["labels"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: expected boxes as a Tensor[K, 4], got "
                             f"{tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__}")
        if not boxes.is_floating_point():
            raise TypeError(f"target {i}: boxes must be floating point, got {boxes.dtype}")
        if labels.dtype != torch.int64:
            raise TypeError(f"target {i}: labels must be int64, got {labels.dtype}")


def resize_target(target: dict[str, Tensor], original: tuple[int, int], size: tuple[int, int],
                  scale: float) -> dict[str, Tensor]:
    """Boxes scaled by float32 ratios (torchvision's resize_boxes) and masks resized by nearest neighbour with
    the image's scale factor (its _resize_image_and_masks), from (h, w) `original` to `size`."""
    boxes = target["boxes"]
    ratio_h, ratio_w = (torch.tensor(s, dtype=torch.float32, device=boxes.device) /
                        torch.tensor(o, dtype=torch.float32, device=boxes.device) for s, o in zip(size, original))
    x1, y1, x2, y2 = boxes.unbind(1)
    boxes = torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)
    masks = F.interpolate(target["masks"][:, None].float(), scale_factor=scale, recompute_scale_factor=True)[:, 0]
    return {**target, "boxes": boxes, "masks": masks.byte()}


def postprocess(det: dict[str, Tensor], size: tuple[int, int], original: tuple[int, int]) -> dict[str, Tensor]:
    """Detections at the resized scale -> boxes scaled to the original (h, w) (float32 ratios, as torchvision's
    resize_boxes) and masks pasted there as Tensor[K, 1, h, w] probabilities."""
    boxes = det["boxes"]
    def scalar(n: int) -> Tensor:  # a float32 0-dim tensor of a size, also of a symbolic one (torch.export)
        return torch.full((), n, dtype=torch.float32, device=boxes.device)

    ratio_h, ratio_w = scalar(original[0]) / scalar(size[0]), scalar(original[1]) / scalar(size[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    boxes = torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)
    masks = paste_masks_torchvision(det["mask_probs"], boxes, original)
    return {"boxes": boxes, "labels": det["labels"], "scores": det["scores"], "masks": masks}


@dataclass(frozen=True, kw_only=True)
class MaskRCNNConfig:
    """What a Mask R-CNN variant fixes (fields without a default) and the create_model options: torchvision's
    MaskRCNN keyword arguments, with its defaults and meaning (num_classes counts the background)."""
    # the variant's architecture (v1 / v2)
    rpn_convs: int                                  # 3x3 conv + ReLU layers in the RPN head
    box_convs: int                                  # 3x3 convs of the box head before its fcs
    box_fcs: int
    head_norm: bool                                 # `norm` in the FPN, box and mask heads too, not only the backbone
    # options
    num_classes: int = 91
    min_size: int = 800                             # resize: shorter side to min_size, longer side at most max_size
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rpn_pre_nms_top_n_train: int = 2000             # per level
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000            # per image
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    bbox_reg_weights: tuple[float, float, float, float] | None = None  # None: (10, 10, 5, 5)
    norm: str = "frozen"                            # see the module docstring
    norm_eps: float = 0.0
    trainable_backbone_layers: int | None = None    # 0..5, torchvision's; None: 3 with a frozen norm, 5 with "bn"

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, 2, MAX_CLASSES)  # with the background
        check_int("min_size", self.min_size, 1, MAX_SIDE)
        check_int("max_size", self.max_size, 1, MAX_SIDE)
        set_checked(self, "image_mean", check_floats("image_mean", self.image_mean, 3, -1e3, 1e3))
        set_checked(self, "image_std", check_floats("image_std", self.image_std, 3, 1e-6, 1e3))
        for name in ("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                     "rpn_post_nms_top_n_test", "box_detections_per_img"):
            check_int(name, getattr(self, name), 1, MAX_BOXES)
        for name in ("rpn_nms_thresh", "rpn_score_thresh", "box_score_thresh", "box_nms_thresh"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        if self.bbox_reg_weights is not None:
            weights = check_floats("bbox_reg_weights", self.bbox_reg_weights, 4, 1e-3, 1e3)
            set_checked(self, "bbox_reg_weights", weights)
        check_choice("norm", self.norm, ("frozen", "bn"))
        check_float("norm_eps", self.norm_eps, 0.0, 1.0)
        if self.trainable_backbone_layers is not None:
            check_int("trainable_backbone_layers", self.trainable_backbone_layers, 0, 5)


def mask_rcnn(cfg: MaskRCNNConfig) -> MaskRCNN:
    head_norm = cfg.norm if cfg.head_norm else None
    transform = TransformConfig(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std)
    backbone = ResNet(resnet_config(50, norm=cfg.norm, norm_eps=cfg.norm_eps, out_features=("c2", "c3", "c4", "c5")))
    fpn = FPN(FPNConfig(norm=head_norm, norm_eps=cfg.norm_eps))
    rpn = RPN(RPNConfig(conv_depth=cfg.rpn_convs,
                        pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test, post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
                        pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
                        post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
                        nms_thresh=cfg.rpn_nms_thresh, score_thresh=cfg.rpn_score_thresh),
              AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),)),
              BoxCoder((1.0, 1.0, 1.0, 1.0)))
    roi_heads = RoIHeads(
        RoIHeadsConfig(num_classes=cfg.num_classes - 1, box_convs=cfg.box_convs, box_fcs=cfg.box_fcs, norm=head_norm,
                       norm_eps=cfg.norm_eps, score_thresh=cfg.box_score_thresh, nms_thresh=cfg.box_nms_thresh,
                       detections_per_img=cfg.box_detections_per_img),
        MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2),  # torchvision's level rule, scales from the sizes
        MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 14, 2),
        BoxCoder(cfg.bbox_reg_weights or (10.0, 10.0, 5.0, 5.0)))
    trainable = cfg.trainable_backbone_layers
    if trainable is None:  # torchvision: 3 when starting from trained weights, else all 5
        trainable = 3 if cfg.norm == "frozen" else 5
    freeze_backbone_layers(backbone, trainable)
    return MaskRCNN(transform, backbone, fpn, rpn, roi_heads)


def freeze_backbone_layers(backbone: ResNet, trainable: int) -> None:
    """torchvision's trainable_layers (backbone_utils._resnet_fpn_extractor): only the last `trainable` of
    layer4, layer3, layer2, layer1, conv1 (with bn1 when all 5) keep requires_grad. Frozen BatchNorm2d layers
    still update their running statistics in train mode, as torchvision's do."""
    if not 0 <= trainable <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for name, p in backbone.named_parameters():
        if not any(name.startswith(prefix) for prefix in train):
            p.requires_grad_(False)


def maskrcnn_resnet50_fpn_config(**options) -> MaskRCNNConfig:
    """torchvision's maskrcnn_resnet50_fpn: TwoMLPHead box head, no norms outside the backbone; by default the
    official COCO weights' FrozenBatchNorm2d with eps 0."""
    return MaskRCNNConfig(rpn_convs=1, box_convs=0, box_fcs=2, head_norm=False, **options)


def maskrcnn_resnet50_fpn_v2_config(*, norm: str = "bn", norm_eps: float = 1e-5, **options) -> MaskRCNNConfig:
    """torchvision's maskrcnn_resnet50_fpn_v2: BatchNorm in the backbone, FPN and heads, 2 RPN convs, a 4-conv +
    1-fc box head."""
    return MaskRCNNConfig(rpn_convs=2, box_convs=4, box_fcs=1, head_norm=True, norm=norm, norm_eps=norm_eps, **options)
