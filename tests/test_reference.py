"""minseg.ops.reference, the plain math of each operator: equal to the original (torchvision, detectron2's and
YOLACT's rules), to a float64 formula, and to minseg's fast forms (bitwise on CPU where the fast form says so)."""
import math
import subprocess
import sys

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings, strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste

import minseg.ops as mo
from minseg.heads.panoptic_fusion import FusionConfig, combine_semantic_and_instances
from minseg.ops import reference
from test_fast_nms import as_tensors, fast_nms_reference, problems as fast_nms_problems, triples
from test_ops_boxes import box_sets
from test_ops_masks import paste_problems
from test_ops_roi_align import assert_bitwise, roi_align_reference, roi_problems

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(roi_problems(), st.sampled_from([-1, 0, 2]), st.booleans())
def test_roi_align(problem, sampling_ratio, aligned):
    """Bitwise torchvision's CPU kernel and minseg's fast form in float32; the float64 loop to 1e-12."""
    x, rois, out, scale = problem
    ref = reference.roi_align(x, rois, out, scale, sampling_ratio, aligned)
    assert_bitwise(ref, tvo.roi_align(x, rois, out, scale, sampling_ratio, aligned))
    assert_bitwise(mo.roi_align(x, rois, out, scale, sampling_ratio, aligned), ref)
    ref64 = reference.roi_align(x.double(), rois.double(), out, scale, sampling_ratio, aligned)
    torch.testing.assert_close(ref64, roi_align_reference(x, rois, *out, scale, sampling_ratio, aligned),
                               rtol=0, atol=1e-12)


def test_roi_align_gpu_form_to_rounding():
    """The GPU form (one fused bag of taps per bin, run here on the CPU) sums in another order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 20, 24, generator=g)
    xy = torch.rand(12, 2, generator=g) * 80
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), xy, xy + torch.rand(12, 2, generator=g) * 60], 1)
    expected = {sr: reference.roi_align(x, rois, 5, 0.25, sr, True) for sr in (0, 2)}
    for sr, ref in expected.items():
        torch.testing.assert_close(mo.roi_align(x, rois, 5, 0.25, sr, True, impl="gpu"), ref, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(box_sets(max_n=25), st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
def test_nms(data, thr):
    boxes, scores = data
    ref = reference.nms(boxes, scores, thr)
    assert torch.equal(ref, tvo.nms(boxes, scores, thr))
    assert torch.equal(mo.nms(boxes, scores, thr), ref)


@SETTINGS
@given(box_sets(max_n=25), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 4))
def test_batched_nms(data, thr, num_classes):
    """Per class NMS. torchvision offsets each class's boxes (the same kept set for non-negative boxes; ties in
    score may come out in another order), minseg's fast form reproduces torchvision's order."""
    boxes, scores = data
    idxs = torch.arange(len(boxes)) % num_classes
    ref = reference.batched_nms(boxes, scores, idxs, thr)
    ours = mo.batched_nms(boxes, scores, idxs, thr)
    assert sorted(ref.tolist()) == sorted(ours.tolist())
    assert torch.equal(scores[ref], scores[ours])


@settings(max_examples=60, deadline=None)
@given(fast_nms_problems(), st.sampled_from([0.3, 0.5, 0.7]), st.integers(1, 8), st.integers(1, 10))
def test_fast_nms(problem, threshold, top_k, max_detections):
    boxes, scores = problem
    ref = reference.fast_nms(*as_tensors(boxes, scores), threshold, top_k, max_detections)
    assert triples(*ref) == triples(*mo.fast_nms(*as_tensors(boxes, scores), threshold, top_k, max_detections))
    expected = fast_nms_reference(boxes, scores, threshold, top_k, max_detections)  # float64 loop
    assert [(i, c) for i, c, _ in triples(*ref)] == [(i, c) for i, c, _ in expected]


@SETTINGS
@given(paste_problems(), st.sampled_from([1, 0]))
def test_paste_torchvision(problem, padding):
    """Bitwise torchvision's paste_masks_in_image; minseg's two matrix products to 2 float32 ulps of the mask."""
    masks, boxes, image_shape = problem
    masks = masks[:, None]
    ref = reference.paste_masks_torchvision(masks, boxes, image_shape, padding)
    torch.testing.assert_close(mo.paste_masks_torchvision(masks, boxes, image_shape, padding), ref,
                               rtol=0, atol=2.5e-7)
    inside = mo.clip_boxes_to_image(boxes, image_shape)  # torchvision's paste fails on boxes wholly past the image
    assert torch.equal(reference.paste_masks_torchvision(masks, inside, image_shape, padding),
                       torchvision_paste(masks, inside, image_shape, padding))


@SETTINGS
@given(paste_problems(), st.sampled_from([0.5, 0.3, -1.0]))
def test_paste_detectron2(problem, threshold):
    masks, boxes, image_shape = problem
    ref = reference.paste_masks_detectron2(masks, boxes, image_shape, threshold)
    assert torch.equal(mo.paste_masks_detectron2(masks, boxes, image_shape, threshold), ref)


@pytest.mark.parametrize("gpu_form", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_panoptic_fusion(seed, gpu_form):
    """Both fast forms (one instance at a time on the CPU, the dense fixpoint on GPUs) equal the reference."""
    g = torch.Generator().manual_seed(seed)
    K, H, W = int(torch.randint(0, 15, (1,), generator=g)), 30, 40
    scores, labels = torch.rand(K, generator=g), torch.randint(0, 80, (K,), generator=g)
    masks = torch.zeros(K, H, W, dtype=torch.bool)
    for k, (x, y, w, h) in enumerate(torch.randint(0, 25, (K, 4), generator=g).tolist()):
        masks[k, y:y + h, x:x + w] = True
    semantic = torch.randint(0, 4, (3, 4), generator=g).repeat_interleave(10, 0).repeat_interleave(10, 1)
    cfg = FusionConfig(overlap_thresh=float(torch.rand(1, generator=g)), stuff_area_thresh=50)
    panoptic, segments = combine_semantic_and_instances(scores, labels, masks, semantic, cfg,
                                                        impl="gpu" if gpu_form else "cpu")
    expected, expected_segments = reference.panoptic_fusion(
        scores, labels, masks, semantic, instances_score_thresh=cfg.instances_score_thresh,
        overlap_thresh=cfg.overlap_thresh, stuff_area_thresh=cfg.stuff_area_thresh, things_label=cfg.things_label)
    assert torch.equal(panoptic, expected) and segments == expected_segments


def test_importing_the_ops_loads_no_model():
    """Layers import downwards only: `import minseg.ops` loads no model, converter, registry or CLI module (the
    package minseg.convert is the dispatch function alone; its converters load when called)."""
    code = ("import sys, minseg.ops, minseg.ops.reference; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('minseg'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert all(m in ("minseg", "minseg.errors", "minseg.convert") or m.startswith("minseg.ops") for m in loaded), loaded


def test_every_op_takes_its_reference_by_impl():
    """impl="reference" runs the plain math; an unknown impl is refused by name."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 8, 8, generator=g)
    rois = torch.tensor([[0.0, 1.0, 1.0, 20.0, 12.0]])
    assert torch.equal(mo.roi_align(x, rois, 3, 0.5, 2, impl="reference"), reference.roi_align(x, rois, 3, 0.5, 2))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert mo.nms(boxes, scores, 0.5, impl="reference").tolist() == [0, 2]
    assert mo.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5, impl="reference").tolist() == [0, 1, 2]
    index, classes, _ = mo.fast_nms(boxes, scores[None], 0.5, impl="reference")
    assert index.tolist() == [0, 2] and classes.tolist() == [0, 0]
    masks = torch.rand(3, 28, 28, generator=g)
    assert torch.equal(mo.paste_masks_detectron2(masks, boxes, (32, 32), impl="reference"),
                       mo.paste_masks_detectron2(masks, boxes, (32, 32), impl="cpu"))
    assert torch.equal(mo.paste_masks_torchvision(masks[:, None], boxes, (32, 32), impl="reference"),
                       torchvision_paste(masks[:, None], boxes, (32, 32)))
    with pytest.raises(ValueError, match="impl must be one of"):
        mo.nms(boxes, scores, 0.5, impl="fast")
