"""Overlay pictures and JSON for `minseg predict`: semantic colour maps with a legend, instance boxes with
labels and translucent masks, panoptic segments. PIL only."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minseg.data.classes import COCO_CLASSES, COCO_PANOPTIC_STUFF, TORCHVISION_COCO_CLASSES, VOC_CLASSES, class_name
from minseg.image import load_rgb
from minseg.files import OutputBatch, atomic_write


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours 0..255, [N, 3] -> [N, 3]: distances there follow perceived differences."""
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)  # linear light
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


@functools.cache
def _palette_sequence(n: int = 256) -> np.ndarray:
    """A fixed sequence of colours, each as far in CIELAB from all before it as a 16-level sRGB grid allows
    (greedy farthest point; lightness 30..85 keeps them clear of black text and white borders). Every
    prefix is spread out: the first 133 (COCO panoptic's things and stuff) are >= 16 apart (ΔE76)."""
    levels = np.linspace(0, 255, 16)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)  # (4096, 3)
    lab = srgb_to_lab(grid)
    keep = (lab[:, 0] > 30) & (lab[:, 0] < 85)
    grid, lab = grid[keep], lab[keep]
    chosen = [int(np.argmax(np.hypot(lab[:, 1], lab[:, 2])))]  # start from the most saturated
    distance = np.linalg.norm(lab - lab[chosen[0]], axis=1)  # to the nearest chosen colour
    for _ in range(n - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(lab - lab[chosen[-1]], axis=1))
    return grid[chosen].round().astype(np.uint8)


def palette(n: int) -> np.ndarray:
    """n perceptually distinct RGB colours, [n, 3] uint8; class i always gets colour i (fixed per class)."""
    sequence = _palette_sequence()
    return sequence[np.arange(n) % len(sequence)].copy()


def display_name(names: list[str], index: int) -> str:
    """The class's name; torchvision's unused COCO ids ("N/A") and unknown indices read "class <index>"."""
    name = class_name(names, index)
    return f"class {index}" if name == "N/A" else name


def blend(rgb: np.ndarray, colour_map: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour_map[mask]
    return out.round().astype(np.uint8)


def draw_legend(image: Image.Image, entries: list[tuple[str, tuple[int, int, int] | None]]) -> Image.Image:
    """Append a legend column to the right of `image`: a colour swatch and name per entry; an entry without
    a colour is a heading (e.g. "things:", "stuff:")."""
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
        if colour is None:
            draw.text((image.width + 4, y - 1), name, fill=(0, 0, 0), font=font)
            continue
        draw.rectangle([image.width + 4, y, image.width + 14, y + 10], fill=tuple(int(c) for c in colour))
        draw.text((image.width + 18, y - 1), name, fill=(0, 0, 0), font=font)
    return canvas


Rect = tuple[float, float, float, float]  # x0, y0, x1, y1


def place_tag(anchors: list[tuple[float, float]], size: tuple[float, float], image_size: tuple[int, int],
              taken: list[Rect]) -> Rect:
    """The first of the `anchors` (top-left corners, in order of preference) where a tag of `size` fits
    inside the image without covering a tag in `taken`; the first anchor, moved inside, when none does."""
    w, h = size
    W, H = image_size
    rects = []
    for x, y in anchors:
        x, y = min(max(x, 0), max(W - w, 0)), min(max(y, 0), max(H - h, 0))  # inside the image
        rects.append((x, y, x + w, y + h))
    for r in rects:
        if not any(r[0] < t[2] and t[0] < r[2] and r[1] < t[3] and t[1] < r[3] for t in taken):
            return r
    return rects[0]


def draw_tag(draw: ImageDraw.ImageDraw, rect: Rect, text: str, fill: tuple[int, int, int], font) -> None:
    """A filled tag with black or white text, whichever reads better on `fill` (CIELAB lightness)."""
    light = srgb_to_lab(np.array([fill], np.float64))[0, 0] > 60
    draw.rectangle(rect, fill=fill)
    draw.text((rect[0] + 2, rect[1]), text, fill=(0, 0, 0) if light else (255, 255, 255), font=font)


def semantic_overlay(rgb: np.ndarray, labels: torch.Tensor, names: list[str]) -> tuple[Image.Image, dict]:
    labels = labels.cpu().numpy()
    colours = palette(max(len(names), int(labels.max()) + 1))
    colours[0] = 0  # background stays dark
    picture = blend(rgb, colours[labels], np.ones(labels.shape, bool), 0.55)
    present, counts = np.unique(labels, return_counts=True)
    legend = [(display_name(names, int(c)), colours[c]) for c in present]
    info = {"classes": [{"id": int(c), "name": display_name(names, int(c)), "pixels": int(n)} for c, n in zip(present, counts)]}
    return draw_legend(Image.fromarray(picture), legend), info


def instance_overlay(rgb: np.ndarray, result: dict, names: list[str], score_threshold: float = 0.5) -> tuple[Image.Image, dict]:
    """Translucent masks, boxes and "name score" tags for detections scoring >= score_threshold (the JSON
    lists every detection). Tags stay inside the image and, where one of a few spots is free, off each other."""
    boxes, labels, scores = result["boxes"].cpu(), result["labels"].cpu(), result["scores"].cpu()
    masks = result["masks"].cpu()
    if masks.dim() == 4:  # torchvision: [K, 1, H, W] probabilities
        masks = masks[:, 0] >= 0.5
    masks = masks.bool().numpy()
    colours = palette(len(labels))  # one distinct colour per detection
    shown = [i for i in range(len(labels)) if scores[i] >= score_threshold][::-1]  # best drawn last, on top
    picture = rgb.copy()
    for i in shown:  # drawing only: one blend per shown instance is what a picture needs
        picture = blend(picture, np.broadcast_to(colours[i], picture.shape), masks[i], 0.45)
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i in shown:
        draw.rectangle(boxes[i].tolist(), outline=tuple(int(c) for c in colours[i]), width=2)
    taken: list[Rect] = []
    for i in shown[::-1]:  # tags of the best detections get the best spots
        x0, y0, x1, y1 = boxes[i].tolist()
        text = f"{display_name(names, int(labels[i]))} {float(scores[i]):.2f}"
        w, h = draw.textlength(text, font=font) + 4, 12
        rect = place_tag([(x0, y0 - h), (x0, y0), (x1 - w, y0 - h), (x0, y1), (x1 - w, y1 - h)], (w, h), image.size, taken)
        taken.append(rect)
        draw_tag(draw, rect, text, tuple(int(c) for c in colours[i]), font)
    detections = []
    for i, (box, label, score) in enumerate(zip(boxes.tolist(), labels.tolist(), scores.tolist())):
        detections.append({"label": label, "name": display_name(names, label), "score": round(score, 5),
                           "box": [round(v, 2) for v in box], "mask_pixels": int(masks[i].sum())})
    return image, {"detections": detections}


def boundaries(seg: np.ndarray) -> np.ndarray:
    """Bool mask of pixels whose right or lower neighbour belongs to another segment."""
    edge = np.zeros(seg.shape, bool)
    edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    edge[:-1, :] |= seg[:-1, :] != seg[1:, :]
    return edge


def panoptic_colours() -> tuple[np.ndarray, np.ndarray]:
    """Fixed colours of COCO panoptic's 80 thing and 53 stuff classes, all 133 distinct (ΔE76 >= 16), as
    (things [80, 3], stuff [54, 3]); stuff 0 is detectron2's "things" placeholder, never drawn (black)."""
    colours = palette(len(COCO_CLASSES) + len(COCO_PANOPTIC_STUFF) - 1)
    things, stuff = colours[: len(COCO_CLASSES)], colours[len(COCO_CLASSES):]
    return things, np.concatenate([np.zeros((1, 3), np.uint8), stuff])


def panoptic_overlay(rgb: np.ndarray, result: dict) -> tuple[Image.Image, dict]:
    """Segments coloured by class (instances of one thing class get shades of its colour), white borders,
    a tag on each segment covering at least 0.5% of the image (things: on the class colour; stuff: on
    white, in brackets), and a legend of the classes present, things and stuff apart.

    The JSON gives every segment the same fields: id, category_id, isthing, name, score (None for stuff,
    which has no detection score), area (pixels).
    """
    seg = result["panoptic_seg"].cpu().numpy()
    things, stuff = panoptic_colours()
    colours = np.zeros((int(seg.max()) + 1, 3), np.uint8)
    legend: dict[bool, dict[str, np.ndarray]] = {True: {}, False: {}}
    segments, shade = [], {}
    for s in result["segments_info"]:
        c, isthing = int(s["category_id"]), bool(s["isthing"])
        if isthing:
            name, base = display_name(COCO_CLASSES, c), things[c % len(things)].astype(np.float32)
            k = shade[c] = shade.get(c, -1) + 1
            colour = np.clip(base * (1.0 - 0.12 * (k % 4)) + 30 * (k % 2), 0, 255).astype(np.uint8)
            legend[True].setdefault(name, things[c % len(things)])
        else:
            name, colour = display_name(COCO_PANOPTIC_STUFF, c), stuff[c % len(stuff)]
            legend[False].setdefault(name, colour)
        colours[int(s["id"])] = colour
        score = s.get("score")
        segments.append({"id": int(s["id"]), "category_id": c, "isthing": isthing, "name": name,
                         "score": None if score is None else round(float(score), 5),
                         "area": int((seg == int(s["id"])).sum())})
    picture = blend(rgb, colours[seg], seg > 0, 0.6)
    picture[boundaries(seg)] = 255
    image = Image.fromarray(picture)
    draw, font, taken = ImageDraw.Draw(image), ImageFont.load_default(), []
    for s in sorted(segments, key=lambda s: -s["area"]):
        if s["area"] < 0.005 * seg.size:
            break
        ys, xs = np.nonzero(seg == s["id"])
        j = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))  # the segment's pixel nearest its centre
        text = s["name"] if s["isthing"] else f"[{s['name']}]"
        w, h = draw.textlength(text, font=font) + 4, 12
        x, y = xs[j] - w / 2, ys[j] - h / 2
        rect = place_tag([(x, y), (x, y + h), (x, y - h), (x, y + 2 * h), (x, y - 2 * h)], (w, h), image.size, taken)
        taken.append(rect)
        if s["isthing"]:
            draw_tag(draw, rect, text, tuple(int(v) for v in colours[s["id"]]), font)
        else:
            draw_tag(draw, rect, text, (255, 255, 255), font)
    entries = [("things:", None), *sorted(legend[True].items())] if legend[True] else []
    entries += [("stuff:", None), *sorted(legend[False].items())] if legend[False] else []
    return draw_legend(image, entries), {"segments_info": segments}


def describe(info: dict, score_threshold: float = 0.5) -> str:
    """One line saying what a prediction holds ("0 detections", "3 segments: 1 thing, 2 stuff", ...)."""
    if "segments_info" in info:
        segments = info["segments_info"]
        n_things = sum(s["isthing"] for s in segments)
        return f"{plural(len(segments), 'segment')}: {plural(n_things, 'thing')}, {len(segments) - n_things} stuff"
    if "detections" in info:
        detections = info["detections"]
        drawn = sum(d["score"] >= score_threshold for d in detections)
        if not detections:
            return "0 detections"
        return f"{plural(len(detections), 'detection')}, {drawn} drawn (score >= {score_threshold:g})"
    total = sum(c["pixels"] for c in info["classes"])
    top = sorted(info["classes"], key=lambda c: -c["pixels"])[:3]
    shares = ", ".join(f"{c['name']} {100 * c['pixels'] / total:.0f}%" for c in top)
    return f"{plural(len(info['classes']), 'class', 'classes')}: {shares}"


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def prediction_paths(model_name: str, image_path: Path, out_dir: Path) -> list[Path]:
    """Where save_prediction writes: [<out_dir>/<stem>.<model>.png, <out_dir>/<stem>.<model>.json]."""
    name = f"{Path(image_path).stem}.{model_name}"
    return [Path(out_dir) / f"{name}.png", Path(out_dir) / f"{name}.json"]


def save_prediction(model_name: str, image_path: Path, result: dict, out_dir: Path, score_threshold: float = 0.5,
                    weights: str | None = None, batch: OutputBatch | None = None) -> list[Path]:
    """Write <stem>.<model>.png (overlay) and <stem>.<model>.json, each atomically, or into `batch` (renamed into
    place when the batch completes); returns the paths.

    The JSON names the weights used (`weights`: the file, or "random init" when None) and says in
    `summary` what the prediction holds.
    """
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
    header = {"image": str(image_path), "model": model_name, "weights": str(weights) if weights else "random init",
              "summary": describe(info, score_threshold)}
    payload = json.dumps({**header, **info}, indent=1)
    write(js, lambda tmp: Path(tmp).write_text(payload))
    return [png, js]
