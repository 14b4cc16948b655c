"""U-Net (Ronneberger et al. 2015) on a ResNet-34 encoder, as segmentation_models_pytorch builds it (smp.Unet).

The encoder is minseg's shared ResNet (plain BatchNorm) returning features at strides 2..32 (c1..c5).
The decoder walks back up: each of its five blocks upsamples by nearest-neighbour interpolation to the
size of the next-finer feature map, concatenates that map (the skip connection), and applies two
3x3 conv-BN-ReLU. The last block has no skip and upsamples to the input size. A 3x3 conv (with bias)
maps the 16 channels of the last block to class logits.

Input sizes: like smp.Unet (smp 0.6, whose Unet sets requires_divisible_input_shape = False), any H, W
is accepted. Each block interpolates to the skip's exact size, so for H, W not divisible by 32 the
decoder still lines up (nearest sampling of a floor-rounded grid); the result equals smp's on every size.

predict() uses smp's ImageNet preprocessing (RGB in 0..1, ImageNet mean/std, as
smp.encoders.get_preprocessing_fn("resnet34") gives) at the image's own size: neither padding nor
resizing is needed, since the network accepts every size and returns logits at the input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minseg.backbones.resnet import ResNet, resnet
from minseg.models._inputs import check_images
from minseg.models._options import MAX_CLASSES, check_int
from minseg.models._predict import inference
from minseg.ops.layers import ConvNormAct

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Module):
    """Upsample (nearest) to the skip's size, concatenate the skip, two 3x3 conv-BN-ReLU.

    smp decoders/unet/decoder.py UnetDecoderBlock, without its optional attention (Identity by default).
    """

    def __init__(self, cin: int, skip_channels: int, cout: int):
        super().__init__()
        self.conv1 = ConvNormAct(cin + skip_channels, cout, 3)
        self.conv2 = ConvNormAct(cout, cout, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int], skip: torch.Tensor | None = None) -> torch.Tensor:
        """x: Tensor[N, cin, h, w], skip: Tensor[N, skip_channels, H, W] or None -> Tensor[N, cout, H, W] (H, W = size)."""
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (N, cin + skip_channels, H, W)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """Features coarse to fine [c5, c4, c3, c2, c1] -> Tensor[N, decoder_channels[-1], H, W] at the input size.

    Block i takes the previous block's output (c5 for the first), upsamples it to the size of the next-finer
    feature and concatenates that feature; the last block has no skip and upsamples to the input size.
    """

    def __init__(self, encoder_channels: tuple[int, ...], decoder_channels: tuple[int, ...] = DECODER_CHANNELS):
        super().__init__()
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"need one decoder width per encoder feature ({len(encoder_channels)}), "
                             f"got {len(decoder_channels)}: {decoder_channels}")
        ins = (encoder_channels[0],) + tuple(decoder_channels[:-1])
        skips = tuple(encoder_channels[1:]) + (0,)
        self.blocks = nn.ModuleList(DecoderBlock(cin, skip, cout) for cin, skip, cout in zip(ins, skips, decoder_channels))

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x, skips = features[0], features[1:]
        sizes = [tuple(f.shape[-2:]) for f in skips] + [tuple(size)]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i], skips[i] if i < len(skips) else None)
        return x


class UNet(nn.Module):
    """backbone (ResNet) -> U-Net decoder over c5..c1 -> 3x3 conv classifier.

    model(x: Tensor[N, in_channels, H, W]) -> logits Tensor[N, num_classes, H, W] (smp.Unet's output, no activation).
    """

    def __init__(self, backbone: ResNet, decoder: UNetDecoder, classifier: nn.Conv2d):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.backbone.cfg.in_channels)
        N, C, H, W = x.shape
        if H == 0 or W == 0:
            raise ValueError(f"empty image batch of size {H}x{W}")
        # encoder: features at strides 2, 4, 8, 16, 32
        f = self.backbone(x)
        # decoder: coarse to fine with skip connections, back to H x W
        y = self.decoder([f["c5"], f["c4"], f["c3"], f["c2"], f["c1"]], (H, W))
        # head: per-pixel class logits
        return self.classifier(y)

    @inference
    def predict(self, images) -> list[dict[str, torch.Tensor]]:
        """RGB images (paths, PIL, uint8 HxWx3 arrays; one or a list) -> per image {"labels": Tensor[H, W] int64,
        "probs": Tensor[C, H, W]} at the image's own size.

        Preprocessing is smp's for ImageNet encoders (0..1, ImageNet mean/std) at the image's own size.
        With num_classes == 1 (smp's default, binary segmentation) probs is the sigmoid and labels is
        probs > 0.5 (0 background, 1 foreground); otherwise probs is the softmax and labels its argmax.
        """
        from minseg.image import IMAGENET_MEAN, IMAGENET_STD, load_rgb_list, to_tensor

        if self.backbone.cfg.in_channels != 3:
            raise ValueError(f"predict() takes RGB images; this model expects {self.backbone.cfg.in_channels} "
                             "input channels: call it on a preprocessed Tensor[N, C, H, W] instead")
        device = next(self.parameters()).device
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
        outputs = []
        for image in load_rgb_list(images):
            x = (to_tensor(image).to(device) - mean) / std
            logits = self(x[None])[0].float()
            if logits.shape[0] == 1:
                probs = logits.sigmoid()
                labels = (probs[0] > 0.5).long()
            else:
                probs = logits.softmax(0)
                labels = probs.argmax(0)
            outputs.append({"labels": labels, "probs": probs})
        return outputs


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """What a U-Net variant fixes (its ResNet encoder's depth) and the create_model options, smp.Unet's."""
    depth: int                       # ResNet encoder depth
    num_classes: int = 1             # smp's default: one output channel (binary segmentation)
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, 1, MAX_CLASSES)
        check_int("in_channels", self.in_channels, 1, 1024)


def unet(cfg: UNetConfig) -> UNet:
    backbone = resnet(cfg.depth, norm="bn", in_channels=cfg.in_channels)
    c = backbone.out_channels
    decoder = UNetDecoder((c["c5"], c["c4"], c["c3"], c["c2"], c["c1"]), DECODER_CHANNELS)
    return UNet(backbone, decoder, nn.Conv2d(DECODER_CHANNELS[-1], cfg.num_classes, 3, padding=1))


def unet_resnet34_config(**options) -> UNetConfig:
    """smp.Unet("resnet34")."""
    return UNetConfig(depth=34, **options)
