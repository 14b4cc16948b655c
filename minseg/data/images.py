"""Reading a dataset's image and label files, every failure a DataError naming the file."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from minseg.errors import DataError
from minseg.image import MAX_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DataError(f"{path}: image of {im.width}x{im.height} is larger than {MAX_PIXELS:,} pixels")
                im.load()
                return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable image ({str(e)[:200]})") from None


def read_rgb(path: Path) -> torch.Tensor:
    """uint8 Tensor[3, H, W] RGB, as torchvision's references read images (PIL convert("RGB"), no EXIF rotation,
    which the masks do not get either)."""
    rgb = np.asarray(_open(path).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def read_label_png(path: Path) -> np.ndarray:
    """A one-channel PNG (mode L or P: the palette index, as Pascal VOC stores classes) -> int64 [H, W]."""
    im = _open(path)
    if im.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"{path}: a class mask must have one channel (mode L or P), this one is mode {im.mode}")
    return np.asarray(im).astype(np.int64)


def read_panoptic_png(path: Path) -> np.ndarray:
    """COCO panoptic PNG -> int64 [H, W] segment ids, id = R + 256 G + 256^2 B (panopticapi's rgb2id)."""
    rgb = np.asarray(_open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable json ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a json object, got {type(data).__name__}")
    return data


def check_same_size(image: torch.Tensor, label: np.ndarray, label_path: Path, image_path: Path) -> None:
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise DataError(f"{label_path}: {label.shape[1]}x{label.shape[0]}, but its image {image_path.name} is "
                        f"{image.shape[2]}x{image.shape[1]}")


def find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None
