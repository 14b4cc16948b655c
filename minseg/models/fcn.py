"""FCN (Long et al. 2015) on a dilated ResNet, as torchvision.models.segmentation builds it.

The backbone keeps stride 8 (layer3 and layer4 dilated); a 3x3 conv head predicts classes at 1/8 and the
logits are bilinearly upsampled to the input size. An optional auxiliary head on c4 (`aux_loss=True`)
gives a second prediction used as a training loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minseg.backbones.resnet import ResNet, resnet
from minseg.models._inputs import check_images
from minseg.models._options import MAX_CLASSES, check_bool, check_int
from minseg.models._predict import inference
from minseg.ops.layers import ConvNormAct


class FCNHead(nn.Module):
    """3x3 conv-BN-ReLU to cin/4 channels, dropout 0.1, 1x1 conv to classes (torchvision's FCNHead)."""

    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.block = ConvNormAct(cin, cin // 4, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(cin // 4, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))


class SegmentationNet(nn.Module):
    """backbone -> head on c5 (and aux_head on c4) -> bilinear upsampling to the input size.

    model(x: Tensor[N, 3, H, W]) -> {"out": Tensor[N, C, H, W]} (+ "aux" when built with an aux head).
    """

    def __init__(self, backbone: ResNet, head: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x)
        N, C, H, W = x.shape
        features = self.backbone(x)
        out = {"out": F.interpolate(self.head(features["c5"]), size=(H, W), mode="bilinear", align_corners=False)}
        if self.aux_head is not None:
            out["aux"] = F.interpolate(self.aux_head(features["c4"]), size=(H, W), mode="bilinear", align_corners=False)
        return out

    @inference
    def predict(self, images) -> list[dict[str, torch.Tensor]]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image {"labels": Tensor[H, W] int64,
        "probs": Tensor[C, H, W]} at the image's own size, with torchvision's preprocessing (shorter side 520)."""
        from minseg.image import load_rgb_list, semantic_preprocess

        outputs = []
        for image in load_rgb_list(images):
            x = semantic_preprocess(image, 520).to(next(self.parameters()).device)
            logits = self(x[None])["out"]
            logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
            probs = logits.softmax(0)
            outputs.append({"labels": probs.argmax(0), "probs": probs})
        return outputs


@dataclass(frozen=True, kw_only=True)
class SegmentationConfig:
    """What an FCN or DeepLabV3 variant fixes (its ResNet depth) and the create_model options, torchvision's."""
    depth: int                       # ResNet depth, 50 or 101
    num_classes: int = 21            # Pascal VOC's 20 classes + background, as torchvision's COCO-trained weights
    aux_loss: bool = False           # an FCN head on c4 too, output "aux" (a training loss)

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, 1, MAX_CLASSES)
        check_bool("aux_loss", self.aux_loss)


def fcn_backbone(depth: int, aux_loss: bool) -> ResNet:
    """Stride-8 ResNet returning c5 (and c4 for the aux head) only: the others are freed as the forward goes."""
    keep = ("c4", "c5") if aux_loss else ("c5",)
    return resnet(depth, replace_stride_with_dilation=(False, True, True), out_features=keep)


def fcn(cfg: SegmentationConfig) -> SegmentationNet:
    aux = FCNHead(1024, cfg.num_classes) if cfg.aux_loss else None
    return SegmentationNet(fcn_backbone(cfg.depth, cfg.aux_loss), FCNHead(2048, cfg.num_classes), aux)


def fcn_resnet50_config(**options) -> SegmentationConfig:
    return SegmentationConfig(depth=50, **options)


def fcn_resnet101_config(**options) -> SegmentationConfig:
    return SegmentationConfig(depth=101, **options)
