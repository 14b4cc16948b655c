"""Box ops and NMS against torchvision.ops and the one-box-at-a-time greedy NMS of minseg.ops.reference."""
import math

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings, strategies as st

import minseg.ops as mo
from minseg.ops import reference
from conftest import cuda

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def box_sets(draw, max_n=40):
    """Boxes on a coarse integer grid (identical boxes, zero-area boxes, exact IoU values) or random floats,
    and scores drawn from a few values (exact ties)."""
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        xy = torch.randint(0, 8, (n, 2), generator=g).float()
        wh = torch.randint(0, 5, (n, 2), generator=g).float()
    else:
        xy = torch.rand(n, 2, generator=g) * 50
        wh = torch.rand(n, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    levels = draw(st.sampled_from([2, 5, 1000]))
    scores = torch.randint(0, levels, (n,), generator=g).float() / levels
    return boxes, scores


@SETTINGS
@given(box_sets(), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]))
def test_nms_matches_reference_and_torchvision(data, thr):
    boxes, scores = data
    ours = mo.nms(boxes, scores, thr)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, reference.nms(boxes, scores, thr))
    assert torch.equal(ours, tvo.nms(boxes, scores, thr))


@SETTINGS
@given(box_sets(), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 4), st.sampled_from([0.0, -30.0]))
def test_batched_nms_matches_reference_and_torchvision(data, thr, num_classes, shift):
    boxes, scores = data
    boxes = boxes + shift  # negative coordinates: the offset trick then lets classes overlap, as in torchvision
    idxs = torch.arange(len(boxes)) % num_classes
    ours = mo.batched_nms(boxes, scores, idxs, thr)
    assert torch.equal(ours, tvo.batched_nms(boxes, scores, idxs, thr))
    if shift == 0.0:  # with non-negative coordinates the offset trick is per-class greedy NMS
        assert sorted(ours.tolist()) == sorted(reference.batched_nms(boxes, scores, idxs, thr).tolist())


@pytest.mark.parametrize("n", [1001, 3000])
def test_batched_nms_per_class_path(n):
    """Above 4000 coordinates torchvision switches to NMS class by class; the result (and tie order) matches."""
    g = torch.Generator().manual_seed(n)
    xy = torch.randint(0, 60, (n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 20, (n, 2), generator=g)], dim=1)
    scores = torch.randint(0, 7, (n,), generator=g).float()  # many exact ties
    idxs = torch.randint(0, 6, (n,), generator=g)
    for thr in (0.3, 0.5, 0.8):
        assert torch.equal(mo.batched_nms(boxes, scores, idxs, thr), tvo.batched_nms(boxes, scores, idxs, thr))


def test_nms_large_random():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2000, 2, generator=g) * 500
    boxes = torch.cat([c, c + 10 + torch.rand(2000, 2, generator=g) * 50], dim=1)
    scores = torch.rand(2000, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert torch.equal(mo.nms(boxes, scores, thr), tvo.nms(boxes, scores, thr))


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_block_size_does_not_change_the_result(block):
    g = torch.Generator().manual_seed(block)
    xy = torch.randint(0, 40, (700, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(1, 15, (700, 2), generator=g)], dim=1)
    scores = torch.randint(0, 9, (700,), generator=g).float()
    order = scores.sort(descending=True, stable=True)[1]
    keep = mo.boxes._greedy_keep(boxes[order], 0.5, block=block)
    assert torch.equal(order[keep], tvo.nms(boxes, scores, 0.5))
    labels = torch.randint(0, 4, (700,), generator=g)
    order = order[labels[order].sort(stable=True)[1]]
    keep = mo.boxes._greedy_keep(boxes[order], 0.5, labels=labels[order], block=block)
    assert sorted(order[keep].tolist()) == sorted(tvo.boxes._batched_nms_vanilla(boxes, scores, labels, 0.5).tolist())


def test_gpu_form_equals_torchvision():
    """The GPU form run on the CPU: blocks of 4096 boxes, each compared with every earlier kept box at once."""
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(5000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + 1 + torch.rand(5000, 2, generator=g) * 40], dim=1)
    scores = torch.rand(5000, generator=g)
    labels = torch.randint(0, 3, (5000,), generator=g)
    assert torch.equal(mo.nms(boxes, scores, 0.5, impl="gpu"), tvo.nms(boxes, scores, 0.5))
    assert torch.equal(mo.batched_nms(boxes, scores, labels, 0.5, impl="gpu"), tvo.batched_nms(boxes, scores, labels, 0.5))


def test_nms_edge_cases():
    empty = torch.zeros(0, 4)
    assert mo.nms(empty, torch.zeros(0), 0.5).shape == (0,)
    assert mo.batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).dtype == torch.int64
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert mo.nms(one, torch.tensor([0.3]), 0.5).tolist() == [0]
    same = one.repeat(5, 1)
    assert mo.nms(same, torch.ones(5), 0.5).tolist() == [0]  # tie: the lowest index wins
    assert mo.nms(same, torch.ones(5), 1.0).tolist() == [0, 1, 2, 3, 4]  # IoU 1 is not > 1
    zero_area = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 4.0, 4.0]])
    assert mo.nms(zero_area, torch.tensor([0.9, 0.8, 0.7]), 0.0).tolist() == [0, 1, 2]  # 0/0 never suppresses
    # IoU exactly 0.5 is kept at threshold 0.5
    half = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert mo.nms(half, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0, 1]


def test_nms_threshold_compared_in_double():
    """float32 IoU 1/10 rounds up to 0.10000000149 > 0.1: torchvision suppresses, a float32 compare would not."""
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 10.0, 1.0]])
    scores = torch.tensor([1.0, 0.5])
    assert tvo.nms(boxes, scores, 0.1).tolist() == [0]
    assert mo.nms(boxes, scores, 0.1).tolist() == [0]
    assert mo.nms(boxes.double(), scores.double(), 0.1).tolist() == tvo.nms(boxes.double(), scores.double(), 0.1).tolist()


def test_nms_half_precision_runs():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], dim=1)
    scores = torch.rand(200, generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        b = boxes.to(dtype)
        # computed in float32 on the rounded boxes: equal to torchvision on those boxes in float32
        assert torch.equal(mo.nms(b, scores.to(dtype), 0.5), tvo.nms(b.float(), scores.to(dtype).float(), 0.5))


@SETTINGS
@given(box_sets(max_n=20), box_sets(max_n=20))
def test_box_iou_matches_torchvision_symmetric_and_bounded(a, b):
    boxes1, boxes2 = a[0], b[0]
    iou = mo.box_iou(boxes1, boxes2)
    torch.testing.assert_close(iou, tvo.box_iou(boxes1, boxes2), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(iou.nan_to_num(-1), mo.box_iou(boxes2, boxes1).T.nan_to_num(-1))
    finite = iou[~iou.isnan()]
    assert bool(((finite >= 0) & (finite <= 1)).all())
    assert torch.equal(mo.box_area(boxes1), tvo.box_area(boxes1))


def test_clip_and_remove_small_match_torchvision():
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(100, 2, generator=g) * 300 - 50
    boxes = torch.cat([xy, xy + torch.rand(100, 2, generator=g) * 80], dim=1)
    assert torch.equal(mo.clip_boxes_to_image(boxes, (200, 150)), tvo.clip_boxes_to_image(boxes, (200, 150)))
    batched = boxes.view(10, 10, 4)
    assert torch.equal(mo.clip_boxes_to_image(batched, (200, 150)), tvo.clip_boxes_to_image(batched, (200, 150)))
    for min_size in (0.0, 1e-3, 10.0, 40.0):
        assert torch.equal(mo.remove_small_boxes(boxes, min_size), tvo.remove_small_boxes(boxes, min_size))
    assert mo.box_area(boxes.half()).dtype == torch.float32  # upcast like torchvision


@cuda
def test_nms_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    c = torch.rand(3000, 2, generator=g) * 500
    boxes = torch.cat([c, c + 10 + torch.rand(3000, 2, generator=g) * 50], dim=1)
    scores = torch.rand(3000, generator=g)
    idxs = torch.randint(0, 5, (3000,), generator=g)
    assert torch.equal(mo.nms(boxes.cuda(), scores.cuda(), 0.5).cpu(), mo.nms(boxes, scores, 0.5))
    assert torch.equal(mo.nms(boxes.cuda(), scores.cuda(), 0.5).cpu(), tvo.nms(boxes, scores, 0.5))
    ours = mo.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu()
    assert torch.equal(ours, tvo.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu())


def test_threshold_helper_is_exact():
    for t in (0.1, 0.3, 0.5, 0.7, 1 / 3, 0.9999999):
        lo = mo.boxes._threshold_below(t, torch.float32)
        assert lo <= t and torch.tensor(lo, dtype=torch.float32).item() == lo
        assert torch.nextafter(torch.tensor(lo), torch.tensor(math.inf)).item() > t
