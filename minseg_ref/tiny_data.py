"""Tiny generated datasets for tests and the README walk-through: coloured shapes on noise, one per layout.

Each class or category has its own colour, so a model can learn them in a few steps. Everything is drawn from
`numpy.random.default_rng(seed)`: the same arguments write the same files.

    write_semantic(root, n, size, num_classes, seed)   images/ + masks/ (255 rings around shapes: ignore)
    write_voc(root, n, size, seed)                     Pascal VOC, 21 classes, train.txt + val.txt
    write_coco_instances(root, n, size, seed)          annotations.json + images/: polygons, RLE (list and
                                                       compressed) and one crowd; category ids 1, 3, 7
    write_coco_panoptic(root, n, size, seed)           panoptic.json + panoptic/ + images/: 2 thing and 2 stuff
                                                       categories, void pixels and one crowd segment
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from minseg.data.rle import compress, encode, polygon_to_mask

THING_IDS = (1, 3, 7)          # instance categories: ids with gaps, as COCO's
PANOPTIC_THINGS = (1, 3)
PANOPTIC_STUFF = (10, 20)


def _colour(k: int) -> np.ndarray:
    return np.array([(70 * k + 40) % 256, (130 * k + 90) % 256, (200 * k + 160) % 256], dtype=np.float64)


def _noise(rng, h: int, w: int) -> np.ndarray:
    return rng.normal(110, 30, (h, w, 3))


def _save_rgb(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def _shape(rng, h: int, w: int) -> tuple[np.ndarray, list[float]]:
    """(bool [h, w] mask of a rectangle or an ellipse, its outline polygon [x0, y0, ...])."""
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
    if rng.random() < 0.5:
        polygon = [cx - rx, cy - ry, cx + rx, cy - ry, cx + rx, cy + ry, cx - rx, cy + ry]
    else:
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        polygon = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).reshape(-1).tolist()
    polygon = [round(float(v), 2) for v in polygon]
    return polygon_to_mask(polygon, h, w).numpy(), polygon


def _ring(mask: np.ndarray) -> np.ndarray:
    """The pixels just outside a mask (4-neighbours)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown & ~mask


def _class_picture(rng, h: int, w: int, num_classes: int, shapes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = _noise(rng, h, w), np.zeros((h, w), dtype=np.uint8)
    for _ in range(shapes):
        mask, _ = _shape(rng, h, w)
        k = int(rng.integers(1, num_classes))
        pixels[mask] = _colour(k) + rng.normal(0, 10, (int(mask.sum()), 3))
        labels[mask] = k
        labels[_ring(mask)] = 255
    return pixels, labels


def write_semantic(root, n: int = 4, size: tuple[int, int] = (48, 64), num_classes: int = 3, seed: int = 0) -> Path:
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels, labels = _class_picture(rng, *size, num_classes)
        _save_rgb(root / "images" / f"{i:04d}.png", pixels)
        Image.fromarray(labels, mode="L").save(root / "masks" / f"{i:04d}.png")
    return root


def write_voc(root, n: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Pascal VOC layout (palette PNG masks); the first half of the names in train.txt, the rest in val.txt."""
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    palette = [int(v) for k in range(256) for v in _colour(k)]
    names = [f"2007_{i:06d}" for i in range(n)]
    for name in names:
        pixels, labels = _class_picture(rng, *size, num_classes=21)
        _save_rgb(root / "JPEGImages" / f"{name}.jpg", pixels)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(palette)
        mask.save(root / "SegmentationClass" / f"{name}.png")
    half = max(1, n // 2)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{s}\n" for s in names[:half]))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{s}\n" for s in names[half:] or names))
    return root


def write_coco_instances(root, n: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Two or three objects per image; their segmentations cycle through polygon, uncompressed RLE and compressed
    RLE; image 0 also holds a crowd (uncompressed RLE, iscrowd 1) as COCO stores crowds."""
    root, rng = Path(root), np.random.default_rng(seed)
    h, w = size
    images, annotations = [], []
    for i in range(n):
        pixels = _noise(rng, h, w)
        objects = int(rng.integers(2, 4)) + (1 if i == 0 else 0)
        for k in range(objects):
            mask, polygon = _shape(rng, h, w)
            category = THING_IDS[int(rng.integers(len(THING_IDS)))]
            pixels[mask] = _colour(category) + rng.normal(0, 10, (int(mask.sum()), 3))
            crowd = i == 0 and k == objects - 1
            style = "rle" if crowd else ("polygon", "rle", "compressed")[len(annotations) % 3]
            rle = encode(mask)
            segmentation = {"polygon": [polygon], "rle": rle,
                            "compressed": {"size": rle["size"], "counts": compress(rle["counts"])}}[style]
            ys, xs = np.nonzero(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "iscrowd": int(crowd), "area": float(mask.sum()), "segmentation": segmentation,
                                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                         float(ys.max() - ys.min() + 1)]})
        _save_rgb(root / "images" / f"{i:04d}.png", pixels)
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": h, "width": w})
    categories = [{"id": c, "name": f"thing{c}", "supercategory": "shape"} for c in THING_IDS]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    return root


def write_coco_panoptic(root, n: int = 4, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Stuff above and below a random line, things drawn over it, a void band on the left edge; image 0's last
    thing is a crowd."""
    root, rng = Path(root), np.random.default_rng(seed)
    h, w = size
    (root / "panoptic").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        pixels, ids = _noise(rng, h, w), np.zeros((h, w), dtype=np.int64)
        segments = []
        split = int(rng.integers(h // 3, 2 * h // 3))
        for region, category in ((slice(0, split), PANOPTIC_STUFF[0]), (slice(split, h), PANOPTIC_STUFF[1])):
            ids[region, 3:] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "category_id": category, "iscrowd": 0})
        objects = int(rng.integers(1, 4))
        for k in range(objects):
            mask, _ = _shape(rng, h, w)
            mask[:, :3] = False
            segment_id = 1000 * (len(segments) + 1)  # ids need not be consecutive; from 256 on they use G too
            ids[mask] = segment_id
            segments.append({"id": segment_id, "category_id": PANOPTIC_THINGS[k % 2],
                             "iscrowd": int(i == 0 and k == objects - 1)})
        for s in segments:
            region = ids == s["id"]
            pixels[region] = _colour(s["category_id"]) + rng.normal(0, 10, (int(region.sum()), 3))
            ys, xs = np.nonzero(region)
            s.update(area=int(region.sum()), bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
                     if len(xs) else [0, 0, 0, 0])
        segments = [s for s in segments if s["area"]]
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{i:04d}.png")
        _save_rgb(root / "images" / f"{i:04d}.png", pixels)
        images.append({"id": i + 1, "file_name": f"{i:04d}.png", "height": h, "width": w})
        annotations.append({"image_id": i + 1, "file_name": f"{i:04d}.png", "segments_info": segments})
    categories = ([{"id": c, "name": f"thing{c}", "isthing": 1} for c in PANOPTIC_THINGS]
                  + [{"id": c, "name": f"stuff{c}", "isthing": 0} for c in PANOPTIC_STUFF])
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}))
    return root
