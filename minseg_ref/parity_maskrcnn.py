"""Parity of Mask R-CNN v1/v2 against torchvision.models.detection, from torchvision's own seeded random init.

A random detector keeps nothing above box_score_thresh (its softmax is nearly uniform over 91 classes), so a few
classes get a large classifier bias ("peaky"): then the full pipeline (RPN, box selection, NMS per class, masks)
keeps the maximum of 100 detections per image and every stage is exercised. On CPU everything up to the 28x28
mask probabilities is bitwise equal (ops/roi_align.py sums in torchvision's CPU kernel order). Mask pasting (ops/masks.py) agrees to 2 float32 ulps, so a pasted pixel within rounding of
0.5 may threshold the other way (random-init masks have many pixels near 0.5).
"""
from __future__ import annotations

import torch

import minseg
from minseg_ref.common import ParityRow, Tally

NAMES = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
TOLERANCE = 1e-6    # max abs diff of boxes and scores relative to their scale (bitwise on CPU: 0)
MASK_TOLERANCE = 1e-6  # max abs diff of pasted mask probabilities (0..1): a few float32 ulps
BAND = 1e-6         # thresholded masks may differ only where the reference probability is within BAND of 0.5
KNIFE_EDGE = 1e-3   # px: a grown box coordinate this close to an integer may truncate either way
PEAKY = {1: 6.0, 3: 5.0, 18: 5.5, 62: 4.5}  # class -> classifier bias added (person, car, dog, chair)


def build_pair(name: str, seed: int = 0, peaky: bool = True, **options):
    """(torchvision model with its seeded random init, minseg model converted from its state dict), both eval.
    `options` are MaskRCNN keyword arguments given to both (min_size, box_score_thresh, ...)."""
    import torchvision

    torch.manual_seed(seed)
    ref = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **options).eval()
    if peaky:
        with torch.no_grad():
            for cls, bias in PEAKY.items():
                ref.roi_heads.box_predictor.cls_score.bias[cls] += bias
    state = minseg.convert("torchvision", ref.state_dict(), arch=name)
    ours = minseg.create_model(name, norm="bn", norm_eps=1e-5, **options)  # random torchvision init: plain BN
    ours.load_state_dict(state, strict=True)
    return ref, ours.eval()


def images(sizes, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images in 0..1 (upsampled noise: edges and blobs rather than white noise)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
        fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((0.8 * fine + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1))
    return out


def align_near_ties(a: list[dict], b: list[dict], tol: float) -> tuple[list[dict], int]:
    """Put minseg's detections `b` in torchvision's order `a` where the two orders differ only by detections of
    the same label whose scores lie within `tol` (kernels that round differently, as on CUDA, may swap such near
    ties). Each `a` detection takes the unused `b` detection of its label, within tol, with the nearest box.
    Returns (reordered b, number of detections moved); an image where some detection finds no partner is left as
    it is, for compare() to report."""
    out, moved = [], 0
    for x, y in zip(a, b, strict=True):
        if len(x["labels"]) != len(y["labels"]):
            out.append(y)
            continue
        near = (x["labels"][:, None] == y["labels"][None, :]) & ((x["scores"][:, None] - y["scores"][None, :]).abs() <= tol)
        dist = (x["boxes"][:, None, :] - y["boxes"][None, :, :]).abs().sum(-1).masked_fill(~near, float("inf"))
        order, used = [], set()
        for row in dist:
            j = next((int(j) for j in row.argsort() if int(j) not in used and row[j] < float("inf")), None)
            if j is None:
                break
            order.append(j)
            used.add(j)
        if len(order) != len(x["labels"]):
            out.append(y)
            continue
        index = torch.tensor(order, dtype=torch.int64)
        moved += int((index != torch.arange(len(index))).sum())
        out.append({k: v[index] for k, v in y.items()})
    return out, moved


def compare(a: list[dict], b: list[dict]) -> dict:
    """Compare torchvision's outputs `a` with minseg's `b`. Raises AssertionError on a discrete difference
    (counts, labels); returns max diffs and mask statistics.

    Pasting truncates each box, grown by 30/28, to integers; where that grown coordinate lies within rounding of
    an integer (`KNIFE_EDGE`), a float32-rounding difference in the box moves the pasted window by one pixel and
    the whole mask is resampled. Such masks are counted ("resampled"), not compared; any other window difference
    is an error.
    """
    from torchvision.models.detection.roi_heads import expand_boxes

    boxes, scores, masks = Tally(), Tally(), Tally()
    flips = outside_band = detections = resampled = 0
    for x, y in zip(a, b, strict=True):
        if len(x["labels"]) != len(y["labels"]) or not torch.equal(x["labels"], y["labels"]):
            raise AssertionError(f"labels differ: {x['labels'].tolist()} vs {y['labels'].tolist()}")
        if y["labels"].dtype != torch.int64 or y["masks"].shape != x["masks"].shape:
            raise AssertionError(f"format differs: {y['labels'].dtype}, {tuple(y['masks'].shape)}")
        detections += len(x["labels"])
        boxes.add(y["boxes"], x["boxes"])
        scores.add(y["scores"], x["scores"])
        grown_x, grown_y = expand_boxes(x["boxes"], 30 / 28), expand_boxes(y["boxes"], 30 / 28)
        same = (grown_x.long() == grown_y.long()).all(dim=1)
        edge = ((grown_x - grown_x.round()).abs() <= KNIFE_EDGE).any(dim=1)
        if not (same | edge).all():
            raise AssertionError(f"pasted windows differ away from integer edges: {(~(same | edge)).nonzero().tolist()}")
        resampled += int((~same).sum())
        mx, my = x["masks"][same], y["masks"][same]
        masks.add(my, mx)
        differ = (mx > 0.5) != (my > 0.5)
        flips += int(differ.sum())
        outside_band += int((differ & ((mx - 0.5).abs() > BAND)).sum())
    return {"boxes": boxes, "scores": scores, "masks": masks, "flips": flips, "outside_band": outside_band,
            "detections": detections, "resampled": resampled}


def run(name: str, sizes, seed: int = 0, **options) -> dict:
    ref, ours = build_pair(name, seed=seed, **options)
    xs = images(sizes, seed)
    with torch.no_grad():
        return compare(ref(xs), ours(xs))


def passed(r: dict) -> bool:
    return (r["boxes"].max_rel <= TOLERANCE and r["scores"].max_abs <= TOLERANCE
            and r["masks"].max_abs <= MASK_TOLERANCE and r["outside_band"] == 0)


def check(name: str) -> ParityRow:
    r = run(name, [(480, 640), (427, 640)])
    detail = (f"2 images 480x640+427x640, {r['detections']} detections, labels identical; boxes rel "
              f"{r['boxes'].max_rel:.2g}, scores abs {r['scores'].max_abs:.2g}, masks abs {r['masks'].max_abs:.2g}, "
              f"{r['flips']} mask pixels thresholded differently (all within {BAND} of 0.5: {r['outside_band'] == 0}), "
              f"{r['resampled']} masks pasted one pixel off (box on an integer edge)")
    max_abs = max(r["boxes"].max_abs, r["scores"].max_abs, r["masks"].max_abs)
    max_rel = max(r["boxes"].max_rel, r["scores"].max_rel, r["masks"].max_rel)
    return ParityRow(name, f"torchvision {name}", max_abs, max_rel, passed(r), detail)


CHECKS = {name: (f"torchvision.models.detection.{name}", lambda name=name: check(name)) for name in NAMES}
