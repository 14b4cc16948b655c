"""Training augmentations, one function per original recipe, seeded by the caller's torch.Generator.

Every function takes (image: Tensor[3, H, W] uint8 RGB, target, g) and returns the pair transformed; the target is a
dataset target (minseg.data): per-pixel fields "mask", "sem_seg", "panoptic" (Tensor[H, W]) and "masks"
(Tensor[K, H, W]) move with the image (nearest), "boxes" (Tensor[K, 4] xyxy pixels) are mapped with it. Images
are resized with antialiased bilinear interpolation on tensors where the originals resize PIL or cv2 images; the
random draws are the originals', from `g` instead of a global generator (so a run's augmentation depends only on
its seed and each sample's place in the data order, and a resumed run sees the same images).

    segmentation_train   torchvision references/segmentation/presets.py (FCN, DeepLabV3)
    detection_train      torchvision references/detection/presets.py "hflip" (Mask R-CNN)
    shortest_edge_train  detectron2 ResizeShortestEdge + RandomFlip (Panoptic FPN)
    yolact_train         YOLACT utils/augmentations.py SSDAugmentation
    smp_crop_train       segmentation_models_pytorch's examples (U-Net): pad-if-needed, random crop, flip
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Target = dict[str, torch.Tensor]
PIXEL_FIELDS = ("mask", "sem_seg", "panoptic")  # Tensor[H, W]; "masks" is Tensor[K, H, W]


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in low..high inclusive (Python's random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=g).item())


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: image, per-pixel fields, and boxes x -> W - x."""
    W = image.shape[-1]
    target = dict(target)
    for key in (*PIXEL_FIELDS, "masks"):
        if key in target:
            target[key] = target[key].flip(-1)
    if "boxes" in target:
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([W - x1, y0, W - x0, y1], -1)
    return image.flip(-1), target


def resize(image: torch.Tensor, target: Target, size: tuple[int, int]) -> tuple[torch.Tensor, Target]:
    """Resize to size = (h, w): the image bilinearly (antialiased), per-pixel fields nearest, boxes scaled."""
    H, W = image.shape[-2:]
    h, w = size
    out = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(image.dtype)[0]
    target = dict(target)
    for key in (*PIXEL_FIELDS, "masks"):
        if key in target:
            t = target[key]
            lead = t.shape[:-2]
            flat = t.reshape(-1, 1, H, W).float()  # (K, 1, H, W)
            target[key] = F.interpolate(flat, size=(h, w), mode="nearest").to(t.dtype).reshape(*lead, h, w)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([w / W, h / H, w / W, h / H])
    return out, target


def pad_to(image: torch.Tensor, target: Target, size: tuple[int, int], fill: int = 0,
           mask_fill: int = 255) -> tuple[torch.Tensor, Target]:
    """Pad right and bottom up to at least size = (h, w): image with `fill`, "mask"/"sem_seg" with mask_fill
    (ignored), "panoptic"/"masks" with 0; boxes unchanged."""
    H, W = image.shape[-2:]
    ph, pw = max(size[0] - H, 0), max(size[1] - W, 0)
    if ph == 0 and pw == 0:
        return image, target
    target = dict(target)
    for key, value in (("mask", mask_fill), ("sem_seg", mask_fill), ("panoptic", 0), ("masks", 0)):
        if key in target:
            target[key] = F.pad(target[key], (0, pw, 0, ph), value=value)
    return F.pad(image, (0, pw, 0, ph), value=fill), target


def crop(image: torch.Tensor, target: Target, top: int, left: int, h: int, w: int) -> tuple[torch.Tensor, Target]:
    """The window [top, top+h) x [left, left+w); boxes shifted and clipped to it."""
    target = dict(target)
    for key in (*PIXEL_FIELDS, "masks"):
        if key in target:
            target[key] = target[key][..., top:top + h, left:left + w]
    if "boxes" in target:
        shifted = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        xs, ys = shifted[:, 0::2].clamp(0, w), shifted[:, 1::2].clamp(0, h)  # (K, 2) each
        target["boxes"] = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], -1)
    return image[:, top:top + h, left:left + w], target


def resize_shorter(image: torch.Tensor, target: Target, short: int, max_size: int | None = None
                   ) -> tuple[torch.Tensor, Target]:
    """Resize so the shorter side is `short` (longer side at most max_size), rounding as detectron2's
    ResizeShortestEdge.get_output_shape (int(x + 0.5))."""
    H, W = image.shape[-2:]
    scale = short / min(H, W)
    if max_size is not None and max(H, W) * scale > max_size:
        scale = max_size / max(H, W)
    return resize(image, target, (int(H * scale + 0.5), int(W * scale + 0.5)))


def random_crop(image: torch.Tensor, target: Target, g: torch.Generator, crop_size: int
                ) -> tuple[torch.Tensor, Target]:
    """A crop_size x crop_size window at a random place (top drawn before left), after padding a smaller image
    with 0 (and its mask with 255, ignored)."""
    image, target = pad_to(image, target, (crop_size, crop_size))
    H, W = image.shape[-2:]
    top, left = _randint(g, 0, H - crop_size), _randint(g, 0, W - crop_size)
    return crop(image, target, top, left, crop_size, crop_size)


def segmentation_train(image: torch.Tensor, target: Target, g: torch.Generator, *, base_size: int = 520,
                       crop_size: int = 480) -> tuple[torch.Tensor, Target]:
    """torchvision references/segmentation/presets.py SegmentationPresetTrain: RandomResize(0.5 * base_size,
    2.0 * base_size) of the shorter side, RandomHorizontalFlip(0.5), RandomCrop(crop_size) padded with 0 in the
    image and 255 (ignored) in the mask when smaller."""
    short = _randint(g, int(0.5 * base_size), int(2.0 * base_size))
    image, target = resize_shorter(image, target, short)
    if _uniform(g) < 0.5:
        image, target = hflip(image, target)
    return random_crop(image, target, g, crop_size)


def detection_train(image: torch.Tensor, target: Target, g: torch.Generator) -> tuple[torch.Tensor, Target]:
    """torchvision references/detection/presets.py DetectionPresetTrain(data_augmentation="hflip"):
    RandomHorizontalFlip(0.5); the model resizes (min_size 800, max_size 1333) itself."""
    if _uniform(g) < 0.5:
        image, target = hflip(image, target)
    return image, target


DETECTRON2_TRAIN_SIZES = (640, 672, 704, 736, 768, 800)  # panoptic_fpn_R_*_3x: INPUT.MIN_SIZE_TRAIN, "choice"


def shortest_edge_train(image: torch.Tensor, target: Target, g: torch.Generator, *,
                        sizes: tuple[int, ...] = DETECTRON2_TRAIN_SIZES, max_size: int = 1333
                        ) -> tuple[torch.Tensor, Target]:
    """detectron2 data/detection_utils.build_augmentation for training: ResizeShortestEdge(sizes, max_size,
    "choice") then RandomFlip(0.5, horizontal)."""
    image, target = resize_shorter(image, target, sizes[_randint(g, 0, len(sizes) - 1)], max_size)
    if _uniform(g) < 0.5:
        image, target = hflip(image, target)
    return image, target


def smp_crop_train(image: torch.Tensor, target: Target, g: torch.Generator, *, crop_size: int = 320
                   ) -> tuple[torch.Tensor, Target]:
    """segmentation_models_pytorch's example training augmentation (albumentations): HorizontalFlip(0.5),
    PadIfNeeded(crop_size) and RandomCrop(crop_size); the scale/rotate and colour jitter of the examples are
    left out. Padding uses 0 in the image and 255 (ignored) in the mask."""
    if _uniform(g) < 0.5:
        image, target = hflip(image, target)
    return random_crop(image, target, g, crop_size)


# -- YOLACT ---------------------------------------------------------------------------------------------------
YOLACT_MEAN_RGB = (123.68, 116.78, 103.94)  # the original's MEANS (103.94, 116.78, 123.68) are BGR


def _photometric_distort(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """YOLACT PhotometricDistort on float 0..255 RGB: brightness +-32, then contrast 0.5..1.5 before or after
    saturation 0.5..1.5 and hue +-18 degrees (each with probability 1/2); the original's random channel swap
    is skipped, as its RandomLightingNoise leaves the image unchanged in every YOLACT config."""
    if _uniform(g) < 0.5:
        x = x + _uniform(g, -32, 32)
    contrast_first = _uniform(g) < 0.5
    if contrast_first and _uniform(g) < 0.5:
        x = x * _uniform(g, 0.5, 1.5)
    hsv = _rgb_to_hsv(x.clamp(0, 255) / 255)
    if _uniform(g) < 0.5:
        hsv[1] = hsv[1] * _uniform(g, 0.5, 1.5)
    if _uniform(g) < 0.5:
        hsv[0] = (hsv[0] + _uniform(g, -18, 18) / 360) % 1.0
    x = _hsv_to_rgb(hsv.clamp(0, 1)) * 255
    if not contrast_first and _uniform(g) < 0.5:
        x = x * _uniform(g, 0.5, 1.5)
    return x.clamp(0, 255)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, gr, b = rgb.unbind(0)
    v, _ = rgb.max(0)
    c = v - rgb.min(0).values
    s = torch.where(v > 0, c / v.clamp(min=1e-12), torch.zeros_like(v))
    safe = c.clamp(min=1e-12)
    h = torch.where(v == r, ((gr - b) / safe) % 6, torch.where(v == gr, (b - r) / safe + 2, (r - gr) / safe + 4))
    return torch.stack([torch.where(c > 0, h / 6, torch.zeros_like(h)), s, v])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(0)
    k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + h * 6) % 6  # (3, H, W)
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _expand(x: torch.Tensor, target: Target, g: torch.Generator) -> tuple[torch.Tensor, Target]:
    """YOLACT Expand: with probability 1/2 place the image at a random spot of a canvas up to 4x as large,
    filled with the mean colour."""
    if _uniform(g) < 0.5:
        return x, target
    H, W = x.shape[-2:]
    ratio = _uniform(g, 1, 4)
    left, top = int(_uniform(g, 0, W * ratio - W)), int(_uniform(g, 0, H * ratio - H))
    h, w = int(H * ratio), int(W * ratio)
    canvas = torch.tensor(YOLACT_MEAN_RGB).view(3, 1, 1).expand(3, h, w).clone()
    canvas[:, top:top + H, left:left + W] = x
    masks = torch.zeros((target["masks"].shape[0], h, w), dtype=target["masks"].dtype)
    masks[:, top:top + H, left:left + W] = target["masks"]
    boxes = target["boxes"] + torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
    return canvas, {**target, "masks": masks, "boxes": boxes}


SAMPLE_OPTIONS = (None, (0.1, None), (0.3, None), (0.7, None), (0.9, None), (None, None))  # (min IoU, max IoU)


def _random_sample_crop(x: torch.Tensor, target: Target, g: torch.Generator) -> tuple[torch.Tensor, Target]:
    """YOLACT RandomSampleCrop (SSD's): pick a mode (keep, or a minimum IoU), then up to 50 tries of a window
    0.3..1 of each side with aspect 0.5..2 whose IoU with some box meets the mode and that holds at least one
    box centre; boxes whose centre falls outside are dropped (a crop that would keep only crowds is refused)."""
    from minseg.ops import box_iou

    H, W = x.shape[-2:]
    boxes = target["boxes"]
    while True:
        mode = SAMPLE_OPTIONS[_randint(g, 0, len(SAMPLE_OPTIONS) - 1)]
        if mode is None or len(boxes) == 0:
            return x, target
        min_iou = -math.inf if mode[0] is None else mode[0]
        max_iou = math.inf if mode[1] is None else mode[1]
        for _ in range(50):
            w, h = _uniform(g, 0.3 * W, W), _uniform(g, 0.3 * H, H)
            if h / w < 0.5 or h / w > 2:
                continue
            left, top = _uniform(g, 0, W - w), _uniform(g, 0, H - h)
            rect = torch.tensor([[int(left), int(top), int(left + w), int(top + h)]], dtype=boxes.dtype)
            overlap = box_iou(boxes, rect)[:, 0]
            if overlap.max() < min_iou or overlap.min() > max_iou:  # no box overlaps the window as the mode asks
                continue
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            keep = ((centers > rect[0, :2]) & (centers < rect[0, 2:])).all(1)
            crowd = target["iscrowd"]
            if not keep.any() or (keep & ~crowd).sum() == 0:
                continue
            t = {**target, "boxes": boxes[keep], "category_ids": target["category_ids"][keep],
                 "masks": target["masks"][keep], "iscrowd": crowd[keep]}
            x0, y0, x1, y1 = (int(v) for v in rect[0].tolist())
            return crop(x, t, y0, x0, y1 - y0, x1 - x0)


def yolact_train(image: torch.Tensor, target: Target, g: torch.Generator, *, size: int = 550
                 ) -> tuple[torch.Tensor, Target]:
    """YOLACT utils/augmentations.py SSDAugmentation (augment_photometric_distort, augment_expand,
    augment_random_sample_crop, augment_random_mirror all on, as yolact_base_config): photometric distortion,
    expand, random sample crop, mirror, then Resize to size x size (aspect not kept; masks bilinear then > 0.5 as
    the original's cv2 resize of 0/1 masks, degenerate boxes dropped). Returns the image as
    float 0..255 RGB Tensor[3, size, size] (normalisation is the model's preprocessing) and its target."""
    x = _photometric_distort(image.float(), g)
    x, target = _expand(x, target, g)
    x, target = _random_sample_crop(x, target, g)
    if _uniform(g) < 0.5:
        x, target = hflip(x, target)
    H, W = x.shape[-2:]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    masks = target["masks"]
    masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    boxes = target["boxes"] * torch.tensor([size / W, size / H, size / W, size / H])
    # kept: the original's Resize compares these pixel sides with discard_box_width/height = 4 / 550 (meant as a
    # fraction of the image), so it drops only boxes under 4/550 of a pixel, at any max_size
    keep = ((boxes[:, 2] - boxes[:, 0]) > 4 / 550) & ((boxes[:, 3] - boxes[:, 1]) > 4 / 550)
    return x, {**target, "masks": (masks[keep] > 0.5).to(torch.uint8), "boxes": boxes[keep],
               "category_ids": target["category_ids"][keep], "iscrowd": target["iscrowd"][keep]}
