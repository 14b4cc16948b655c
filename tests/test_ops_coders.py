"""Box coders and anchor generators against torchvision and detectron2's formulas (written out here)."""
import math

import torch
from hypothesis import given, settings, strategies as st
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import minseg.ops as mo

SETTINGS = settings(max_examples=30, deadline=None)
WEIGHTS = st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (10.0, 10.0, 10.0, 10.0)])


def random_boxes(g, n, span=800.0, min_size=1.0):
    xy = torch.rand(n, 2, generator=g) * span
    return torch.cat([xy, xy + min_size + torch.rand(n, 2, generator=g) * span / 2], dim=1)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 50), st.integers(1, 5), WEIGHTS)
def test_box_coder_equals_torchvision(seed, n, k, weights):
    g = torch.Generator().manual_seed(seed)
    proposals, targets = random_boxes(g, n), random_boxes(g, n)
    ours, tv = mo.BoxCoder(weights), TorchvisionBoxCoder(weights)
    assert torch.equal(ours.encode(targets, proposals), tv.encode_single(targets, proposals))
    deltas = torch.randn(n, 4 * k, generator=g) * 4  # large enough to hit the log(1000/16) clamp
    decoded = ours.decode(deltas, proposals)
    assert decoded.shape == (n, 4 * k)
    assert torch.equal(decoded, tv.decode_single(deltas, proposals))
    if n:
        assert torch.equal(decoded.view(n, k, 4), tv.decode(deltas, [proposals[: n // 2], proposals[n // 2:]]))


@SETTINGS
@given(st.integers(0, 2**31 - 1), WEIGHTS)
def test_coders_round_trip(seed, weights):
    g = torch.Generator().manual_seed(seed)
    # sizes within a factor 1000/16 of each other, where decoding is not clamped
    src, dst = random_boxes(g, 64, min_size=10.0).double(), random_boxes(g, 64, min_size=10.0).double()
    for coder in (mo.BoxCoder(weights), mo.Box2BoxTransform(weights)):  # one interface
        deltas = coder.encode(dst, src)
        torch.testing.assert_close(coder.decode(deltas, src).double(), dst, rtol=0, atol=1e-3)


def detectron2_apply_deltas(deltas, boxes, weights, clamp=math.log(1000.0 / 16)):
    """detectron2/modeling/box_regression.py apply_deltas, written out from its description."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0::4] / weights[0], deltas[:, 1::4] / weights[1]
    dw = torch.clamp(deltas[:, 2::4] / weights[2], max=clamp)
    dh = torch.clamp(deltas[:, 3::4] / weights[3], max=clamp)
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=-1)
    return out.reshape(deltas.shape)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(0, 30), st.integers(1, 4), WEIGHTS)
def test_box2box_transform_equals_detectron2_formula(seed, n, k, weights):
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, n)
    deltas = torch.randn(n, 4 * k, generator=g) * 4
    coder = mo.Box2BoxTransform(weights)
    assert torch.equal(coder.decode(deltas, boxes), detectron2_apply_deltas(deltas, boxes, weights))
    half = coder.decode(deltas.half(), boxes.half())
    assert half.dtype == torch.float32  # detectron2 decodes in float32
    assert torch.equal(half, detectron2_apply_deltas(deltas.half(), boxes.half(), weights))
    assert mo.Box2BoxTransform(weights).scale_clamp == math.log(1000.0 / 16)


def test_box_coder_clamps_scale():
    coder = mo.BoxCoder((1.0, 1.0, 1.0, 1.0))
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    torch.testing.assert_close(out, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]))  # 16 * 1000/16 wide


def test_anchor_generator_equals_torchvision():
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * 5
    tv = TorchvisionAnchorGenerator(sizes, ratios)
    ours = mo.AnchorGenerator(sizes, ratios)
    assert ours.num_anchors_per_location() == tv.num_anchors_per_location()
    for (H, W) in ((800, 1088), (608, 800), (512, 672)):
        feats = [torch.zeros(1, 1, math.ceil(H / s), math.ceil(W / s)) for s in (4, 8, 16, 32, 64)]
        expected = tv(ImageList(torch.zeros(2, 3, H, W), [(H, W), (H - 8, W - 8)]), feats)
        got = torch.cat(ours(feats, (H, W)))
        assert torch.equal(got, expected[0]) and torch.equal(got, expected[1])
    # several sizes per level (the non-FPN form)
    tv1, ours1 = TorchvisionAnchorGenerator(), mo.AnchorGenerator()
    feat = [torch.zeros(1, 1, 25, 34)]
    assert torch.equal(ours1(feat, (400, 544))[0], tv1(ImageList(torch.zeros(1, 3, 400, 544), [(400, 544)]), feat)[0])


def test_detectron2_anchors():
    gen = mo.DefaultAnchorGenerator()
    cells = mo.detectron2_cell_anchors([32], [0.5, 1.0, 2.0])
    w = math.sqrt(32 * 32 / 0.5)
    expected = torch.tensor([[-w / 2, -0.5 * w / 2, w / 2, 0.5 * w / 2], [-16.0, -16.0, 16.0, 16.0],
                             [-math.sqrt(512) / 2, -math.sqrt(512), math.sqrt(512) / 2, math.sqrt(512)]])
    assert torch.equal(cells, expected.float())
    feats = [torch.zeros(1, 1, 64 // 2**i, 80 // 2**i) for i in range(5)]
    anchors = gen(feats)
    assert [len(a) for a in anchors] == [64 * 80 * 3, 32 * 40 * 3, 16 * 20 * 3, 8 * 10 * 3, 4 * 5 * 3]
    # index (y * W + x) * A + a, centred at (x * stride, y * stride) with offset 0
    y, x, a = 3, 7, 2
    stride, W = 8, 40
    level = mo.detectron2_cell_anchors([64], [0.5, 1.0, 2.0])
    shift = torch.tensor([x * stride, y * stride, x * stride, y * stride], dtype=torch.float32)
    assert torch.equal(anchors[1][(y * W + x) * 3 + a], level[a] + shift)
    assert anchors[0].dtype == torch.float32


def test_grid_anchors_with_offset():
    """detectron2's offset (0.5 centres anchors in their cells): shifts are (x + offset) * stride."""
    cells = mo.detectron2_cell_anchors([16], [1.0])
    anchors = mo.grid_anchors(cells, (3, 4), (8, 8), offset=0.5)
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    centres = torch.stack(((xs.reshape(-1) + 0.5) * 8, (ys.reshape(-1) + 0.5) * 8), dim=1)
    torch.testing.assert_close(anchors, torch.cat([centres - 8, centres + 8], dim=1), rtol=0, atol=0)


def direct_encode(targets, references, weights):
    """The R-CNN deltas written out in float64: (wx (cx' - cx) / w, wy (cy' - cy) / h, ww log(w' / w), wh log(h' / h))."""
    t, r = targets.double(), references.double()
    w, h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    dx = weights[0] * ((t[:, 0] + tw / 2) - (r[:, 0] + w / 2)) / w
    dy = weights[1] * ((t[:, 1] + th / 2) - (r[:, 1] + h / 2)) / h
    return torch.stack((dx, dy, weights[2] * torch.log(tw / w), weights[3] * torch.log(th / h)), dim=1)


def direct_decode(deltas, references, weights, clamp=math.log(1000.0 / 16)):
    """Boxes from deltas Tensor[N, K*4] in float64: centre + (d / weight) * size, size * exp(min(d / weight, clamp))."""
    d, r = deltas.double(), references.double()
    w, h = r[:, 2:3] - r[:, 0:1], r[:, 3:4] - r[:, 1:2]
    cx, cy = r[:, 0:1] + w / 2, r[:, 1:2] + h / 2
    pcx, pcy = cx + d[:, 0::4] / weights[0] * w, cy + d[:, 1::4] / weights[1] * h
    pw = w * torch.exp(torch.clamp(d[:, 2::4] / weights[2], max=clamp))
    ph = h * torch.exp(torch.clamp(d[:, 3::4] / weights[3], max=clamp))
    return torch.stack((pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2), dim=2).flatten(1)  # (N, K*4)


CODERS = st.sampled_from([mo.BoxCoder, mo.Box2BoxTransform])


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 3), WEIGHTS, CODERS,
       st.sampled_from([1.0, 4.0, 12.0]))
def test_coders_equal_the_direct_float64_formula(seed, n, k, weights, coder, spread):
    """Both coders, float64 in: the formula to float64 rounding; float32 in: to float32 rounding (detectron2's
    decodes in float32 whatever comes in). `spread` scales the deltas, so that dw, dh / weight cross the
    log(1000/16) clamp in some draws."""
    g = torch.Generator().manual_seed(seed)
    references, targets = random_boxes(g, n), random_boxes(g, n)
    deltas = torch.randn(n, 4 * k, generator=g) * spread
    c = coder(weights)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        refs = references.to(dtype)
        encoded = c.encode(targets.to(dtype), refs)
        torch.testing.assert_close(encoded.double(), direct_encode(targets.to(dtype), refs, weights),
                                   rtol=rtol, atol=rtol * 100)  # dx, dy near 0 are differences of centres
        decoded = c.decode(deltas.to(dtype), refs)
        rtol = 1e-12 if decoded.dtype == torch.float64 else 1e-5
        expected = direct_decode(deltas.to(dtype), refs, weights)
        torch.testing.assert_close(decoded.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), WEIGHTS, CODERS)
def test_coders_round_trip_in_float64(seed, n, weights, coder):
    """decode(encode(t, r), r) = t where every size ratio is within the clamp; beyond it decoding stops at a size
    1000/16 times the reference's (the clamp), keeping the target's centre. To float64 rounding (float32 for
    detectron2's decode)."""
    g = torch.Generator().manual_seed(seed)
    # sides 10..410: every size ratio within 41 < 1000/16
    references, targets = random_boxes(g, n, min_size=10.0).double(), random_boxes(g, n, min_size=10.0).double()
    c = coder(weights)
    deltas = c.encode(targets, references)
    tol = 1e-12 if c.decode(deltas, references).dtype == torch.float64 else 1e-6
    torch.testing.assert_close(c.decode(deltas, references).double(), targets, rtol=tol, atol=tol * 1e3)
    # targets far larger than their references: width and height clamped at 1000/16 of the reference's
    huge = targets.clone()
    huge[:, 2:] = huge[:, :2] + 100 * (references[:, 2:] - references[:, :2])
    decoded = c.decode(c.encode(huge, references), references).double()
    ref_w, ref_h = references[:, 2] - references[:, 0], references[:, 3] - references[:, 1]
    torch.testing.assert_close(decoded[:, 2] - decoded[:, 0], ref_w * 1000 / 16, rtol=tol * 10, atol=0)
    torch.testing.assert_close(decoded[:, 3] - decoded[:, 1], ref_h * 1000 / 16, rtol=tol * 10, atol=0)
    centres = huge[:, :2] + huge[:, 2:]
    torch.testing.assert_close(decoded[:, :2] + decoded[:, 2:], centres, rtol=tol, atol=tol * 1e4)
