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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minseg.backbones.resnet import ResNet, resnet_config
from minseg.heads.roi_heads import RoIHeads, RoIHeadsConfig
from minseg.heads.rpn import RPN, RPNConfig
from minseg.models._inputs import check_image_list
from minseg.necks.fpn import FPN, FPNConfig
from minseg.ops.anchors import AnchorGenerator
from minseg.ops.box_coders import BoxCoder
from minseg.ops.forms import device_scalar, copy_to_device
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
    as torchvision's _resize_image_and_masks)."""
    return min(min_size / min(h, w), max_size / max(h, w))


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
            H, W = image.shape[1:]
            scale = resize_scale(H, W, t.min_size, t.max_size)
            if math.floor(H * scale) < 1 or math.floor(W * scale) < 1:  # torchvision fails inside interpolate
                raise ValueError(f"image {i} of {H}x{W} is too elongated: resized by {scale:.4g} (shorter side "
                                 f"towards {t.min_size}, longer at most {t.max_size}) a side would be 0 px; crop it")
            mean = copy_to_device(t.image_mean, image.dtype, image.device)
            std = copy_to_device(t.image_std, image.dtype, image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            # kept: scale_factor with recompute_scale_factor=True, so the output size is floor(side * scale)
            # and the kernel uses side / output as its step, exactly as torchvision calls it
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                                  align_corners=False)[0]
            resized.append(image)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in resized]
        d = float(t.size_divisible)
        hp = int(math.ceil(max(h for h, _ in sizes) / d) * d)
        wp = int(math.ceil(max(w for _, w in sizes) / d) * d)
        batch = resized[0].new_zeros(len(resized), 3, hp, wp)
        for i, im in enumerate(resized):
            batch[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        return batch, sizes

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        # 1. normalise, resize, pad; ResNet; FPN
        x, sizes = self.preprocess(images)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        features = self.fpn(self.backbone(x))                      # {"p2": Tensor[N, 256, Hp/4, Wp/4], ..., "p6"}
        # 2. proposals, then detections with 28x28 mask probabilities at the resized scale
        proposals = self.rpn(features, sizes, (x.shape[-2], x.shape[-1]))
        detections = self.roi_heads(features, [p["boxes"] for p in proposals], sizes)
        # 3. back to each image's own size
        return [postprocess(d, size, original) for d, size, original in zip(detections, sizes, original_sizes)]

    @torch.no_grad()
    def predict(self, images) -> list[dict[str, Tensor]]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image the forward() dict at the
        image's own size (torchvision's own preprocessing: 0..1 floats, the model's resize and normalisation)."""
        from minseg.image import load_rgb_list, to_tensor

        device = next(self.parameters()).device
        return [self([to_tensor(image).to(device)])[0] for image in load_rgb_list(images)]


def postprocess(det: dict[str, Tensor], size: tuple[int, int], original: tuple[int, int]) -> dict[str, Tensor]:
    """Detections at the resized scale -> boxes scaled to the original (h, w) (float32 ratios, as torchvision's
    resize_boxes) and masks pasted there as Tensor[K, 1, h, w] probabilities."""
    boxes = det["boxes"]
    def scalar(n: int) -> Tensor:
        return device_scalar(float(n), boxes, torch.float32)

    ratio_h, ratio_w = scalar(original[0]) / scalar(size[0]), scalar(original[1]) / scalar(size[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    boxes = torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)
    masks = paste_masks_torchvision(det["mask_probs"], boxes, original)
    return {"boxes": boxes, "labels": det["labels"], "scores": det["scores"], "masks": masks}


def mask_rcnn(v2: bool, num_classes: int, min_size: int, max_size: int, image_mean: tuple[float, float, float],
              image_std: tuple[float, float, float], rpn_pre_nms_top_n_train: int, rpn_pre_nms_top_n_test: int,
              rpn_post_nms_top_n_train: int, rpn_post_nms_top_n_test: int, rpn_nms_thresh: float,
              rpn_score_thresh: float, box_score_thresh: float, box_nms_thresh: float, box_detections_per_img: int,
              bbox_reg_weights: tuple[float, float, float, float] | None, norm: str, norm_eps: float) -> MaskRCNN:
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too (torchvision's meaning); got {num_classes}")
    head_norm = norm if v2 else None
    transform = TransformConfig(min_size, max_size, tuple(image_mean), tuple(image_std))
    backbone = ResNet(resnet_config(50, norm=norm, norm_eps=norm_eps, out_features=("c2", "c3", "c4", "c5")))
    fpn = FPN(FPNConfig(norm=head_norm, norm_eps=norm_eps))
    rpn = RPN(RPNConfig(conv_depth=2 if v2 else 1, pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                        post_nms_top_n_test=rpn_post_nms_top_n_test, pre_nms_top_n_train=rpn_pre_nms_top_n_train,
                        post_nms_top_n_train=rpn_post_nms_top_n_train, nms_thresh=rpn_nms_thresh,
                        score_thresh=rpn_score_thresh),
              AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),)),
              BoxCoder((1.0, 1.0, 1.0, 1.0)))
    roi_heads = RoIHeads(
        RoIHeadsConfig(num_classes=num_classes - 1, box_convs=4 if v2 else 0, box_fcs=1 if v2 else 2, norm=head_norm,
                       norm_eps=norm_eps, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
                       detections_per_img=box_detections_per_img),
        MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2),  # torchvision's level rule, scales from the sizes
        MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 14, 2),
        BoxCoder(tuple(bbox_reg_weights or (10.0, 10.0, 5.0, 5.0))))
    return MaskRCNN(transform, backbone, fpn, rpn, roi_heads)


def maskrcnn_resnet50_fpn(
        num_classes: int = 91, min_size: int = 800, max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7, rpn_score_thresh: float = 0.0,
        box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
        norm: str = "frozen", norm_eps: float = 0.0) -> MaskRCNN:
    """torchvision's maskrcnn_resnet50_fpn; keyword arguments as torchvision's MaskRCNN (num_classes includes
    the background). norm/norm_eps: see the module docstring (default: the official COCO weights)."""
    return mask_rcnn(False, num_classes, min_size, max_size, image_mean, image_std, rpn_pre_nms_top_n_train,
                     rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, rpn_nms_thresh,
                     rpn_score_thresh, box_score_thresh, box_nms_thresh, box_detections_per_img, bbox_reg_weights,
                     norm, norm_eps)


def maskrcnn_resnet50_fpn_v2(
        num_classes: int = 91, min_size: int = 800, max_size: int = 1333,
        image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        image_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7, rpn_score_thresh: float = 0.0,
        box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
        norm: str = "bn", norm_eps: float = 1e-5) -> MaskRCNN:
    """torchvision's maskrcnn_resnet50_fpn_v2 (BatchNorm in backbone, FPN and heads); arguments as v1."""
    return mask_rcnn(True, num_classes, min_size, max_size, image_mean, image_std, rpn_pre_nms_top_n_train,
                     rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, rpn_nms_thresh,
                     rpn_score_thresh, box_score_thresh, box_nms_thresh, box_detections_per_img, bbox_reg_weights,
                     norm, norm_eps)
