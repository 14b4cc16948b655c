"""A dataset's category ids <-> a model's label space, per family.

- torchvision Mask R-CNN: labels are the category ids themselves (COCO's 1..90 with gaps; 0 is background), as
  torchvision's detection reference trains and evaluates on COCO.
- detectron2 (Panoptic FPN) and YOLACT: thing categories numbered 0..T-1 in increasing id order (on COCO, 0..79),
  as detectron2's `thing_dataset_id_to_contiguous_id` (built from the sorted ids) and YOLACT's `COCO_LABEL_MAP`.
  Panoptic FPN's semantic head numbers the stuff categories 1..S in increasing id order, 0 being every thing
  (prepare_panoptic_fpn.py).
- YOLACT's training targets give crowds the label -1 (its COCODetection: `category_id = -1` for iscrowd).
- semantic models: the mask's class index is the label.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def family(model_name: str) -> str:
    """"torchvision", "detectron2", "yolact" or "semantic"."""
    if model_name.startswith("maskrcnn"):
        return "torchvision"
    if model_name.startswith("panoptic_fpn"):
        return "detectron2"
    if model_name.startswith("yolact"):
        return "yolact"
    return "semantic"


@dataclass(frozen=True)
class LabelMap:
    family: str
    thing_ids: tuple[int, ...]   # contiguous label -> dataset category id (detectron2, YOLACT)
    stuff_ids: tuple[int, ...]   # semantic-head label s in 1..S -> stuff_ids[s - 1] (detectron2)

    def to_labels(self, category_ids: torch.Tensor, iscrowd: torch.Tensor | None = None) -> torch.Tensor:
        """int64 Tensor[K] of dataset category ids -> the model's labels (YOLACT: -1 where iscrowd)."""
        if self.family in ("torchvision", "semantic"):
            return category_ids.clone()
        index = {cid: label for label, cid in enumerate(self.thing_ids)}
        unknown = [c for c in category_ids.tolist() if c not in index]
        if unknown:
            raise ValueError(f"category id {unknown[0]} is not a thing category of this dataset")
        labels = torch.tensor([index[c] for c in category_ids.tolist()], dtype=torch.int64)
        if self.family == "yolact" and iscrowd is not None:
            labels[iscrowd.bool()] = -1
        return labels

    def thing_category(self, label: int) -> int:
        """A model's thing label -> the dataset's category id."""
        if self.family in ("torchvision", "semantic"):
            return int(label)
        return self.thing_ids[label]

    def stuff_category(self, label: int) -> int:
        """Panoptic FPN's semantic label (1..S) -> the dataset's stuff category id."""
        return self.stuff_ids[label - 1]


def label_map(model_name: str, categories: list[dict]) -> LabelMap:
    """The label mapping between `model_name`'s family and a dataset's `categories` ([{"id", "isthing"}])."""
    things = tuple(sorted(c["id"] for c in categories if c.get("isthing", 1)))
    stuff = tuple(sorted(c["id"] for c in categories if not c.get("isthing", 1)))
    return LabelMap(family(model_name), things, stuff)
