"""Fast NMS (minseg.ops.fast_nms) against a direct loop written from the algorithm's definition, plus its relation to
classic NMS (torchvision.ops): Fast NMS never keeps a box that classic NMS would drop."""
import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from minseg.ops import cross_class_fast_nms, fast_nms


def iou(a, b) -> float:
    """float64 IoU of two xyxy boxes, no +1."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def fast_nms_reference(boxes, scores, threshold, top_k, max_detections):
    """Per class: the top_k candidates by score; keep j if IoU(i, j) <= threshold for EVERY higher-scored i among them
    (suppressed or not). Then all classes together by score, first max_detections. -> [(index, class, score)]."""
    kept = []
    for c, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda i: -row[i])[:top_k]
        for pos, j in enumerate(order):
            if all(iou(boxes[i], boxes[j]) <= threshold for i in order[:pos]):
                kept.append((j, c, row[j]))
    return sorted(kept, key=lambda t: -t[2])[:max_detections]


def cross_class_reference(boxes, scores, threshold, top_k):
    best = [max(range(len(scores)), key=lambda c: scores[c][i]) for i in range(len(boxes))]
    order = sorted(range(len(boxes)), key=lambda i: -scores[best[i]][i])[:top_k]
    return [(j, best[j], scores[best[j]][j]) for pos, j in enumerate(order)
            if all(iou(boxes[i], boxes[j]) <= threshold for i in order[:pos])]


@st.composite
def problems(draw):
    """Integer boxes with positive area (IoU decisions then exact in float32 too) and all-distinct scores."""
    n = draw(st.integers(0, 12))
    c = draw(st.integers(1, 4))
    boxes = []
    for _ in range(n):
        x1, y1 = draw(st.integers(0, 20)), draw(st.integers(0, 20))
        boxes.append([x1, y1, x1 + draw(st.integers(1, 12)), y1 + draw(st.integers(1, 12))])
    ranks = draw(st.permutations(range(n * c)))
    scores = [[(ranks[k * n + i] + 1) / (n * c + 1) for i in range(n)] for k in range(c)]
    return boxes, scores


def as_tensors(boxes, scores):
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(scores, dtype=torch.float32).reshape(len(scores), len(boxes)))


def triples(index, classes, scores):
    return [(int(i), int(c), float(s)) for i, c, s in zip(index, classes, scores)]


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 8), st.integers(1, 10))
def test_fast_nms_matches_reference(problem, threshold, top_k, max_detections):
    boxes, scores = problem
    got = triples(*fast_nms(*as_tensors(boxes, scores), threshold, top_k, max_detections))
    expected = fast_nms_reference(boxes, scores, threshold, top_k, max_detections)
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in expected]
    assert all(math.isclose(s, e, rel_tol=1e-6) for (_, _, s), (_, _, e) in zip(got, expected))


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 8))
def test_cross_class_fast_nms_matches_reference(problem, threshold, top_k):
    boxes, scores = problem
    got = triples(*cross_class_fast_nms(*as_tensors(boxes, scores), threshold, top_k))
    expected = cross_class_reference(boxes, scores, threshold, top_k)
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in expected]


@settings(max_examples=100, deadline=None)
@given(problems(), st.sampled_from([0.31, 0.5, 0.71]))
def test_fast_nms_keeps_a_subset_of_classic_nms(problem, threshold):
    # thresholds no small-integer IoU equals except 0.5 (torchvision compares a float32 IoU with a float64
    # threshold, YOLACT with a float32 one: at IoU == 0.3 exactly they disagree)
    boxes, scores = problem
    b, s = as_tensors(boxes, scores)
    C, N = s.shape
    index, classes, _ = fast_nms(b, s, threshold, top_k=N, max_detections=C * N)
    fast = {(int(i), int(c)) for i, c in zip(index, classes)}
    keep = torchvision.ops.batched_nms(b.repeat(C, 1), s.reshape(-1), torch.arange(C).repeat_interleave(N), threshold)
    classic = {(int(k) % N, int(k) // N) for k in keep}  # flat index = class * N + box
    assert fast <= classic


def test_ties_at_the_threshold_are_kept():
    """IoU exactly 0.5 survives (the original keeps `<= threshold`)."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # IoU = 1 / 2
    index, _, _ = fast_nms(boxes, torch.tensor([[0.9, 0.8]]), iou_threshold=0.5)
    assert index.tolist() == [0, 1]
    index, _, _ = fast_nms(boxes, torch.tensor([[0.9, 0.8]]), iou_threshold=0.49)
    assert index.tolist() == [0]


def test_suppressed_boxes_still_suppress():
    """A chain a > b > c where a suppresses b and b overlaps c but a does not: classic NMS keeps c, Fast NMS drops it."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [3.0, 0, 13, 10], [6.0, 0, 16, 10]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    index, _, _ = fast_nms(boxes, scores, 0.5)
    assert index.tolist() == [0]
    assert torchvision.ops.nms(boxes, scores[0], 0.5).tolist() == [0, 2]


def test_empty_inputs():
    for fn in (fast_nms, cross_class_fast_nms):
        index, classes, scores = fn(torch.zeros(0, 4), torch.zeros(80, 0))
        assert index.shape == classes.shape == scores.shape == (0,) and index.dtype == classes.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_fast_nms_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g)
    boxes = torch.cat([xy, xy + 0.05 + 0.2 * torch.rand(300, 2, generator=g)], 1)
    scores = torch.rand(80, 300, generator=g)
    cpu = fast_nms(boxes, scores)
    gpu = fast_nms(boxes.cuda(), scores.cuda())
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
