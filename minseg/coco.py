"""COCO box / mask AP for minseg's instance outputs, through pycocotools (the optional `minseg[eval]` extra).

`image_results` turns one image's detections into COCO's results format (bbox as xywh, the mask as a compressed
RLE string, which pycocotools' loadRes reads as it is); `coco_eval` runs COCOeval and returns the 12 standard
numbers and the AP of each category. pycocotools is imported only when asked for, and its printing is kept off
stdout.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable

import torch

from minseg.data.rle import compress, encode as mask_to_rle  # Tensor[H, W] bool -> uncompressed RLE

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
MISSING = "COCO AP needs pycocotools, the `eval` extra: pip install 'minseg[eval]'"


def require_pycocotools() -> None:
    """ValueError with the install line when pycocotools is missing (checked before any work)."""
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise ValueError(MISSING) from None


def image_results(output: dict, image_id: int, category_of: Callable[[int], int], *,
                  truncate_boxes: bool = False) -> list[dict]:
    """One image's minseg instance output -> COCO result dicts. `category_of(label)` gives the dataset's category id.
    Masks: bool Tensor[K, H, W], or torchvision's Tensor[K, 1, H, W] probabilities thresholded at > 0.5 (its
    detection reference, coco_eval.py). `truncate_boxes`: YOLACT's eval writes its integer boxes (ours truncated)."""
    masks = output.get("masks")
    if masks is not None and masks.dim() == 4:
        masks = masks[:, 0] > 0.5
    boxes = output["boxes"].float().cpu()
    if truncate_boxes:
        boxes = boxes.trunc()
    results = []
    for k, (box, label, score) in enumerate(zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist())):
        x1, y1, x2, y2 = box
        entry = {"image_id": image_id, "category_id": int(category_of(label)), "score": float(score),
                 "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if masks is not None:
            rle = mask_to_rle(masks[k].bool().cpu())
            entry["segmentation"] = {"size": rle["size"], "counts": compress(rle["counts"])}
        results.append(entry)
    return results


def to_coco_results(outputs: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """Per-image outputs -> COCO result dicts; `category_ids[label]` is the dataset's category id of a label (for
    YOLACT / detectron2 labels 0..79, COCO's 80 ids in order; for torchvision, list(range(91)))."""
    return [r for out, image_id in zip(outputs, image_ids, strict=True)
            for r in image_results(out, int(image_id), category_ids.__getitem__)]


def coco_eval(ground_truth, results: list[dict], iou_type: str = "segm") -> tuple[dict[str, float], dict[int, float]]:
    """COCOeval of `results` against a COCO object or annotation-file path; iou_type "bbox" or "segm".
    Returns the 12 summary numbers and {category id: AP at IoU .50:.95, nan where it has no ground truth}.
    For "segm" the results' boxes are dropped first, so that areas come from the masks (as detectron2's
    COCOEvaluator does; loadRes would otherwise take the box area)."""
    require_pycocotools()
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and timings
        gt = ground_truth if isinstance(ground_truth, COCO) else COCO(str(ground_truth))
        if not results:
            return {name: 0.0 for name in STATS}, {c: float("nan") for c in sorted(gt.getCatIds())}
        results = copy.deepcopy(results)  # loadRes adds keys to the dicts it is given
        for r in results:
            if iou_type == "segm":
                r.pop("bbox", None)
                if isinstance(r["segmentation"].get("counts"), list):  # loadRes needs compressed RLE
                    import pycocotools.mask as mask_utils

                    r["segmentation"] = mask_utils.frPyObjects(r["segmentation"], *r["segmentation"]["size"])
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # (T iou thresholds, R recalls, K categories, A areas, M max dets)
    per_class = {}
    for k, category in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[int(category)] = float(p[p > -1].mean()) if (p > -1).any() else float("nan")
    return dict(zip(STATS, (float(v) for v in evaluator.stats))), per_class


def evaluate(ground_truth, results: list[dict], iou_type: str = "segm") -> dict[str, float]:
    """The 12 COCOeval summary numbers (see coco_eval)."""
    return coco_eval(ground_truth, results, iou_type)[0]


__all__ = ["STATS", "coco_eval", "evaluate", "image_results", "mask_to_rle", "require_pycocotools", "to_coco_results"]
