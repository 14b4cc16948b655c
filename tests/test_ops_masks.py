"""Mask pasting against torchvision's paste_masks_in_image and detectron2's one-mask-at-a-time paste
(minseg.ops.reference)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste

import minseg.ops as mo
from minseg.ops import reference
from conftest import cuda

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def paste_problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = draw(st.integers(0, 12))
    H, W = draw(st.integers(5, 90)), draw(st.integers(5, 90))
    M = draw(st.sampled_from([5, 14, 28]))
    kind = draw(st.sampled_from(["soft", "saturated", "binary"]))
    masks = torch.rand(n, M, M, generator=g)
    if kind == "saturated":
        masks = (masks * 3 - 1).clamp(0, 1)
    elif kind == "binary":
        masks = (masks > 0.5).float()
    size = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * draw(st.sampled_from([0.05, 0.5, 1.5]))
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 1.2 - size / 2
    boxes = torch.cat([xy, xy + size + 0.01], dim=1)
    return masks, boxes, (H, W)


@SETTINGS
@given(paste_problems(), st.sampled_from([0.5, 0.3, 0.9, -1.0]))
def test_detectron2_paste_equals_one_by_one(problem, threshold):
    masks, boxes, (H, W) = problem
    ours = mo.paste_masks_detectron2(masks, boxes, (H, W), threshold)
    expected = reference.paste_masks_detectron2(masks, boxes, (H, W), threshold)
    assert ours.dtype == expected.dtype and ours.shape == (len(masks), H, W)
    assert torch.equal(ours, expected)


@SETTINGS
@given(paste_problems(), st.sampled_from([1, 0, 2]))
def test_torchvision_paste_matches_torchvision(problem, padding):
    """Equal up to the last bits: PyTorch's upsample kernel fuses multiply-adds differently by code path, so
    a separable resize written as matrix products agrees to 2 float32 ulps (of values in [0, 1]), not bitwise."""
    masks, boxes, (H, W) = problem
    inside = mo.clip_boxes_to_image(boxes, (H, W))  # torchvision's paste fails on boxes wholly past the image
    ours = mo.paste_masks_torchvision(masks[:, None], inside, (H, W), padding)
    expected = torchvision_paste(masks[:, None], inside, (H, W), padding)
    assert ours.shape == expected.shape == (len(masks), 1, H, W)
    torch.testing.assert_close(ours, expected, rtol=0, atol=2.5e-7)
    assert torch.equal(ours == 0, expected == 0)  # same support


def test_torchvision_paste_realistic():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(30, 1, 28, 28, generator=g)
    xy = torch.rand(30, 2, generator=g) * torch.tensor([1000.0, 760.0])
    boxes = torch.cat([xy, (xy + torch.rand(30, 2, generator=g) * 400).clamp(max=torch.tensor([1066.0, 799.0]))], 1)
    ours = mo.paste_masks_torchvision(masks, boxes, (800, 1067))
    expected = torchvision_paste(masks, boxes, (800, 1067))
    torch.testing.assert_close(ours, expected, rtol=0, atol=2.5e-7)
    assert mo.paste_masks_torchvision(masks[:0], boxes[:0], (800, 1067)).shape == (0, 1, 800, 1067)
    assert torch.equal(mo.expand_boxes(boxes, 30 / 28),
                       __import__("torchvision").models.detection.roi_heads.expand_boxes(boxes, 30 / 28))


def test_torchvision_paste_inverted_and_degenerate_boxes():
    """An inverted box is resized to 1 pixel but pasted over an empty extent (nothing); a box one pixel wide or
    of zero width gets one column, as in torchvision."""
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 1, 28, 28, generator=g) + 0.1
    boxes = torch.tensor([[100.3, 50.0, 99.9, 80.0],    # x2 < x1 by less than a pixel
                          [60.0, 90.0, 20.0, 10.0],     # inverted on both axes
                          [30.0, 40.0, 30.0, 70.0],     # zero width
                          [10.0, 20.0, 11.0, 20.5],     # about one pixel
                          [5.0, 5.0, 50.0, 2.0],        # y2 < y1
                          [0.0, 0.0, 119.0, 119.0]])    # the whole image
    for padding in (0, 1, 2):
        ours = mo.paste_masks_torchvision(masks, boxes, (120, 120), padding)
        expected = torchvision_paste(masks, boxes, (120, 120), padding)
        torch.testing.assert_close(ours, expected, rtol=0, atol=2.5e-7)
        assert torch.equal(ours == 0, expected == 0)


def test_torchvision_paste_in_float32_whatever_the_settings():
    """The matrix products of the paste run in float64, so autocast and reduced-precision float32 matmul
    settings change nothing, and the paste changes no setting."""
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(6, 1, 28, 28, generator=g)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 30.0], [10.2, 0.0, 60.0, 59.9], [0.0, 0.0, 5.0, 5.0]]).repeat(2, 1)
    expected = mo.paste_masks_torchvision(masks, boxes, (64, 64))
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = mo.paste_masks_torchvision(masks, boxes, (64, 64))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paste_low_precision(dtype):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 28, 28, generator=g)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 30.0], [10.2, 0.0, 60.0, 59.9], [0.0, 0.0, 5.0, 5.0], [20.0, 20.0, 21.0, 22.0]])
    soft = mo.paste_masks_torchvision(masks[:, None].to(dtype), boxes, (64, 64))
    assert soft.dtype == dtype
    torch.testing.assert_close(soft.float(), mo.paste_masks_torchvision(masks[:, None], boxes, (64, 64)),
                               rtol=0, atol=float(torch.finfo(dtype).eps))
    hard = mo.paste_masks_detectron2(masks.to(dtype), boxes.to(dtype), (64, 64))
    assert hard.dtype == torch.bool and hard.shape == (4, 64, 64)


@cuda
def test_paste_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(20, 28, 28, generator=g)
    xy = torch.rand(20, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 150], dim=1)
    cpu = mo.paste_masks_detectron2(masks, boxes, (300, 320))
    gpu = mo.paste_masks_detectron2(masks.cuda(), boxes.cuda(), (300, 320)).cpu()
    # CUDA's grid_sample rounds differently in the last bit: only pixels at the 0.5 boundary may flip
    assert (gpu != cpu).sum() <= max(1, cpu.numel() // 100_000)
    torch.testing.assert_close(mo.paste_masks_torchvision(masks[:, None].cuda(), boxes.cuda(), (300, 320)).cpu(),
                               mo.paste_masks_torchvision(masks[:, None], boxes, (300, 320)), rtol=0, atol=1e-6)


def test_gpu_grouping_changes_no_value(monkeypatch):
    """GPUs paste detectron2's masks in fewer, more padded groups of windows: the same pixels, the same values."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(60, 1, 28, 28, generator=g)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([300.0, 200.0]) - 20
    boxes = torch.cat([xy, xy + 2 + torch.rand(60, 2, generator=g) * 180], dim=1)
    d2 = mo.paste_masks_detectron2(masks[:, 0], boxes, (240, 320))
    windows = torch.tensor([[0, 0, 10, 10], [0, 0, 200, 150], [5, 5, 6, 6]])
    assert len(list(mo.masks._buckets(windows, padded=True))) == 1
    assert torch.equal(mo.paste_masks_detectron2(masks[:, 0], boxes, (240, 320), impl="gpu"), d2)


@cuda
def test_torchvision_paste_cuda_without_sync():
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(40, 1, 28, 28, generator=g).cuda()
    xy = torch.rand(40, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 1 + torch.rand(40, 2, generator=g) * 150], dim=1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pasted = mo.paste_masks_torchvision(masks, boxes, (300, 320))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(pasted.cpu(), mo.paste_masks_torchvision(masks.cpu(), boxes.cpu(), (300, 320)),
                               rtol=0, atol=1e-6)
