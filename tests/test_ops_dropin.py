"""minseg.ops as a drop-in for torchvision.ops: MultiScaleRoIAlign's constructor and dict forward, box formats,
exception types for malformed input, and roi_align's gradients (none into the boxes; to the input bitwise
torchvision's CPU backward; twice differentiable)."""
import math
from collections import OrderedDict

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings, strategies as st

import minseg.ops as mo
from minseg.ops import poolers
from test_ops_roi_align import assert_bitwise, roi_problems

NAMES = ["feat1", "feat3"]


def pyramid(g, N=2, C=5, H=64, W=80, dtype=torch.float32):
    """torchvision's docstring example: three levels, the middle one not pooled, given in dict order."""
    return OrderedDict((name, torch.randn(N, C, H // s, W // s, generator=g, dtype=dtype))
                       for name, s in (("feat1", 4), ("feat2", 8), ("feat3", 16)))


def image_boxes(g, n, size=(256, 320), dtype=torch.float32):
    wh = torch.exp(torch.empty(n, 2).uniform_(math.log(2), math.log(500), generator=g))
    xy = torch.rand(n, 2, generator=g) * torch.tensor([size[1], size[0]]) - wh / 4
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


# ------------------------------------------------------------------------------------------ MultiScaleRoIAlign

@pytest.mark.parametrize("output_size, sampling_ratio", [(7, 2), ((5, 3), -1), (14, 0)])
def test_multiscale_roi_align_like_torchvision(output_size, sampling_ratio):
    """Same constructor, same forward, bitwise the same output and the same gradient to every level."""
    g = torch.Generator().manual_seed(0)
    feats = pyramid(g)
    boxes = [image_boxes(g, 40), image_boxes(g, 25, (250, 300))]
    sizes = [(256, 320), (250, 300)]
    theirs = tvo.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=112, canonical_level=3)
    ours = mo.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=112, canonical_level=3)
    assert repr(ours) == repr(theirs)
    x_theirs = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
    x_ours = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
    expected, got = theirs(x_theirs, boxes, sizes), ours(x_ours, boxes, sizes)
    assert_bitwise(got, expected)
    grad = torch.randn(expected.shape, generator=g)
    expected.backward(grad)
    got.backward(grad)
    for name in NAMES:
        assert_bitwise(x_ours[name].grad, x_theirs[name].grad)
    assert x_ours["feat2"].grad is None and x_theirs["feat2"].grad is None


def test_multiscale_level_rule_is_a_function():
    """Any (boxes, k_min, k_max, canonical_scale, canonical_level) -> level index function; detectron2's is given."""
    g = torch.Generator().manual_seed(1)
    feats = pyramid(g)
    boxes = [image_boxes(g, 30)]
    everything_coarse = mo.MultiScaleRoIAlign(NAMES, 4, 2,
                                              level_rule=lambda b, k_min, k_max, s, l: torch.ones(len(b), dtype=torch.int64))
    coarse = tvo.MultiScaleRoIAlign(["feat3"], 4, 2)(feats, boxes, [(256, 320)])
    assert_bitwise(everything_coarse(feats, boxes, [(256, 320)]), coarse)
    names, scales = ["feat1", "feat2", "feat3"], [1 / 4, 1 / 8, 1 / 16]
    d2 = mo.MultiScaleRoIAlign(names, 4, 0, aligned=True, level_rule=mo.assign_levels_detectron2, scales=scales)
    rois = mo.boxes_to_rois(boxes)
    levels = mo.assign_levels_detectron2(rois[:, 1:], 2, 4)
    expected = torch.zeros(len(rois), 5, 4, 4)
    for level, (name, scale) in enumerate(zip(names, scales)):
        idx = torch.where(levels == level)[0]
        expected[idx] = tvo.roi_align(feats[name], rois[idx], 4, scale, 0, True)
    assert len(levels.unique()) == 3
    assert_bitwise(d2(feats, boxes, []), expected)


def test_shared_feature_tables():
    """Inside the block two poolers reading the same features make one table; results unchanged; dropped after."""
    g = torch.Generator().manual_seed(2)
    feats = pyramid(g)
    boxes, sizes = [image_boxes(g, 20)], [(256, 320)]
    small, large = mo.MultiScaleRoIAlign(NAMES, 7, 2), mo.MultiScaleRoIAlign(NAMES, 14, 2)
    alone = small(feats, boxes, sizes), large(feats, boxes, sizes)
    with mo.shared_feature_tables():
        shared = small(feats, boxes, sizes), large(feats, boxes, sizes)
        assert len(poolers._tables.get()) == 1
        other = OrderedDict((k, v.clone()) for k, v in feats.items())  # other tensors: a table of their own
        assert_bitwise(small(other, boxes, sizes), alone[0])
        assert len(poolers._tables.get()) == 2
    assert poolers._tables.get() is None
    for a, b in zip(shared, alone):
        assert_bitwise(a, b)


# ------------------------------------------------------------------------------------------------ box formats

@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_formats(fmt):
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.int64):
        a = (torch.rand(2, 7, 4, generator=g) * 50).to(dtype)  # batched: Tensor[..., N, 4]
        b = (torch.rand(2, 5, 4, generator=g) * 50).to(dtype)
        assert_equal = torch.testing.assert_close  # integer areas / float IoUs, compared exactly below
        assert_equal(mo.box_area(a, fmt=fmt), tvo.box_area(a, fmt=fmt), rtol=0, atol=0)
        ours, theirs = mo.box_iou(a, b, fmt=fmt), tvo.box_iou(a, b, fmt=fmt)
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert_equal(ours.nan_to_num(), theirs.nan_to_num(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        mo.box_area(a, fmt="xyz")
    with pytest.raises(ValueError):
        mo.box_iou(a, b, fmt="cxcywhr")  # rotated boxes: not supported


# ------------------------------------------------------------------------------------------ malformed input

X = torch.rand(1, 2, 8, 8)
ROI = torch.tensor([[0, 0, 0, 3.0, 3.0]])
MALFORMED = {
    "roi_align boxes Tensor[K, 4]": lambda o: o.roi_align(X, ROI[:, 1:], 2),
    "roi_align boxes Tensor[1, 1, 5]": lambda o: o.roi_align(X, ROI[None], 2),
    "roi_align list of Tensor[L, 3]": lambda o: o.roi_align(X, [ROI[:, 2:]], 2),
    "roi_align list of Tensor[4]": lambda o: o.roi_align(X, [ROI[0, 1:]], 2),
    "roi_align boxes a list of lists": lambda o: o.roi_align(X, ROI.tolist(), 2),
    "roi_align boxes an array": lambda o: o.roi_align(X, ROI.numpy(), 2),
    "roi_align boxes float64": lambda o: o.roi_align(X, ROI.double(), 2),
    "roi_align input 3-d": lambda o: o.roi_align(X[0], ROI, 2),
    "roi_align input int64": lambda o: o.roi_align(X.long(), ROI.long(), 2),
    "roi_align output size -1": lambda o: o.roi_align(X, ROI, -1),
    "nms boxes 1-d": lambda o: o.nms(torch.rand(4), torch.rand(3), 0.5),
    "nms boxes Tensor[N, 5]": lambda o: o.nms(torch.rand(3, 5), torch.rand(3), 0.5),
    "nms empty Tensor[0, 5]": lambda o: o.nms(torch.rand(0, 5), torch.rand(0), 0.5),
    "nms scores 2-d": lambda o: o.nms(torch.rand(3, 4), torch.rand(3, 2), 0.5),
    "nms 3 boxes, 4 scores": lambda o: o.nms(torch.rand(3, 4), torch.rand(4), 0.5),
    "nms boxes int64": lambda o: o.nms(torch.ones(3, 4, dtype=torch.int64), torch.rand(3), 0.5),
    "batched_nms boxes Tensor[N, 5]": lambda o: o.batched_nms(torch.rand(3, 5), torch.rand(3), torch.zeros(3), 0.5),
    "batched_nms 3 boxes, 4 scores": lambda o: o.batched_nms(torch.rand(3, 4), torch.rand(4), torch.zeros(3), 0.5),
    "batched_nms 2 idxs": lambda o: o.batched_nms(torch.rand(3, 4), torch.rand(3), torch.zeros(2), 0.5),
    "box_area Tensor[N, 3]": lambda o: o.box_area(torch.rand(3, 3)),
    "box_area fmt": lambda o: o.box_area(torch.rand(3, 4), fmt="xyz"),
    "box_iou fmt": lambda o: o.box_iou(torch.rand(3, 4), torch.rand(2, 4), fmt="xyz"),
    "clip_boxes_to_image Tensor[N, 5]": lambda o: o.clip_boxes_to_image(torch.rand(3, 5), (4, 4)),
    "remove_small_boxes Tensor[N, 3]": lambda o: o.remove_small_boxes(torch.rand(3, 3), 0.1),
    "MultiScaleRoIAlign no image_shapes": lambda o: o.MultiScaleRoIAlign(["0"], 2, 2)({"0": X}, [ROI[:, 1:]], []),
}


def raised(call, ops):
    try:
        call(ops)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    return None


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_raises_torchvisions_exception_type(case):
    theirs = raised(MALFORMED[case], tvo)
    assert theirs is not None
    assert raised(MALFORMED[case], mo) is theirs


# ------------------------------------------------------------------------------------------------- gradients

@settings(max_examples=25, deadline=None)
@given(roi_problems(), st.sampled_from([-1, 0, 1, 2]), st.booleans())
def test_roi_align_gradient_is_torchvisions(problem, sampling_ratio, aligned):
    """Bitwise torchvision's CPU backward on maps with boxes inside, outside, tiny, empty and inverted."""
    x, rois, out, scale = problem
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = mo.roi_align(ours_x, rois, out, scale, sampling_ratio, aligned)
    theirs = tvo.roi_align(theirs_x, rois, out, scale, sampling_ratio, aligned)
    grad = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(len(rois)))
    ours.backward(grad)
    theirs.backward(grad)
    assert_bitwise(ours_x.grad, theirs_x.grad)


def test_roi_align_gradient_realistic_sizes_and_non_finite():
    """100 RoIs on a 50x68 map, with a non-finite output gradient, which reaches only the pixels its bins read."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 50, 68, generator=g)
    boxes = [image_boxes(g, 40, (200, 272)), image_boxes(g, 60, (200, 272))]
    for P, sr, aligned in ((7, 2, False), (14, 0, True), ((5, 3), -1, False)):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = mo.roi_align(xs[0], boxes, P, 0.25, sr, aligned), tvo.roi_align(xs[1], boxes, P, 0.25, sr, aligned)
        grad = torch.randn(outs[1].shape, generator=g)
        grad[::7, ::3, 0, 0] = float("inf")
        grad[1::11, 2, -1, -1] = float("nan")
        for out, xg in zip(outs, xs):
            out.backward(grad)
        ours, theirs = xs[0].grad, xs[1].grad
        assert torch.equal(ours.isnan(), theirs.isnan()) and ours.isnan().any()
        assert_bitwise(ours.nan_to_num(), theirs.nan_to_num())


def test_no_gradient_into_the_boxes():
    """As torchvision's kernel: the output requires grad when only the boxes do, and the boxes get none."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 20, generator=g)
    boxes = [image_boxes(g, 6, (64, 80)).requires_grad_(), image_boxes(g, 4, (64, 80)).requires_grad_()]
    for ops in (tvo, mo):
        out = ops.roi_align(x, boxes, 3, 0.25, 2)
        assert out.requires_grad
        out.sum().backward()
        assert all(b.grad is None for b in boxes)
    rois = mo.boxes_to_rois(boxes).detach().requires_grad_()
    for impl in ("cpu", "gpu", "reference"):
        mo.roi_align(x.requires_grad_(), rois, 3, 0.25, 0, True, impl=impl).sum().backward()
        assert rois.grad is None
    feats = pyramid(g)
    mo.MultiScaleRoIAlign(NAMES, 3, 2)(feats, [image_boxes(g, 8).requires_grad_()], [(256, 320)]).sum().backward()


@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (0, True), (-1, False), (1, True)])
def test_roi_align_gradcheck_and_gradgradcheck(sampling_ratio, aligned):
    """float64, tiny: the gradient is the derivative, and the backward itself has the right derivative. The
    adaptive grid (sampling_ratio <= 0) is checked along random directions (fast_mode): each of its calls reads
    the grid to the host, and the full Jacobians take hundreds of calls."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.2, 4.1, 3.9], [1, -1.0, 1.0, 2.0, 7.0], [0, 2.2, 1.1, 5.6, 4.3],
                         [1, -9.0, -9.0, -6.0, -6.0]], dtype=torch.float64)

    def pool(t):
        return mo.roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned)

    fast = sampling_ratio <= 0
    assert torch.autograd.gradcheck(pool, (x,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(pool, (x,), fast_mode=fast)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()  # the table is a view of it
    assert torch.autograd.gradgradcheck(pool, (x_cl,), fast_mode=True)


def test_multiscale_gradgradcheck():
    g = torch.Generator().manual_seed(7)
    feats = pyramid(g, N=1, C=2, H=32, W=32, dtype=torch.float64)
    boxes = [image_boxes(g, 5, (128, 128), torch.float64)]
    pooler = mo.MultiScaleRoIAlign(NAMES, 2, 2)
    inputs = tuple(feats[k].requires_grad_() for k in NAMES)

    def pool(a, b):
        return pooler(OrderedDict(feat1=a, feat3=b), boxes, [(128, 128)])

    assert torch.autograd.gradcheck(pool, inputs)
    assert torch.autograd.gradgradcheck(pool, inputs)
