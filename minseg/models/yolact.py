"""YOLACT (Bolya et al. 2019): real-time instance segmentation as prototypes x per-detection coefficients.

A one-stage detector (ResNet + FPN P3-P7 + one head shared across levels, 3 square priors per location)
predicts, for every prior, box offsets, class scores and 32 mask coefficients. A separate protonet turns P3
into 32 prototype masks for the whole image. After Fast NMS each detection's mask is
sigmoid(prototypes @ coefficients), cropped to its box and resized to the image.

Follows dbolya/yolact (yolact.py, layers/functions/detection.py, layers/output_utils.py,
utils/augmentations.py FastBaseTransform) at commit 902073d with its yolact_resnet50, yolact_base (ResNet-101),
yolact_im700 and yolact_darknet53 configs, in the original's float order so results are bitwise equal on CPU.

    state = minseg.convert("yolact", "yolact_resnet50_54_800000.pth", arch="yolact_resnet50")
    model = minseg.create_model("yolact_resnet50"); model.load_state_dict(state)
    (result,) = model.predict("image.jpg")   # boxes, labels (0..79), scores, masks at the image's size
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from minseg.backbones.darknet import darknet53
from minseg.backbones.resnet import resnet
from minseg.heads.yolact import PredictionHead, ProtoNet
from minseg.heads.yolact_loss import YolactLossConfig, yolact_loss
from minseg.models._inputs import check_images
from minseg.models._options import (MAX_BOXES, MAX_CLASSES, MAX_SIDE, check_bool, check_float, check_floats,
                                    check_int, set_checked)
from minseg.models._predict import inference
from minseg.necks.yolact_fpn import YolactFPN
from minseg.ops.fast_nms import cross_class_fast_nms, fast_nms
from minseg.ops.yolact_boxes import crop_masks, decode_yolact, sanitize_coordinates, yolact_priors

# FastBaseTransform's normalisation (data/config.py MEANS/STD, listed there in BGR order), here in RGB order
MEAN_RGB = (123.68, 116.78, 103.94)
STD_RGB = (58.40, 57.12, 57.38)
MASK_CHUNK = 16  # masks resized to the image size at a time in postprocess
BASE_SIZE, BASE_SCALES = 550, (24, 48, 96, 192, 384)  # yolact_base_config's max_size and pred_scales


@dataclass(frozen=True, kw_only=True)
class YolactConfig:
    """What a YOLACT variant fixes (fields without a default) and the create_model options, the original's cfg."""
    # the variant's architecture
    backbone: str                                      # "resnet50", "resnet101" (yolact_base) or "darknet53"
    scales: tuple[int, ...]                            # prior side in pixels at P3..P7 (follows max_size)
    # options
    max_size: int = BASE_SIZE                          # input side S (images resized to S x S); normalises the priors
    num_classes: int = 81                              # including background (class 0), like the original's cfg
    aspect_ratios: tuple[float, ...] = (1, 1 / 2, 2)
    num_prototypes: int = 32
    conf_thresh: float = 0.05                          # a prior is a candidate if its best class score is above this
    nms_thresh: float = 0.5                            # Fast NMS keeps IoU <= this
    top_k: int = 200                                   # candidates per class compared by Fast NMS
    max_detections: int = 100
    cross_class_nms: bool = False                      # eval.py's --cross_class_nms
    # training
    freeze_bn: bool = True                             # train.py's cfg.freeze_bn (set below 6 images per GPU)
    loss: YolactLossConfig = YolactLossConfig()        # MultiBoxLoss's thresholds, OHEM ratio, alphas

    def __post_init__(self) -> None:
        check_int("max_size", self.max_size, 64, MAX_SIDE)
        check_int("num_classes", self.num_classes, 2, MAX_CLASSES)  # background and at least one class
        set_checked(self, "aspect_ratios", check_floats("aspect_ratios", self.aspect_ratios, range(1, 9), 0.05, 20.0))
        check_int("num_prototypes", self.num_prototypes, 1, 256)
        check_float("conf_thresh", self.conf_thresh, 0.0, 1.0)
        check_float("nms_thresh", self.nms_thresh, 0.0, 1.0)
        check_int("top_k", self.top_k, 1, MAX_BOXES)
        check_int("max_detections", self.max_detections, 1, MAX_BOXES)
        check_bool("cross_class_nms", self.cross_class_nms)
        check_bool("freeze_bn", self.freeze_bn)
        if not isinstance(self.loss, YolactLossConfig):
            raise TypeError(f"loss must be a YolactLossConfig, got {type(self.loss).__name__}")
        # Fast NMS compares top_k candidates pairwise within each class: an IoU matrix of C x top_k x top_k floats
        if (self.num_classes - 1) * self.top_k ** 2 > 2**30:
            raise ValueError(f"(num_classes - 1) * top_k ** 2 must be at most 2**30 (Fast NMS's IoU matrix, 4 GB), "
                             f"got num_classes={self.num_classes}, top_k={self.top_k}")


class Yolact(nn.Module):
    """model(x: Tensor[N, 3, S, S] preprocessed) -> {"loc": Tensor[N, P, 4], "conf": Tensor[N, P, C] (softmax),
    "mask": Tensor[N, P, k] (tanh), "priors": Tensor[P, 4] (cx, cy, w, h relative), "proto": Tensor[N, S/4, S/4, k]}:
    the original's network outputs before Detect. postprocess() turns them into instances.

    In train mode "conf" holds the logits and "segm" Tensor[N, C-1, S/8, S/8] the semantic logits of P3 (the
    original's training outputs); loss() turns them into the training losses.
    """

    def __init__(self, cfg: YolactConfig, backbone: nn.Module, fpn: YolactFPN, protonet: ProtoNet, head: PredictionHead,
                 semantic: nn.Conv2d):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.fpn = fpn
        self.protonet = protonet
        self.head = head
        self.semantic = semantic  # training only: the semantic segmentation loss's 1x1 conv on P3
        if cfg.freeze_bn:
            self.freeze_batchnorm()

    def freeze_batchnorm(self) -> None:
        """Every BatchNorm2d in eval mode (running statistics) with no gradient to its affine: Yolact.freeze_bn."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> Yolact:
        """As the original's Yolact.train: with cfg.freeze_bn the BatchNorms stay frozen in train mode."""
        super().train(mode)
        if self.cfg.freeze_bn:
            self.freeze_batchnorm()
        return self

    def priors(self, sizes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """priors_cxcywh Tensor[P, 4] for FPN levels of the given (H, W) sizes (rebuilt each call: well under a
        millisecond, and a forward without Python state exports with torch.export)."""
        cfg = self.cfg
        return yolact_priors(sizes, cfg.scales, cfg.aspect_ratios, cfg.max_size, device=device)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x)
        # backbone and FPN
        c = self.backbone(x)
        levels = self.fpn(c["c3"], c["c4"], c["c5"])
        # prototypes from P3
        proto = self.protonet(levels[0])
        # shared head on every level, concatenated P3..P7
        loc, conf, mask = zip(*(self.head(p) for p in levels))
        priors = self.priors([tuple(p.shape[-2:]) for p in levels], x.device)
        out = {"loc": torch.cat(loc, 1), "conf": torch.cat(conf, 1), "mask": torch.cat(mask, 1), "priors": priors,
               "proto": proto}
        if self.training:  # logits for the loss, and the semantic head
            out["segm"] = self.semantic(levels[0])
            return out
        out["conf"] = out["conf"].float().softmax(-1)  # float32 scores even under autocast (no-op in float32)
        return out

    def loss(self, outputs: dict[str, torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Train-mode outputs + per-image targets {"boxes": Tensor[K, 4] boxes_rel, "labels": Tensor[K] (0..C-2, -1
        crowd), "masks": Tensor[K, S, S], "num_crowds": int} -> {"box", "mask", "class", "semantic"}: the original
        MultiBoxLoss's B, M, C, S as train.py reduces them (minseg/heads/yolact_loss.py)."""
        if "segm" not in outputs:
            raise ValueError("loss() needs the train-mode outputs (call model.train() before the forward)")
        # float32 as the original (no-op in float32): binary_cross_entropy refuses autocast, and OHEM ranks by the loss
        with torch.autocast(outputs["loc"].device.type, enabled=False):
            return yolact_loss({k: v.float() for k, v in outputs.items()}, targets, self.cfg.loss)

    def detect(self, outputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The original's Detect: per image, decode, keep priors whose best foreground score > conf_thresh,
        Fast NMS. -> per image {"boxes_rel": Tensor[K, 4] (x1y1x2y2 relative, unclipped), "labels": Tensor[K]
        (0..C-2), "scores": Tensor[K] (descending), "coeffs": Tensor[K, k]}.
        """
        cfg = self.cfg
        conf = outputs["conf"].transpose(2, 1)  # (N, C, P)
        detections = []
        # per image, as the original: decoding one [P, 4] at a time also keeps the CPU's vectorised exp on the
        # same element chunks as the original's, so the boxes match bitwise
        for b in range(conf.shape[0]):
            boxes = decode_yolact(outputs["loc"][b], outputs["priors"])
            scores = conf[b, 1:, :]  # (C-1, P), background dropped
            keep = torch.where(scores.max(dim=0).values > cfg.conf_thresh)[0]
            scores, boxes, coeffs = scores[:, keep], boxes[keep], outputs["mask"][b, keep]
            if cfg.cross_class_nms:
                index, labels, scores = cross_class_fast_nms(boxes, scores, cfg.nms_thresh, cfg.top_k)
            else:
                index, labels, scores = fast_nms(boxes, scores, cfg.nms_thresh, cfg.top_k, cfg.max_detections)
            detections.append({"boxes_rel": boxes[index], "labels": labels, "scores": scores, "coeffs": coeffs[index]})
        return detections

    def postprocess(self, outputs: dict[str, torch.Tensor], sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Network outputs + each image's (height, width) -> per image {"boxes": Tensor[K, 4] absolute xyxy floats,
        "labels": Tensor[K] int64 in 0..C-2, "scores": Tensor[K], "masks": Tensor[K, height, width] bool}.

        The original's layers/output_utils.py postprocess (crop on, no score threshold); its int boxes are
        these boxes truncated.
        """
        if len(sizes) != outputs["proto"].shape[0]:
            raise ValueError(f"got {len(sizes)} sizes for a batch of {outputs['proto'].shape[0]} images")
        with torch.autocast(outputs["proto"].device.type, enabled=False):  # float32 masks and boxes
            return [instances(det, proto.float(), torch.sym_int(h), torch.sym_int(w))  # (sizes may be symbolic)
                    for det, proto, (h, w) in zip(self.detect(outputs), outputs["proto"], sizes)]

    def preprocess(self, rgb) -> torch.Tensor:
        """An RGB uint8 HxWx3 image (array, PIL or path) -> Tensor[1, 3, S, S], the original's FastBaseTransform:
        bilinear resize of the 0..255 floats to S x S (no antialias, aspect not kept), then mean/std (ResNet)
        or / 255 (DarkNet).

        The original starts from cv2's BGR and flips to RGB at the end; the resize and normalisation act per
        channel, so doing them in RGB order gives the same numbers.
        """
        from minseg.image import load_rgb

        image = torch.from_numpy(np.asarray(load_rgb(rgb), dtype=np.uint8).copy())
        device = next(self.parameters()).device
        x = image.to(device).float()[None].permute(0, 3, 1, 2).contiguous()  # (1, 3, H, W)
        S = self.cfg.max_size
        x = F.interpolate(x, (S, S), mode="bilinear", align_corners=False)
        if self.cfg.backbone == "darknet53":  # darknet_transform: to_float only
            return x / 255
        mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD_RGB, device=device).view(1, 3, 1, 1)
        return (x - mean) / std

    @inference
    def predict(self, images) -> list[dict[str, torch.Tensor]]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image the postprocess() dict at the
        image's own size, as eval.py --image computes it."""
        from minseg.image import load_rgb_list

        dtype = next(self.parameters()).dtype  # a model cast with .half() gets its own dtype
        results = []
        for image in load_rgb_list(images):
            outputs = self(self.preprocess(image).to(dtype))
            results.extend(self.postprocess(outputs, [(image.height, image.width)]))
        return results


def instances(det: dict[str, torch.Tensor], proto: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    """One image's detections + prototypes Tensor[S, S, k] -> boxes, labels, scores, masks at (h, w)."""
    boxes_rel, coeffs = det["boxes_rel"].float(), det["coeffs"].float()
    K = boxes_rel.shape[0]
    if guard_or_false(K == 0):  # (unknown when exported: the general path handles no detections too)
        return {"boxes": boxes_rel.new_zeros(0, 4), "labels": det["labels"], "scores": det["scores"].float(),
                "masks": torch.zeros(0, h, w, dtype=torch.bool, device=proto.device)}
    # masks: one matmul (kept as the original's layout for bitwise parity), sigmoid, crop in prototype pixels
    masks = torch.sigmoid(proto @ coeffs.t())  # (S, S, K)
    masks = crop_masks(masks, boxes_rel)
    masks = masks.permute(2, 0, 1).contiguous()  # (K, S, S)
    # resize to the image and threshold, a few masks at a time: the same numbers as all at once (each mask is
    # resized on its own) without a [K, h, w] float tensor in memory; all at once when exported (K is data-dependent)
    chunks = [masks] if torch.compiler.is_compiling() else masks.split(MASK_CHUNK)
    masks = torch.cat([F.interpolate(chunk[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5
                       for chunk in chunks])  # (K, h, w): K masks of one channel (K may be 0)
    # boxes: to pixels, ordered, clamped to the image
    x1, x2 = sanitize_coordinates(boxes_rel[:, 0], boxes_rel[:, 2], w)
    y1, y2 = sanitize_coordinates(boxes_rel[:, 1], boxes_rel[:, 3], h)
    return {"boxes": torch.stack([x1, y1, x2, y2], 1), "labels": det["labels"], "scores": det["scores"].float(),
            "masks": masks}


BACKBONES = {
    "resnet50": lambda: resnet(50, norm="bn"),    # the torchvision layout with plain BatchNorm2d (backbone.py)
    "resnet101": lambda: resnet(101, norm="bn"),
    "darknet53": darknet53,
}


def yolact(cfg: YolactConfig) -> Yolact:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown YOLACT backbone {cfg.backbone!r}; expected one of {', '.join(BACKBONES)}")
    backbone = BACKBONES[cfg.backbone]()
    fpn = YolactFPN(tuple(backbone.out_channels[c] for c in ("c3", "c4", "c5")))
    num_anchors = len(cfg.aspect_ratios)
    head = PredictionHead(256, num_anchors, cfg.num_classes, cfg.num_prototypes)
    semantic = nn.Conv2d(256, cfg.num_classes - 1, 1)
    model = Yolact(cfg, backbone, fpn, ProtoNet(256, 256, cfg.num_prototypes), head, semantic)
    init_weights(model)
    return model


def init_weights(model: Yolact) -> None:
    """The original's Yolact.init_weights: every conv outside the backbone xavier-uniform with a zero bias (its
    focal-loss bias is off in every config); the backbone keeps torch's default init, where the original loads
    ImageNet weights."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not name.startswith("backbone."):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def sized_config(backbone: str, max_size: int, **options) -> YolactConfig:
    """A variant at input side max_size with the prior scales int(s / 550 * max_size): how the original's
    yolact_im400 and yolact_im700 configs derive from yolact_base (equal to yolact_base's scales at 550)."""
    check_int("max_size", max_size, 64, MAX_SIDE)
    scales = tuple(int(s / BASE_SIZE * max_size) for s in BASE_SCALES)
    return YolactConfig(backbone=backbone, max_size=max_size, scales=scales, **options)


def yolact_resnet50_config(*, max_size: int = 550, **options) -> YolactConfig:
    """The original's yolact_resnet50_config: ResNet-50, 550 px."""
    return sized_config("resnet50", max_size, **options)


def yolact_resnet101_config(*, max_size: int = 550, **options) -> YolactConfig:
    """The original's yolact_base_config: ResNet-101, 550 px."""
    return sized_config("resnet101", max_size, **options)


def yolact_im700_config(*, max_size: int = 700, **options) -> YolactConfig:
    """The original's yolact_im700_config: yolact_base at 700 px, prior scales int(s / 550 * 700)."""
    return sized_config("resnet101", max_size, **options)


def yolact_darknet53_config(*, max_size: int = 550, **options) -> YolactConfig:
    """The original's yolact_darknet53_config: DarkNet-53 (C3-C5 = 256/512/1024 channels), 550 px, input / 255."""
    return sized_config("darknet53", max_size, **options)
