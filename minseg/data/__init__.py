"""Datasets for training and evaluation runs, read with numpy and PIL only.

`open_dataset(root)` recognises the layout from the folder's contents:
- semantic: `images/NAME.{jpg,png}` + `masks/NAME.png`, or Pascal VOC (`JPEGImages/`, `SegmentationClass/`,
  `ImageSets/Segmentation/SPLIT.txt`);
- instances: COCO `annotations.json` + `images/`, or `annotations/instances_SPLIT.json` + `SPLIT/`;
- panoptic: COCO `panoptic.json` + `panoptic/` + `images/`.
Every dataset has `.kind` ("semantic", "instances", "panoptic"), `.categories` ([{"id", "name", "isthing"}]),
`len()` and `ds[i] -> (image uint8 Tensor[3, H, W] RGB, target dict, {"file", "image_id"})`. Anything unusable
raises `minseg.errors.DataError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

from minseg.data.coco import CocoInstances, CocoPanoptic
from minseg.data.semantic import SemanticDataset, open_folder, open_voc
from minseg.errors import DataError

LAYOUTS = ("images/ + masks/ (semantic), Pascal VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), "
           "COCO instances (annotations.json + images/, or annotations/instances_SPLIT.json + SPLIT/), "
           "COCO panoptic (panoptic.json + panoptic/ + images/)")


def open_dataset(root: str | os.PathLike, *, split: str | None = None, num_classes: int | None = None):
    """The dataset in `root`. `split` picks the VOC list or COCO's `instances_SPLIT.json`; for the other layouts
    it names a subfolder holding one. `num_classes` (semantic only) refuses labels >= num_classes other than 255."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    if (root / "panoptic.json").is_file():
        return CocoPanoptic(root)
    if (root / "annotations.json").is_file():
        return CocoInstances(root / "annotations.json", root / "images")
    if split is not None and (root / "annotations" / f"instances_{split}.json").is_file():
        return CocoInstances(root / "annotations" / f"instances_{split}.json", root / split)
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return open_voc(root, split, num_classes)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return open_folder(root, num_classes)
    if split is not None and (root / split).is_dir():
        return open_dataset(root / split, num_classes=num_classes)
    where = f" (split {split!r})" if split is not None else ""
    raise DataError(f"{root}: not a dataset folder{where}; expected one of: {LAYOUTS}")


__all__ = ["CocoInstances", "CocoPanoptic", "DataError", "SemanticDataset", "open_dataset"]
