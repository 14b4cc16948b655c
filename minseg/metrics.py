"""Segmentation metrics in plain tensors: mIoU from a confusion matrix, and panoptic quality (PQ, SQ, RQ).

PQ follows Kirillov et al. 2019 (and panopticapi's pq_compute): a predicted and a ground-truth segment of
the same category match when their IoU > 0.5, where void pixels (`void_label` in the ground truth) are
removed from the prediction's area. Crowd ground-truth segments match nothing and are not false negatives; an
unmatched prediction more than half inside void plus the crowd region of its own category is not a false
positive. PQ = sum(IoU of matches) / (TP + FP/2 + FN/2), per category, then averaged over the categories
that occur. Checked once against panopticapi's own pq_compute (cocodataset/panopticapi, not a package here) on
3 x 12 generated images with crowds, void, split and relabelled segments: PQ/SQ/RQ and per-class PQ equal to 1e-12.
"""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Tensor[num_classes, num_classes] counts, rows = target class, columns = predicted class."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """{"iou": Tensor[C] (nan for classes absent from both), "miou": mean over present classes, "pixel_acc"}."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = tp / union  # nan where a class is absent from target and prediction
    return {"iou": iou, "miou": iou.nanmean().item(), "pixel_acc": (tp.sum() / confusion.sum().clamp(min=1)).item()}


def panoptic_stats(pred: torch.Tensor, pred_categories: dict[int, int], target: torch.Tensor,
                   target_categories: dict[int, int], void_id: int = 0,
                   target_crowds: frozenset[int] | set[int] = frozenset()) -> dict[int, dict]:
    """Per-category matching statistics of ONE image: {category: {"iou": sum of matched IoUs, "tp", "fp", "fn"}}.

    pred, target: Tensor[H, W] integer segment ids; `*_categories` map segment id -> category. Segment id
    `void_id` is void (not a segment) in both. `target_crowds`: the ids of crowd segments in `target`.
    Follows panopticapi's pq_compute_single_core, including its one crowd region per category (the last
    listed in `target_categories` wins).
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    big = int(max(pred.max().item(), target.max().item())) + 1
    # joint histogram of (target id, pred id): the intersection of every pair of segments
    pairs, inter = torch.unique(target * big + pred, return_counts=True)
    overlap = {(t, p): n for t, p, n in zip((pairs // big).tolist(), (pairs % big).tolist(), inter.tolist())}
    t_area = dict(zip(*[v.tolist() for v in torch.unique(target, return_counts=True)]))
    p_area = dict(zip(*[v.tolist() for v in torch.unique(pred, return_counts=True)]))

    stats: dict[int, dict] = {}
    entry = lambda c: stats.setdefault(c, {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
    matched_t, matched_p = set(), set()
    for (t, p), n in overlap.items():
        if t == void_id or p == void_id or t in target_crowds or target_categories[t] != pred_categories[p]:
            continue
        union = t_area[t] + p_area[p] - n - overlap.get((void_id, p), 0)
        iou = n / union
        if iou > 0.5:
            s = entry(target_categories[t])
            s["iou"] += iou
            s["tp"] += 1
            matched_t.add(t)
            matched_p.add(p)
    crowd_of = {}  # category -> its crowd segment
    for t, category in target_categories.items():
        if t == void_id or t not in t_area or t in matched_t:
            continue
        if t in target_crowds:
            crowd_of[category] = t
        else:
            entry(category)["fn"] += 1
    for p in p_area:
        if p == void_id or p in matched_p:
            continue
        ignored = overlap.get((void_id, p), 0)  # its pixels on void, plus on a crowd of its own category
        crowd = crowd_of.get(pred_categories[p])
        if crowd is not None:
            ignored += overlap.get((crowd, p), 0)
        if ignored / p_area[p] <= 0.5:
            entry(pred_categories[p])["fp"] += 1

    return stats


def panoptic_quality(stats: list[dict[int, dict]], things: set[int]) -> dict:
    """PQ/SQ/RQ from the panoptic_stats of every image. Returns {"all", "things", "stuff"} -> {"pq", "sq", "rq", "n"}
    and "per_class" -> {category: {"pq", "sq", "rq", "tp", "fp", "fn"}}."""
    total: dict[int, dict] = {}
    for image in stats:
        for c, s in image.items():
            t = total.setdefault(c, {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})
            for k in t:
                t[k] += s[k]
    per_class = {}
    for c, s in total.items():
        denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        if denominator == 0:
            continue
        sq = s["iou"] / s["tp"] if s["tp"] else 0.0
        rq = s["tp"] / denominator
        per_class[c] = {"pq": sq * rq, "sq": sq, "rq": rq, "tp": s["tp"], "fp": s["fp"], "fn": s["fn"]}

    def average(selected):
        values = [per_class[c] for c in per_class if c in selected]
        n = len(values)
        return {k: (sum(v[k] for v in values) / n if n else 0.0) for k in ("pq", "sq", "rq")} | {"n": n}

    everything = set(per_class)
    return {"all": average(everything), "things": average(everything & set(things)),
            "stuff": average(everything - set(things)), "per_class": per_class}
