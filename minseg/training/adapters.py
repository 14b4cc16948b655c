"""From dataset samples to each family's training call (CONTRACT.md "Training"), one adapter per family.

An adapter knows three things about its family: which augmentation recipe its original trains with
(minseg.data.transforms), the labels its model needs (minseg.data.labels), and how a batch of
(image, target) pairs becomes the family's loss dict:

    semantic (fcn_*, deeplabv3_*)  model(x) -> segmentation_loss: torchvision's criterion (CE + 0.5 * aux CE)
    unet_resnet34                  model(x) -> smp DiceLoss (multiclass, or binary with one class): the loss of
                                   smp's own training examples
    maskrcnn_*                     model(images 0..1, targets with labels 1..K) -> torchvision's five losses
    panoptic_fpn_*                 model(batch of BGR 0..255 dicts with "instances" and "sem_seg") -> detectron2's
    yolact_*                       out = model(x); model.loss(out, targets) with relative boxes, S x S masks and
                                   crowds last (labels -1)
Crowd objects are dropped where the original's mapper drops them (torchvision's ConvertCocoPolysToMask,
detectron2's DatasetMapper) and kept as crowds for YOLACT (its COCODetection puts them last).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from minseg.data import transforms as T
from minseg.data.labels import LabelMap
from minseg.image import IMAGENET_MEAN, IMAGENET_STD

Sample = tuple[torch.Tensor, dict]


def family_of(name: str) -> str:
    for prefix, family in (("fcn_", "semantic"), ("deeplabv3_", "semantic"), ("unet_", "unet"),
                           ("maskrcnn_", "maskrcnn"), ("yolact_", "yolact"), ("panoptic_fpn_", "panoptic_fpn")):
        if name.startswith(prefix):
            return family
    raise ValueError(f"{name}: no training recipe for this model")


DATASET_KIND = {"semantic": "semantic", "unet": "semantic", "maskrcnn": "instances", "yolact": "instances",
                "panoptic_fpn": "panoptic"}


def classes_needed(family: str, categories: list[dict]) -> int:
    """The num_classes a model needs for this dataset's categories (minseg.data.labels numbers them): semantic
    classes as listed, the largest category id + 1 for torchvision detection (its labels are the ids, 0 being
    background), the thing categories + 1 for YOLACT (its num_classes counts the background, as the original's
    cfg) and the thing categories for detectron2 (whose box head adds the background itself)."""
    things = [c["id"] for c in categories if c.get("isthing", 1)]
    if family in ("semantic", "unet"):
        return len(categories)
    if family == "maskrcnn":
        return max(things, default=0) + 1
    return len(things) + (family == "yolact")


def trains_on(family: str, objects: list[dict]) -> bool:
    """Whether an image with these COCO annotations (CocoInstances / CocoPanoptic .objects) joins the training set,
    by the filter each original applies to its own:
      maskrcnn_*      an annotation, crowds included, whose box is over 1 pixel both ways (torchvision's
                      references/detection/coco_utils.py, _coco_remove_images_without_annotations)
      panoptic_fpn_*  a thing that is not a crowd (detectron2 data/build.py, filter_images_with_only_crowd_annotations
                      under DATALOADER.FILTER_EMPTY_ANNOTATIONS, its default)
      yolact_*        any annotation (its data/coco.py trains on coco.imgToAnns's image ids)
    The semantic families train on every image."""
    if family == "maskrcnn":
        return any(o["bbox"][2] > 1 and o["bbox"][3] > 1 for o in objects)
    if family == "panoptic_fpn":
        return any(not o.get("iscrowd", 0) for o in objects)
    if family == "yolact":
        return len(objects) > 0
    return True


@dataclass
class Recipe:
    """image_size: the recipe's base size (segmentation base / crop, U-Net crop, YOLACT's square); 0: none."""
    family: str
    labels: LabelMap
    num_classes: int
    augment: bool
    image_size: int


def augment(recipe: Recipe, image: torch.Tensor, target: dict, g: torch.Generator) -> Sample:
    """The family's training augmentation (its original's recipe), or none with augment=False."""
    f, size = recipe.family, recipe.image_size
    if f == "yolact":  # resizing to the square input is part of the model's input, not an augmentation
        if recipe.augment:
            return T.yolact_train(image, target, g, size=size)
        image, target = T.resize(image, target, (size, size))
        return image.float(), target
    if not recipe.augment:
        return image, target
    if f == "semantic":
        return T.segmentation_train(image, target, g, base_size=size, crop_size=round(size * 480 / 520))
    if f == "unet":
        return T.smp_crop_train(image, target, g, crop_size=size)
    if f == "maskrcnn":
        return T.detection_train(image, target, g)
    scale = size / 800  # --image-size scales detectron2's train sizes (640..800, max 1333) alike
    return T.shortest_edge_train(image, target, g, sizes=tuple(round(x * scale) for x in T.DETECTRON2_TRAIN_SIZES),
                                 max_size=round(1333 * scale))


def _normalize(images: list[torch.Tensor]) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return torch.stack([(im.float() / 255 - mean) / std for im in images])  # (N, 3, H, W)


def _things(recipe: Recipe, target: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(which objects are not crowds, every object's model label: YOLACT's is -1 for a crowd)."""
    return ~target["iscrowd"], recipe.labels.to_labels(target["category_ids"], target["iscrowd"])


def semantic_loss(model, recipe: Recipe, batch: list[Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """torchvision references/segmentation/train.py criterion: CE on "out" + 0.5 CE on "aux", 255 ignored."""
    from minseg.losses import segmentation_loss

    x = _normalize([im for im, _ in batch]).to(device)
    mask = torch.stack([t["mask"] for _, t in batch]).to(device)
    return {"loss": segmentation_loss(model(x), mask)}


def unet_loss(model, recipe: Recipe, batch: list[Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """smp's examples: DiceLoss(from_logits) on the logits, multiclass (binary: foreground = any class > 0),
    255 ignored."""
    from minseg.losses import DiceLoss

    x = _normalize([im for im, _ in batch]).to(device)
    mask = torch.stack([t["mask"] for _, t in batch]).to(device)
    if recipe.num_classes == 1:
        target = torch.where(mask == 255, mask, (mask > 0).long())
        return {"dice": DiceLoss("binary", from_logits=True, ignore_index=255)(model(x), target)}
    return {"dice": DiceLoss("multiclass", from_logits=True, ignore_index=255)(model(x), mask)}


def maskrcnn_loss(model, recipe: Recipe, batch: list[Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """torchvision references/detection: images as 0..1 floats, crowds dropped, labels 1..K."""
    images, targets = [], []
    for image, t in batch:
        keep, labels = _things(recipe, t)
        images.append((image.float() / 255).to(device))
        targets.append({"boxes": t["boxes"][keep].float().to(device), "labels": labels[keep].to(device),
                        "masks": t["masks"][keep].to(torch.uint8).to(device)})
    return model(images, targets)


def panoptic_fpn_loss(model, recipe: Recipe, batch: list[Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """detectron2 DatasetMapper: BGR 0..255 floats, crowds dropped, labels 0..K-1, the dataset's sem_seg target
    (0 things, 1..53 stuff, 255 ignore)."""
    entries = []
    for image, t in batch:
        keep, labels = _things(recipe, t)
        H, W = image.shape[-2:]
        entries.append({"image": image.flip(0).float().to(device), "height": H, "width": W,
                        "instances": {"boxes": t["boxes"][keep].float().to(device), "labels": labels[keep].to(device),
                                      "masks": t["masks"][keep].bool().to(device)},
                        "sem_seg": t["sem_seg"].long().to(device)})
    return model(entries)


def yolact_loss(model, recipe: Recipe, batch: list[Sample], device: torch.device) -> dict[str, torch.Tensor]:
    """YOLACT train.py: the augmented S x S image normalised as the model's preprocess (SSDAugmentation's
    BackboneTransform: mean/std for ResNet, / 255 for DarkNet), boxes relative to it, crowds last with label -1
    (data/coco.py COCODetection)."""
    from minseg.models.yolact import MEAN_RGB, STD_RGB

    S = recipe.image_size
    mean, std = torch.tensor(MEAN_RGB).view(3, 1, 1), torch.tensor(STD_RGB).view(3, 1, 1)
    if getattr(model, "module", model).cfg.backbone == "darknet53":  # (under DDP the model is model.module)
        mean, std = torch.zeros(3, 1, 1), torch.full((3, 1, 1), 255.0)
    x = torch.stack([(im.float() - mean) / std for im, _ in batch]).to(device)  # (N, 3, S, S)
    targets = []
    for _, t in batch:
        _, labels = _things(recipe, t)
        crowd = t["iscrowd"]
        order = torch.cat([(~crowd).nonzero()[:, 0], crowd.nonzero()[:, 0]])  # crowds last
        targets.append({"boxes": (t["boxes"][order] / S).float().to(device),
                        "labels": labels[order].to(device),
                        "masks": t["masks"][order].float().to(device), "num_crowds": int(crowd.sum())})
    return model.loss(model(x), targets)


LOSSES: dict[str, Callable] = {"semantic": semantic_loss, "unet": unet_loss, "maskrcnn": maskrcnn_loss,
                               "panoptic_fpn": panoptic_fpn_loss, "yolact": yolact_loss}
