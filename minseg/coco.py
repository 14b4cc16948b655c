"""COCO box / mask AP for minseg's instance outputs, through pycocotools (the optional `minseg[eval]` extra).

`to_coco_results` turns minseg detections into COCO's result json (boxes as xywh, masks as uncompressed
RLE, which pycocotools' loadRes accepts); `evaluate` runs COCOeval and returns the 12 standard numbers.
"""
from __future__ import annotations

import torch

from minseg.data.rle import encode as mask_to_rle  # Tensor[H, W] bool -> uncompressed RLE

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def to_coco_results(outputs: list[dict], image_ids: list[int], category_ids: list[int]) -> list[dict]:
    """Per-image minseg instance outputs -> COCO result dicts. `category_ids[label]` maps a minseg label to
    the dataset's category id (for YOLACT / detectron2 labels 0..79, COCO's 80 ids in order; for torchvision,
    whose labels already are COCO ids, pass list(range(91)))."""
    results = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        masks = out.get("masks")
        if masks is not None and masks.dim() == 4:  # torchvision: [K, 1, H, W] probabilities
            masks = masks[:, 0] >= 0.5
        for k, (box, label, score) in enumerate(zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())):
            x1, y1, x2, y2 = box
            entry = {"image_id": int(image_id), "category_id": int(category_ids[label]), "score": float(score),
                     "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if masks is not None:
                entry["segmentation"] = mask_to_rle(masks[k].bool().cpu())
            results.append(entry)
    return results


def evaluate(ground_truth, results: list[dict], iou_type: str = "segm") -> dict[str, float]:
    """COCOeval on `results` against a COCO object or annotation-file path; iou_type "bbox" or "segm"."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("COCO evaluation needs pycocotools: pip install 'minseg[eval]'", name=e.name) from None
    gt = ground_truth if isinstance(ground_truth, COCO) else COCO(str(ground_truth))
    if not results:
        return {name: 0.0 for name in STATS}
    if iou_type == "segm":  # loadRes turns list counts into compressed RLE itself
        import pycocotools.mask as mask_utils

        results = [{**r, "segmentation": mask_utils.frPyObjects(r["segmentation"], *r["segmentation"]["size"])}
                   for r in results]
    evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return dict(zip(STATS, (float(v) for v in evaluator.stats)))
