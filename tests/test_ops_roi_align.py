"""RoIAlign and FPN pooling against a float64 scalar-loop reference written here and torchvision.ops.

On CPU, float32 results must be bitwise equal to torchvision's (same samples, weights and float order)."""
import importlib
import math

import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given, settings, strategies as st
from torchvision.ops.poolers import LevelMapper

import minseg.ops as mo
from conftest import cuda

SETTINGS = settings(max_examples=40, deadline=None)


def assert_bitwise(ours, theirs):
    """Same shape, dtype and bits (so +0.0 and -0.0 differ too)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    bits = torch.int64 if ours.dtype == torch.float64 else torch.int32
    assert torch.equal(ours.contiguous().view(bits), theirs.contiguous().view(bits)), (ours - theirs).abs().max()


def roi_align_reference(x, rois, out_h, out_w, scale, sampling_ratio, aligned):
    """RoIAlign as the paper and torchvision's kernel define it, one sample at a time in float64."""
    x = x.double()
    N, C, H, W = x.shape
    out = torch.zeros(len(rois), C, out_h, out_w, dtype=torch.float64)

    def bilinear(img, y, xx):  # img (C, H, W)
        if y < -1.0 or y > H or xx < -1.0 or xx > W or math.isnan(y) or math.isnan(xx):
            return torch.zeros(C, dtype=torch.float64)
        y, xx = max(y, 0.0), max(xx, 0.0)
        y0, x0 = int(y), int(xx)
        if y0 >= H - 1:
            y0 = y1 = H - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= W - 1:
            x0 = x1 = W - 1
            xx = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, xx - x0
        hy, hx = 1 - ly, 1 - lx
        return hy * hx * img[:, y0, x0] + hy * lx * img[:, y0, x1] + ly * hx * img[:, y1, x0] + ly * lx * img[:, y1, x1]

    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        off = 0.5 if aligned else 0.0
        sx, sy, ex, ey = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = ex - sx, ey - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / out_h, rw / out_w
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out_h)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out_w)
        count = max(gh * gw, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = torch.zeros(C, dtype=torch.float64)
                for iy in range(gh):
                    y = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        acc += bilinear(x[int(b)], y, sx + pw * bw + (ix + 0.5) * bw / gw)
                out[k, :, ph, pw] = acc / count
    return out


@st.composite
def roi_problems(draw):
    """Random small maps; boxes inside, partly and fully outside, tiny, zero-size and inverted."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    K = draw(st.integers(0, 6))
    x = torch.randn(N, C, H, W, generator=g)
    span = torch.tensor([W, H], dtype=torch.float32) / scale
    xy = torch.rand(K, 2, generator=g) * span * 1.6 - span * 0.3
    kind = draw(st.sampled_from(["normal", "tiny", "zero", "inverted", "huge"]))
    wh = {"normal": torch.rand(K, 2, generator=g) * span, "tiny": torch.rand(K, 2, generator=g) * 0.3,
          "zero": torch.zeros(K, 2), "inverted": -torch.rand(K, 2, generator=g) * 3,
          "huge": torch.rand(K, 2, generator=g) * span * 4}[kind]
    batch = torch.randint(0, N, (K, 1), generator=g).float()
    rois = torch.cat([batch, xy, xy + wh], dim=1)
    out = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return x, rois, out, scale


@SETTINGS
@given(roi_problems(), st.sampled_from([-1, 0, 1, 2, 3]), st.booleans())
def test_roi_align_matches_reference_and_torchvision(problem, sampling_ratio, aligned):
    x, rois, (oh, ow), scale = problem
    ref = roi_align_reference(x, rois, oh, ow, scale, sampling_ratio, aligned)
    ours64 = mo.roi_align(x.double(), rois.double(), (oh, ow), scale, sampling_ratio, aligned)
    torch.testing.assert_close(ours64, ref, rtol=0, atol=1e-12)
    ours = mo.roi_align(x, rois, (oh, ow), scale, sampling_ratio, aligned)
    tv = tvo.roi_align(x, rois, (oh, ow), scale, sampling_ratio, aligned)
    assert ours.dtype == torch.float32
    assert_bitwise(ours, tv)
    assert_bitwise(ours64, tvo.roi_align(x.double(), rois.double(), (oh, ow), scale, sampling_ratio, aligned))


def test_roi_align_realistic_sizes_and_list_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 50, 68, generator=g)
    size = torch.exp(torch.empty(300, 2).uniform_(math.log(4), math.log(400), generator=g))
    xy = torch.rand(300, 2, generator=g) * torch.tensor([272.0, 200.0]) - size / 4
    boxes = torch.cat([xy, xy + size], dim=1)
    per_image = [boxes[:120], boxes[120:]]
    for P, sr, aligned in ((7, 2, False), (14, 2, False), (7, 0, True), (14, 0, True), ((5, 3), -1, False)):
        ours = mo.roi_align(x, per_image, P, 0.25, sr, aligned)
        tv = tvo.roi_align(x, per_image, P, 0.25, sr, aligned)
        assert_bitwise(ours, tv)
    module = mo.RoIAlign((7, 7), 0.25, 2)
    assert_bitwise(module(x, per_image), tvo.RoIAlign((7, 7), 0.25, 2)(x, per_image))


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_roi_align_in_chunks(monkeypatch, sampling_ratio):
    """Many RoIs are pooled in runs that bound the temporaries; the runs change nothing."""
    ra = importlib.import_module("minseg.ops.roi_align")  # the module, not the function of the same name
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 30, 40, generator=g)
    xy = torch.rand(60, 2, generator=g) * 100
    rois = torch.cat([torch.randint(0, 2, (60, 1), generator=g).float(), xy, xy + torch.rand(60, 2, generator=g) * 90], 1)
    whole = mo.roi_align(x, rois, 5, 0.25, sampling_ratio, True)
    monkeypatch.setattr(ra, "_MAX_ENTRIES", 3000)
    assert_bitwise(mo.roi_align(x, rois, 5, 0.25, sampling_ratio, True), whole)
    monkeypatch.setattr(ra, "_MAX_ENTRIES", 1 << 21)
    monkeypatch.setattr(ra, "_MAX_VALUES", 4 * 3 * 30)  # groups of a few bins
    assert_bitwise(mo.roi_align(x, rois, 5, 0.25, sampling_ratio, True), whole)
    assert_bitwise(whole, tvo.roi_align(x, rois, 5, 0.25, sampling_ratio, True))


def test_roi_align_non_finite_features_like_torchvision():
    """An out-of-map sample has weight 0 and reads pixel (0, 0), so inf/NaN there reach the same bins."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 9, 11, generator=g)
    x[0, :, 0, 0], x[1, 1, 4, 5], x[1, 2, 8, 10] = float("inf"), float("nan"), -float("inf")
    rois = torch.tensor([[0, -30.0, -30, -20, -10], [1, 10, 10, 30, 30], [0, 1, 2, 60, 50], [1, -5, 3, 44, 100]])
    for sr, aligned in ((0, True), (2, False)):
        ours, tv = mo.roi_align(x, rois, 3, 0.25, sr, aligned), tvo.roi_align(x, rois, 3, 0.25, sr, aligned)
        assert torch.equal(ours.isnan(), tv.isnan()) and ours.isnan().any()
        assert_bitwise(torch.nan_to_num(ours), torch.nan_to_num(tv))


def test_roi_align_empty_and_gradient():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert mo.roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 3).shape == (0, 2, 3, 3)
    one = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    for sr in (2, 0):  # no channels, or an output side of 0: empty, as torchvision
        assert mo.roi_align(torch.randn(1, 0, 5, 6), one, 2, 1.0, sr).shape == (1, 0, 2, 2)
        assert mo.roi_align(torch.randn(1, 2, 5, 6), one, (0, 3), 1.0, sr).shape == (1, 2, 0, 3)
    rois = torch.tensor([[0, 0.3, 0.2, 4.1, 3.9], [0, -1.0, 1.0, 2.0, 7.0]], dtype=torch.float64)
    for sr in (2, 0):
        assert torch.autograd.gradcheck(lambda t: mo.roi_align(t, rois, 2, 1.0, sr, True), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_roi_align_low_precision(dtype):
    """Computed in float32 and rounded once: within one rounding of the float64 result."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 20, 20, generator=g)
    rois = torch.tensor([[0, 1.5, 2.0, 30.0, 25.0], [0, -3.0, 4.0, 12.0, 50.0]])
    ours = mo.roi_align(x.to(dtype), rois.to(dtype), 4, 0.5, 2, False)
    assert ours.dtype == dtype
    ref = roi_align_reference(x.to(dtype), rois.to(dtype), 4, 4, 0.5, 2, False)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.double(), ref, rtol=eps, atol=eps)


def _fpn_features(g, N=2, C=4, H=64, W=80):
    return [torch.randn(N, C, H // s, W // s, generator=g) for s in (1, 2, 4, 8)]


def _fpn_boxes(g, n, image=(256, 320)):
    size = torch.exp(torch.empty(n, 2).uniform_(math.log(2), math.log(600), generator=g))
    xy = torch.rand(n, 2, generator=g) * torch.tensor([image[1], image[0]], dtype=torch.float32) - size / 3
    boxes = torch.cat([xy, xy + size], dim=1)
    # sqrt(area) exactly on level boundaries: 224 * 2^k
    edge = torch.tensor([[0.0, 0.0, 112.0, 112.0], [10.0, 10.0, 234.0, 234.0], [0.0, 0.0, 448.0, 448.0]])
    return torch.cat([boxes, edge])


def test_level_rules():
    g = torch.Generator().manual_seed(2)
    boxes = _fpn_boxes(g, 500)
    assert torch.equal(mo.assign_levels_torchvision(boxes, 2, 5), LevelMapper(2, 5)([boxes]))
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    d2 = torch.clamp(torch.floor(4 + torch.log2(size / 224 + 1e-8)), min=2, max=5).to(torch.int64) - 2  # poolers.py
    assert torch.equal(mo.assign_levels_detectron2(boxes, 2, 5), d2)


def test_multiscale_torchvision_rule_matches_torchvision():
    g = torch.Generator().manual_seed(3)
    feats = _fpn_features(g)
    boxes = [_fpn_boxes(g, 80), _fpn_boxes(g, 50)]
    names = ["0", "1", "2", "3"]
    tv = tvo.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, feats)), boxes, [(256, 320), (250, 300)])
    ours = mo.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, feats)), boxes, [(256, 320), (250, 300)])
    assert_bitwise(ours, tv)


def test_multiscale_detectron2_rule_matches_per_level_pooling():
    """detectron2's ROIPooler: level by its rule, then torchvision roi_align(aligned=True, sr=0) on that level."""
    g = torch.Generator().manual_seed(4)
    feats = _fpn_features(g)
    boxes = [_fpn_boxes(g, 60), _fpn_boxes(g, 40)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    names = ["p2", "p3", "p4", "p5"]
    pooler = mo.MultiScaleRoIAlign(names, 14, 0, aligned=True, level_rule=mo.assign_levels_detectron2, scales=scales)
    ours = pooler(dict(zip(names, feats)), boxes, [])
    rois = mo.boxes_to_rois(boxes)
    levels = mo.assign_levels_detectron2(rois[:, 1:], 2, 5)
    expected = torch.zeros_like(ours)
    for level, (f, s) in enumerate(zip(feats, scales)):
        idx = torch.where(levels == level)[0]
        expected[idx] = tvo.roi_align(f, rois[idx], 14, s, 0, True)
    assert_bitwise(ours, expected)


def test_multiscale_boxes_of_negative_area_like_the_originals():
    """A box inverted on one axis has a NaN size and no level: torchvision's and detectron2's poolers leave its
    RoI zero. With one level there is no assignment: every box is pooled there, as roi_align pools it."""
    g = torch.Generator().manual_seed(7)
    feats = _fpn_features(g)
    boxes = [torch.cat([_fpn_boxes(g, 6), torch.tensor([[40.0, 10, 20, 50], [10.0, 60, 50, 30]])]),
             torch.tensor([[60.0, 60, 20, 20], [5.0, 5, 90, 90]])]  # inverted on both axes: positive area
    names = ["0", "1", "2", "3"]
    sizes = [(256, 320), (250, 300)]
    tv = tvo.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, feats)), boxes, sizes)
    assert_bitwise(mo.MultiScaleRoIAlign(names, 7, 2)(dict(zip(names, feats)), boxes, sizes), tv)
    assert tv[9:11].abs().sum() == 0 and tv[11:].abs().sum() > 0
    ours = mo.MultiScaleRoIAlign(names, 7, 0, aligned=True, level_rule=mo.assign_levels_detectron2,
                                 scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32])
    assert ours(dict(zip(names, feats)), boxes, sizes)[9:11].abs().sum() == 0
    single = tvo.MultiScaleRoIAlign(["0"], 7, 2)({"0": feats[0]}, boxes, sizes)
    assert_bitwise(mo.MultiScaleRoIAlign(["0"], 7, 2)({"0": feats[0]}, boxes, sizes), single)


def gpu_inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 50, 68, generator=g)
    size = torch.exp(torch.empty(500, 2).uniform_(math.log(4), math.log(400), generator=g))
    xy = torch.rand(500, 2, generator=g) * 250 - 20
    rois = torch.cat([torch.randint(0, 2, (500, 1), generator=g).float(), xy, xy + size], dim=1)
    return x, rois


@pytest.mark.parametrize("P, sr, aligned", [(7, 2, False), (14, 2, False), (7, 0, True), (14, 0, False), (5, 3, True)])
def test_gpu_summation_matches_torchvision_to_rounding(P, sr, aligned):
    """The GPU form (one fused bag of taps per bin) run on CPU: the same taps, summed in another order."""
    x, rois = gpu_inputs()
    torch.testing.assert_close(mo.roi_align(x, rois, P, 0.25, sr, aligned, impl="gpu"), tvo.roi_align(x, rois, P, 0.25, sr, aligned),
                               rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("P, sr, aligned", [(7, 2, False), (14, 0, True)])
def test_roi_align_cuda_matches_torchvision(P, sr, aligned):
    """On CUDA: rounding-level equal to torchvision's CPU kernel, and as close to its CUDA kernel as that kernel is to
    its own CPU kernel (the CUDA kernel rounds sample positions its own way; a position one ulp off moves the
    value by up to an ulp times the local gradient). No host-device synchronisation with sampling_ratio > 0."""
    x, rois = gpu_inputs()
    x_gpu, rois_gpu = x.cuda(), rois.cuda()
    torch.cuda.synchronize()
    if sr > 0:
        torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        ours = mo.roi_align(x_gpu, rois_gpu, P, 0.25, sr, aligned)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ours = ours.cpu()
    cpu = tvo.roi_align(x, rois, P, 0.25, sr, aligned)
    gpu = tvo.roi_align(x.cuda(), rois.cuda(), P, 0.25, sr, aligned).cpu()
    torch.testing.assert_close(ours, cpu, rtol=1e-5, atol=1e-6)
    assert (ours - gpu).abs().max() <= (cpu - gpu).abs().max() + 1e-6


def test_multiscale_single_level_channels_last_and_errors():
    g = torch.Generator().manual_seed(6)
    feat = torch.randn(2, 8, 32, 40, generator=g)
    boxes = [_fpn_boxes(g, 20, image=(128, 160)), _fpn_boxes(g, 10, image=(128, 160))]
    tv = tvo.MultiScaleRoIAlign(["p"], 5, 2)({"p": feat}, boxes, [(128, 160), (128, 160)])
    pooler = mo.MultiScaleRoIAlign(["p"], 5, 2)
    assert_bitwise(pooler({"p": feat}, boxes, [(128, 160), (128, 160)]), tv)
    cl = feat.to(memory_format=torch.channels_last)  # already a channels-last table: no copy, same result
    assert_bitwise(pooler({"p": cl}, boxes, [(128, 160), (128, 160)]), tv)
    with pytest.raises(ValueError, match="images list should not be empty"):  # torchvision's error
        pooler({"p": feat}, boxes, [])


@cuda
def test_multiscale_pooling_cuda_without_sync():
    """The FPN pooler on CUDA (sampling_ratio 2, scales given) starts no host-device synchronisation: its
    per-level constants reach the GPU by non-blocking copies."""
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(2, 8, 64 // 2**i, 80 // 2**i, generator=g).cuda() for i in range(4)]
    boxes = [_fpn_boxes(g, 30, image=(256, 320)).cuda(), _fpn_boxes(g, 12, image=(256, 320)).cuda()]
    names = ["p2", "p3", "p4", "p5"]
    pooler = mo.MultiScaleRoIAlign(names, 7, 2, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pooler(dict(zip(names, feats)), boxes, [])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = pooler({k: f.cpu() for k, f in zip(names, feats)}, [b.cpu() for b in boxes], [])
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-6)
