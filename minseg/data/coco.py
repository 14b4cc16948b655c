"""COCO datasets: instances (`annotations.json` + `images/`) and panoptic (`panoptic.json` + `panoptic/` + `images/`).

The json is read and checked whole when the dataset is opened (malformed json, missing keys, unknown image or
category ids, missing image files); an item's image and masks are read and checked when it is asked for.
Category ids are the dataset's own; `minseg.data.labels` maps them to a model's label space.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minseg.data.images import check_same_size, read_json, read_panoptic_png, read_rgb
from minseg.data.rle import segmentation_to_mask
from minseg.errors import DataError

IGNORE = 255


def _require(path: Path, data: dict, key: str, kind: type) -> list:
    value = data.get(key)
    if not isinstance(value, kind):
        raise DataError(f"{path}: missing or malformed {key!r} (expected a {kind.__name__})")
    return value


def _check_entries(path: Path, entries: list, what: str, keys: dict[str, tuple]) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {what}[{i}] is not an object")
        for key, kinds in keys.items():
            if not isinstance(entry.get(key), kinds) or isinstance(entry.get(key), bool):
                raise DataError(f"{path}: {what}[{i}] has no valid {key!r}")


def read_categories(path: Path, data: dict) -> list[dict]:
    """[{"id", "name", "isthing"}] in the json's order (isthing defaults to 1, as in an instances json)."""
    categories = _require(path, data, "categories", list)
    _check_entries(path, categories, "categories", {"id": (int,), "name": (str,)})
    return [{"id": c["id"], "name": c["name"], "isthing": int(c.get("isthing", 1))} for c in categories]


def read_images(path: Path, data: dict, folder: Path) -> dict[int, dict]:
    images = _require(path, data, "images", list)
    _check_entries(path, images, "images", {"id": (int,), "file_name": (str,), "height": (int,), "width": (int,)})
    for entry in images:
        if not (folder / entry["file_name"]).is_file():
            raise DataError(f"{path}: image {entry['id']}: {folder / entry['file_name']} does not exist")
    return {entry["id"]: entry for entry in images}


def boxes_xywh_to_xyxy(boxes: list[list[float]], h: int, w: int) -> torch.Tensor:
    """COCO [x, y, w, h] -> Tensor[K, 4] xyxy clamped to the image (torchvision's ConvertCocoPolysToMask)."""
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    b[:, 2:] += b[:, :2]
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    return b


class CocoInstances:
    """Items in image-id order: (image, {"boxes" float32[K,4] xyxy, "category_ids" int64[K], "masks" uint8[K,H,W],
    "iscrowd" bool[K]}, {"file", "image_id"}), the annotations in the json's order."""

    kind = "instances"

    def __init__(self, annotation_file: Path, image_folder: Path):
        self.annotation_file, self.image_folder = annotation_file, image_folder
        data = read_json(annotation_file)
        self.categories = read_categories(annotation_file, data)
        self.images = read_images(annotation_file, data, image_folder)
        annotations = _require(annotation_file, data, "annotations", list)
        _check_entries(annotation_file, annotations, "annotations",
                       {"image_id": (int,), "category_id": (int,), "bbox": (list,)})
        known = {c["id"] for c in self.categories}
        self.annotations: dict[int, list[dict]] = {i: [] for i in self.images}
        for i, a in enumerate(annotations):
            if a["image_id"] not in self.images or a["category_id"] not in known:
                raise DataError(f"{annotation_file}: annotations[{i}] names an unknown image or category id")
            if len(a["bbox"]) != 4 or "segmentation" not in a:
                raise DataError(f"{annotation_file}: annotations[{i}] needs a 4-number bbox and a segmentation")
            self.annotations[a["image_id"]].append(a)
        self.ids = sorted(self.images)

    def __len__(self) -> int:
        return len(self.ids)

    def objects(self, i: int) -> list[dict]:
        """Item i's annotations as the json holds them ("bbox" xywh, "iscrowd", ...), read without its pixels."""
        return self.annotations[self.ids[i]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict, dict]:
        entry = self.images[self.ids[i]]
        path = self.image_folder / entry["file_name"]
        image = read_rgb(path)
        h, w = image.shape[1:]
        if (h, w) != (entry["height"], entry["width"]):
            raise DataError(f"{path}: {w}x{h}, but {self.annotation_file.name} says {entry['width']}x{entry['height']}")
        annotations = self.annotations[entry["id"]]
        masks = torch.zeros(len(annotations), h, w, dtype=torch.uint8)
        for k, a in enumerate(annotations):
            try:
                masks[k] = segmentation_to_mask(a["segmentation"], h, w)
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{self.annotation_file}: annotation {a.get('id', k)} of image {entry['id']}: "
                                f"{str(e)[:200]}") from None
        target = {"boxes": boxes_xywh_to_xyxy([a["bbox"] for a in annotations], h, w),
                  "category_ids": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
                  "masks": masks,
                  "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in annotations], dtype=torch.bool)}
        return image, target, {"file": str(path), "image_id": entry["id"]}


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bool Tensor[K, H, W] -> Tensor[K, 4] xyxy enclosing each mask (pixel edges: a one-pixel mask is 1 wide);
    zeros for an empty mask."""
    K, H, W = masks.shape
    rows, cols = masks.any(2), masks.any(1)                   # (K, H), (K, W)
    y0, x0 = rows.float().argmax(1), cols.float().argmax(1)    # first row / column holding the mask
    y1 = H - rows.flip(1).float().argmax(1)                   # one past the last
    x1 = W - cols.flip(1).float().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    return boxes * rows.any(1, keepdim=True)                  # empty masks: zeros


class CocoPanoptic:
    """Items in image-id order: the instance fields for the thing segments (crowds included, flagged), plus
    {"panoptic" int64[H,W] segment ids (0 = void), "segments" (the json's segments_info, each with "isthing"),
    "sem_seg" int64[H,W]}: detectron2's Panoptic FPN target (prepare_panoptic_fpn.py), 0 for every thing pixel,
    1..S for the stuff categories in increasing id order, 255 for void."""

    kind = "panoptic"

    def __init__(self, root: Path):
        self.json_file, self.png_folder, self.image_folder = root / "panoptic.json", root / "panoptic", root / "images"
        data = read_json(self.json_file)
        self.categories = read_categories(self.json_file, data)
        self.images = read_images(self.json_file, data, self.image_folder)
        annotations = _require(self.json_file, data, "annotations", list)
        _check_entries(self.json_file, annotations, "annotations",
                       {"image_id": (int,), "file_name": (str,), "segments_info": (list,)})
        known = {c["id"]: c for c in self.categories}
        self.annotations = {}
        for i, a in enumerate(annotations):
            if a["image_id"] not in self.images:
                raise DataError(f"{self.json_file}: annotations[{i}] names an unknown image id {a['image_id']}")
            _check_entries(self.json_file, a["segments_info"], f"annotations[{i}].segments_info",
                           {"id": (int,), "category_id": (int,)})
            if any(s["category_id"] not in known for s in a["segments_info"]):
                raise DataError(f"{self.json_file}: annotations[{i}] names an unknown category id")
            if not (self.png_folder / a["file_name"]).is_file():
                raise DataError(f"{self.json_file}: annotations[{i}]: {self.png_folder / a['file_name']} does not exist")
            self.annotations[a["image_id"]] = a
        missing = [i for i in self.images if i not in self.annotations]
        if missing:
            raise DataError(f"{self.json_file}: image {missing[0]} has no annotation (no panoptic PNG)")
        self.isthing = {c["id"]: bool(c["isthing"]) for c in self.categories}
        stuff = sorted(c["id"] for c in self.categories if not c["isthing"])
        self.stuff_label = {cid: i + 1 for i, cid in enumerate(stuff)}  # 0 is "any thing"; ids in increasing order
        self.ids = sorted(self.images)

    def __len__(self) -> int:
        return len(self.ids)

    def objects(self, i: int) -> list[dict]:
        """Item i's thing segments (its target's instances) as the json holds them, read without its pixels."""
        return [s for s in self.annotations[self.ids[i]]["segments_info"] if self.isthing[s["category_id"]]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict, dict]:
        entry = self.images[self.ids[i]]
        annotation = self.annotations[entry["id"]]
        path, png = self.image_folder / entry["file_name"], self.png_folder / annotation["file_name"]
        image = read_rgb(path)
        panoptic = read_panoptic_png(png)
        check_same_size(image, panoptic, png, path)
        segments = [{**s, "iscrowd": int(s.get("iscrowd", 0)), "isthing": int(self.isthing[s["category_id"]])}
                    for s in annotation["segments_info"]]
        ids, index = np.unique(panoptic, return_inverse=True)  # index: each pixel's position in ids
        unknown = set(ids.tolist()) - {s["id"] for s in segments} - {0}
        if unknown:
            raise DataError(f"{png}: segment id {min(unknown)} is not in its segments_info")
        label_of = {s["id"]: 0 if s["isthing"] else self.stuff_label[s["category_id"]] for s in segments}
        sem_seg = torch.from_numpy(np.array([label_of.get(i, IGNORE) for i in ids.tolist()])[index.reshape(panoptic.shape)])
        panoptic = torch.from_numpy(panoptic)
        things = [s for s in segments if s["isthing"]]
        masks = panoptic[None] == torch.tensor([s["id"] for s in things], dtype=torch.int64)[:, None, None]  # (K, H, W)
        target = {"boxes": mask_boxes(masks),
                  "category_ids": torch.tensor([s["category_id"] for s in things], dtype=torch.int64),
                  "masks": masks.to(torch.uint8),
                  "iscrowd": torch.tensor([bool(s["iscrowd"]) for s in things], dtype=torch.bool),
                  "panoptic": panoptic, "segments": segments, "sem_seg": sem_seg}
        return image, target, {"file": str(path), "image_id": entry["id"]}
