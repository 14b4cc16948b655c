"""COCO export and AP: RLE against pycocotools' own encoder; a perfect prediction scores AP 1.0."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from minseg.coco import evaluate, mask_to_rle, to_coco_results

mask_utils = pytest.importorskip("pycocotools.mask")


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 1000))
def test_rle_matches_pycocotools(h, w, seed):
    mask = torch.from_numpy(np.random.default_rng(seed).random((h, w)) < 0.4)
    ours = mask_utils.frPyObjects(mask_to_rle(mask), h, w)
    theirs = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    assert ours["counts"] == theirs["counts"]
    assert np.array_equal(mask_utils.decode(ours), mask.numpy())


def compressed(mask: torch.Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_perfect_predictions_score_one(capsys):
    from pycocotools.coco import COCO

    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 5:20, 5:30] = True
    masks[1, 22:38, 10:45] = True
    boxes = torch.tensor([[5.0, 5.0, 30.0, 20.0], [10.0, 22.0, 45.0, 38.0]])
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 7, "height": 40, "width": 50}],
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
        "annotations": [
            {"id": i + 1, "image_id": 7, "category_id": c, "iscrowd": 0, "area": float(masks[i].sum()),
             "bbox": [float(boxes[i, 0]), float(boxes[i, 1]), float(boxes[i, 2] - boxes[i, 0]), float(boxes[i, 3] - boxes[i, 1])],
             "segmentation": compressed(masks[i])}
            for i, c in enumerate((1, 3))
        ],
    }
    gt.createIndex()
    outputs = [{"boxes": boxes, "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.8]), "masks": masks}]
    results = to_coco_results(outputs, [7], category_ids=[1, 3])
    assert evaluate(gt, results, "segm")["AP"] == pytest.approx(1.0)
    assert evaluate(gt, results, "bbox")["AP"] == pytest.approx(1.0)
    assert evaluate(gt, [], "bbox")["AP"] == 0.0
