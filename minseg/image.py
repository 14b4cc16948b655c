"""Reading user images and the originals' preprocessing, shared by every model's predict()."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 16384  # longest side accepted after a resize (a 1x2000 strip would otherwise become 520x1040000)
MAX_PIXELS = 8192 * 8192  # 67M: a 64 MP photo fits; the per-class outputs at that size already take gigabytes.
                          # A 274-byte PNG can declare 20000x20000: refused from its header, before decoding


def load_rgb(image) -> Image.Image:
    """A path, PIL image or uint8 HxWx3 array -> PIL RGB image.

    Files get their EXIF orientation applied (what a viewer shows). Grayscale, palette, CMYK and RGBA
    are converted with PIL's `convert("RGB")` (alpha dropped), as torchvision's PIL pipeline does;
    16-bit images are scaled to 8 bits by value / 257 (65535 -> 255), as OpenCV's 8-bit read does.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            with warnings.catch_warnings():  # PIL warns from 89M pixels on: refused below with one line instead
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    check_size(im.width, im.height, path)  # header only: nothing decoded yet
                    im = ImageOps.exif_transpose(im)
                    im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{path}: image too large to decode ({str(e).split(',')[0]}; minseg's limit is "
                             f"{MAX_PIXELS:,} pixels)") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{path}: not a readable image ({str(e)[:200]})") from None
        image = im
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((arr / 257).round().clip(0, 255).astype(np.uint8))
        check_size(image.width, image.height)
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
        check_size(image.shape[1], image.shape[0])
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    raise TypeError(f"expected an image path, PIL image or uint8 HxWx3 array, got {type(image).__name__}")


def check_size(width: int, height: int, where: str | os.PathLike = "image") -> None:
    """ValueError for an empty image or one of more than MAX_PIXELS pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"{where}: empty image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{where}: {width}x{height} is {width * height:,} pixels, more than the limit of "
                         f"{MAX_PIXELS:,}; downscale it first")


def load_rgb_list(images) -> list[Image.Image]:
    """One image or a list of them -> list of PIL RGB images."""
    if isinstance(images, (list, tuple)):
        return [load_rgb(im) for im in images]
    return [load_rgb(images)]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> Tensor[3, H, W] float in 0..1."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, aspect kept, PIL bilinear (torchvision's F.resize(img, [size]) on a PIL image)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    if new_long > MAX_SIDE:
        raise ValueError(f"image of {w}x{h} is too elongated: its shorter side resized to {size} makes the longer "
                         f"{new_long} px (limit {MAX_SIDE}); crop it first")
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BILINEAR)


def semantic_preprocess(image: Image.Image, resize: int) -> torch.Tensor:
    """torchvision's SemanticSegmentation transform: resize shorter side, to 0..1, ImageNet mean/std. -> Tensor[3, h, w]."""
    x = to_tensor(resize_shorter(image, resize))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std
