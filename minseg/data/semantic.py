"""Semantic segmentation datasets: an images/ + masks/ folder, and Pascal VOC.

An item is (image uint8 Tensor[3, H, W] RGB, {"mask": int64 Tensor[H, W]} with 255 = ignore, info). The mask
holds a class index per pixel, as torchvision's segmentation reference reads VOC (the PNG's palette index).
"""
from __future__ import annotations

from pathlib import Path

import torch

from minseg.data.classes import VOC_CLASSES
from minseg.data.images import IMAGE_SUFFIXES, check_same_size, find_image, read_label_png, read_rgb
from minseg.errors import DataError

IGNORE = 255


class SemanticDataset:
    """Pairs (image file, mask file); `num_classes`, when known, bounds the labels (other than 255)."""

    kind = "semantic"

    def __init__(self, pairs: list[tuple[Path, Path]], categories: list[dict], num_classes: int | None):
        self.pairs, self.categories, self.num_classes = pairs, categories, num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict, dict]:
        image_path, mask_path = self.pairs[i]
        image = read_rgb(image_path)
        mask = read_label_png(mask_path)
        check_same_size(image, mask, mask_path, image_path)
        if self.num_classes is not None:
            bad = (mask >= self.num_classes) & (mask != IGNORE)
            if bad.any():
                raise DataError(f"{mask_path}: label {int(mask[bad].max())} >= num_classes {self.num_classes} "
                                f"(only 0..{self.num_classes - 1} and {IGNORE} = ignore are allowed)")
        return image, {"mask": torch.from_numpy(mask)}, {"file": str(image_path), "image_id": image_path.stem}


def _categories(names: list[str]) -> list[dict]:
    return [{"id": i, "name": name, "isthing": 0} for i, name in enumerate(names)]


def open_folder(root: Path, num_classes: int | None) -> SemanticDataset:
    """`images/NAME.{jpg,png}` with `masks/NAME.png`; an optional `classes.txt` names the classes, one a line."""
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{root / 'images'}: no .jpg or .png images")
    pairs = []
    for image in images:
        mask = root / "masks" / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{image}: no mask {mask}")
        pairs.append((image, mask))
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        names = [f"class {i}" for i in range(num_classes or 0)]
    if num_classes is not None and names and len(names) != num_classes:
        raise DataError(f"{names_file}: names {len(names)} classes, the model has {num_classes}")
    return SemanticDataset(pairs, _categories(names), num_classes if num_classes is not None else len(names) or None)


def open_voc(root: Path, split: str | None, num_classes: int | None) -> SemanticDataset:
    """Pascal VOC: `ImageSets/Segmentation/SPLIT.txt` lists the names, `JPEGImages/NAME.jpg` and
    `SegmentationClass/NAME.png` (palette PNG, 255 on object borders) hold image and mask. Default split: val."""
    split = split or "val"
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: no such split file (--split names ImageSets/Segmentation/SPLIT.txt)")
    pairs = []
    for name in listing.read_text().split():
        image = find_image(root / "JPEGImages", name)
        mask = root / "SegmentationClass" / f"{name}.png"
        if image is None:
            raise DataError(f"{listing}: lists {name}, but JPEGImages/{name}.jpg does not exist")
        if not mask.is_file():
            raise DataError(f"{image}: no mask {mask}")
        pairs.append((image, mask))
    if not pairs:
        raise DataError(f"{listing}: lists no images")
    return SemanticDataset(pairs, _categories(VOC_CLASSES), num_classes or len(VOC_CLASSES))
