"""Overlay pictures and JSON for `minseg predict`: semantic colour maps with a legend, instance boxes with
labels and translucent masks, panoptic segments. PIL only."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minseg.data.classes import COCO_CLASSES, COCO_PANOPTIC_STUFF, TORCHVISION_COCO_CLASSES, VOC_CLASSES, class_name
from minseg.image import load_rgb
from minseg.files import OutputBatch, atomic_write


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (golden-angle hues, alternating lightness); the same index always gets the same colour."""
    colours = [colorsys.hls_to_rgb((i * 0.618034) % 1.0, 0.45 + 0.15 * (i % 2), 0.75) for i in range(n)]
    return (np.array(colours) * 255).round().astype(np.uint8)  # (n, 3)


def blend(rgb: np.ndarray, colour_map: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour_map[mask]
    return out.round().astype(np.uint8)


def draw_legend(image: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """Append a legend column (colour swatch + name per entry) to the right of `image`."""
    if not entries:
        return image
    font = ImageFont.load_default()
    row = 14
    width = 16 + max(int(ImageDraw.Draw(image).textlength(name, font=font)) for name, _ in entries) + 12
    canvas = Image.new("RGB", (image.width + width, max(image.height, row * len(entries) + 8)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (name, colour) in enumerate(entries):
        y = 4 + i * row
        draw.rectangle([image.width + 4, y, image.width + 14, y + 10], fill=tuple(int(c) for c in colour))
        draw.text((image.width + 18, y - 1), name, fill=(0, 0, 0), font=font)
    return canvas


def semantic_overlay(rgb: np.ndarray, labels: torch.Tensor, names: list[str]) -> tuple[Image.Image, dict]:
    labels = labels.cpu().numpy()
    colours = palette(max(len(names), int(labels.max()) + 1))
    colours[0] = 0  # background stays dark
    picture = blend(rgb, colours[labels], np.ones(labels.shape, bool), 0.55)
    present, counts = np.unique(labels, return_counts=True)
    legend = [(class_name(names, int(c)), colours[c]) for c in present]
    info = {"classes": [{"id": int(c), "name": class_name(names, int(c)), "pixels": int(n)} for c, n in zip(present, counts)]}
    return draw_legend(Image.fromarray(picture), legend), info


def instance_overlay(rgb: np.ndarray, result: dict, names: list[str], score_threshold: float = 0.5) -> tuple[Image.Image, dict]:
    """Translucent masks, boxes and "name score" labels for detections scoring >= score_threshold (the JSON
    lists every detection)."""
    boxes, labels, scores = result["boxes"].cpu(), result["labels"].cpu(), result["scores"].cpu()
    masks = result["masks"].cpu()
    if masks.dim() == 4:  # torchvision: [K, 1, H, W] probabilities
        masks = masks[:, 0] >= 0.5
    masks = masks.bool().numpy()
    colours = palette(len(labels) + 1)[1:]
    shown = [i for i in range(len(labels)) if scores[i] >= score_threshold][::-1]  # best drawn last, on top
    picture = rgb.copy()
    for i in shown:  # drawing only: one blend per shown instance is what a picture needs
        picture = blend(picture, np.broadcast_to(colours[i], picture.shape), masks[i], 0.45)
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i in shown:
        box, colour = boxes[i].tolist(), tuple(int(c) for c in colours[i])
        draw.rectangle(box, outline=colour, width=2)
        text = f"{class_name(names, int(labels[i]))} {float(scores[i]):.2f}"
        x, y = box[0], max(box[1] - 12, 0)
        draw.rectangle([x, y, x + draw.textlength(text, font=font) + 4, y + 12], fill=colour)
        draw.text((x + 2, y), text, fill=(255, 255, 255), font=font)
    detections = []
    for i, (box, label, score) in enumerate(zip(boxes.tolist(), labels.tolist(), scores.tolist())):
        name = class_name(names, label)
        detections.append({"label": label, "name": name, "score": round(score, 5), "box": [round(v, 2) for v in box],
                           "mask_pixels": int(masks[i].sum())})
    return image, {"detections": detections}


def boundaries(seg: np.ndarray) -> np.ndarray:
    """Bool mask of pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(seg.shape, bool)
    edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    edge[:-1, :] |= seg[:-1, :] != seg[1:, :]
    return edge


def panoptic_overlay(rgb: np.ndarray, result: dict) -> tuple[Image.Image, dict]:
    """Stuff and thing segments coloured by category (instances of one category get shades of its colour),
    white segment borders, a legend of the categories present."""
    seg = result["panoptic_seg"].cpu().numpy()
    info = result["segments_info"]
    things, stuff = palette(80), palette(len(COCO_PANOPTIC_STUFF) + 80)[80:]
    colours = np.zeros((int(seg.max()) + 1, 3), np.uint8)
    legend: dict[str, np.ndarray] = {}
    segments, shade = [], {}
    for s in info:
        c = int(s["category_id"])
        if s["isthing"]:
            name, base = class_name(COCO_CLASSES, c), things[c % 80].astype(np.float32)
            k = shade[c] = shade.get(c, -1) + 1
            colour = np.clip(base * (1.0 - 0.12 * (k % 4)) + 30 * (k % 2), 0, 255).astype(np.uint8)
        else:
            name, colour = class_name(COCO_PANOPTIC_STUFF, c), stuff[c % len(stuff)]
        colours[int(s["id"])] = colour
        legend.setdefault(name, colour if not s["isthing"] else things[c % 80])
        segments.append({**{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}, "name": name})
    picture = blend(rgb, colours[seg], seg > 0, 0.6)
    picture[boundaries(seg)] = 255
    return draw_legend(Image.fromarray(picture), sorted(legend.items())), {"segments_info": segments}


def prediction_paths(model_name: str, image_path: Path, out_dir: Path) -> list[Path]:
    """Where save_prediction writes: [<out_dir>/<stem>.<model>.png, <out_dir>/<stem>.<model>.json]."""
    name = f"{Path(image_path).stem}.{model_name}"
    return [Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.json"]


def save_prediction(model_name: str, image_path: Path, result: dict, out_dir: Path, score_threshold: float = 0.5,
                    batch: OutputBatch | None = None) -> list[Path]:
    """Write <stem>.<model>.png (overlay) and <stem>.<model>.json, each atomically, or into `batch` (renamed into
    place when the batch completes); returns the paths."""
    rgb = np.asarray(load_rgb(image_path))
    if "panoptic_seg" in result:
        picture, info = panoptic_overlay(rgb, result)
        instances = result["instances"]
        info["detections"] = instance_overlay(rgb, {**instances}, COCO_CLASSES)[1]["detections"]
    elif "boxes" in result:
        names = TORCHVISION_COCO_CLASSES if model_name.startswith("maskrcnn") else COCO_CLASSES
        picture, info = instance_overlay(rgb, result, names, score_threshold)
    else:
        names = VOC_CLASSES if result["probs"].shape[0] == 21 else [f"class {i}" for i in range(result["probs"].shape[0])]
        picture, info = semantic_overlay(rgb, result["labels"], names)
    png, js = prediction_paths(model_name, image_path, out_dir)
    for target in (png, js):
        if target.resolve() == Path(image_path).resolve():
            raise ValueError(f"{target}: refusing to overwrite the input image")
    write = batch.add if batch is not None else atomic_write
    write(png, lambda tmp: picture.save(tmp, format="PNG"))
    payload = json.dumps({"image": str(image_path), "model": model_name, **info}, indent=1)
    write(js, lambda tmp: Path(tmp).write_text(payload))
    return [png, js]
