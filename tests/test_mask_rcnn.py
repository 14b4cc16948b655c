"""Mask R-CNN v1/v2 against torchvision's own models (seeded random init, peaky classifier bias): identical kept
sets and labels, boxes, scores and 28x28 mask probabilities bitwise on CPU; pasted masks within a few float32 ulps
(ops/masks.py), so equal after thresholding at 0.5 except pixels within that rounding of 0.5.
Plus empty results, a single image, tiny images, the official checkpoints' layout and norms, autocast, CUDA."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import minseg
from minseg.errors import CheckpointError
from minseg_ref.parity_maskrcnn import BAND, MASK_TOLERANCE, TOLERANCE, align_near_ties, build_pair, compare, images

torchvision = pytest.importorskip("torchvision")
NAMES = ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
SMALL = dict(min_size=256, max_size=427, rpn_post_nms_top_n_test=300)  # fewer proposals: lighter heads


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    ref, ours = build_pair(request.param, seed=0, **SMALL)
    return request.param, ref, ours


def run_both(ref, ours, xs):
    with torch.no_grad():
        return ref(xs), ours(xs)


def assert_parity(r: dict, min_detections: int = 1, bitwise: bool = True) -> None:
    assert r["detections"] >= min_detections
    if bitwise:  # CPU: the same kernels in the same order as torchvision up to the pasting
        assert r["boxes"].max_abs == 0 and r["scores"].max_abs == 0, (r["boxes"].max_abs, r["scores"].max_abs)
    assert r["boxes"].max_rel <= TOLERANCE, r["boxes"].max_rel
    assert r["scores"].max_abs <= TOLERANCE, r["scores"].max_abs
    assert r["masks"].max_abs <= MASK_TOLERANCE, r["masks"].max_abs
    assert r["outside_band"] == 0, f"{r['outside_band']} mask pixels differ farther than {BAND} from 0.5"
    assert r["resampled"] == 0, r["resampled"]


def test_batch_of_two_sizes(pair):
    name, ref, ours = pair
    a, b = run_both(ref, ours, images([(240, 320), (200, 300)], seed=1))
    r = compare(a, b)
    assert_parity(r, min_detections=60)  # peaky bias: dozens of detections per image survive
    assert all(d["masks"].shape[-2:] == s for d, s in zip(b, [(240, 320), (200, 300)]))


@pytest.mark.parametrize("name", NAMES)
def test_full_size(name):
    """The default transform (shorter side 800) on a COCO-sized batch."""
    ref, ours = build_pair(name, seed=2)
    r = compare(*run_both(ref, ours, images([(480, 640), (427, 640)], seed=2)))
    assert_parity(r, min_detections=100)


def test_single_image_and_tiny_images(pair):
    name, ref, ours = pair
    r = compare(*run_both(ref, ours, images([(97, 150)], seed=3)))
    assert_parity(r, min_detections=1)
    # images that stay smaller than 32 px after the resize: one padded 32x32 batch
    saved = ref.transform.min_size, ref.transform.max_size, ours.transform
    try:
        ref.transform.min_size, ref.transform.max_size = (16,), 30
        ours.transform = replace(ours.transform, min_size=16, max_size=30)
        a, b = run_both(ref, ours, images([(20, 25), (13, 9)], seed=4))
        compare(a, b)
        assert [d["masks"].shape[-2:] for d in b] == [(20, 25), (13, 9)]
    finally:
        ref.transform.min_size, ref.transform.max_size, ours.transform = saved


@pytest.mark.parametrize("stage", ["box head", "rpn"])
def test_empty_results(pair, stage):
    """Nothing passes the box head's score threshold, or the RPN keeps no proposal at all (its threshold out of
    reach): empty tensors of the right shapes and dtypes, as torchvision's."""
    name, ref, ours = pair
    if stage == "box head":
        ref_head, our_head, thresh = ref.roi_heads, ours.roi_heads, 0.9999
    else:
        ref_head, our_head, thresh = ref.rpn, ours.rpn, 1.1
    saved = ref.transform.min_size, ref.transform.max_size, ref_head.score_thresh, ours.transform, our_head.cfg
    try:
        ref.transform.min_size, ref.transform.max_size, ref_head.score_thresh = (64,), 107, thresh
        ours.transform = replace(ours.transform, min_size=64, max_size=107)
        our_head.cfg = replace(our_head.cfg, score_thresh=thresh)
        a, b = run_both(ref, ours, images([(64, 80), (50, 40)], seed=5))
    finally:
        ref.transform.min_size, ref.transform.max_size, ref_head.score_thresh, ours.transform, our_head.cfg = saved
    for x, y, (h, w) in zip(a, b, [(64, 80), (50, 40)]):
        assert len(x["labels"]) == 0 and len(y["labels"]) == 0
        assert y["boxes"].shape == (0, 4) and y["scores"].shape == (0,) and y["labels"].dtype == torch.int64
        assert y["masks"].shape == (0, 1, h, w)


MANY = dict(min_size=128, max_size=213, rpn_pre_nms_top_n_test=2000, rpn_post_nms_top_n_test=2000)


@pytest.fixture(scope="module")
def many_proposals():
    """v1 on one 120x160 image, up to 2000 proposals per level and per image: (ref, ours, images, {"ref", "ours": the
    proposals each model's RoI heads received}, torchvision's outputs, ours)."""
    ref, ours = build_pair("maskrcnn_resnet50_fpn", seed=0, **MANY)
    seen = {}
    hooks = [m.roi_heads.register_forward_pre_hook(lambda mod, args, key=key: seen.update({key: args[1]}))
             for key, m in (("ref", ref), ("ours", ours))]
    xs = images([(120, 160)], seed=11)
    try:
        a, b = run_both(ref, ours, xs)
    finally:
        for h in hooks:
            h.remove()
    return ref, ours, xs, seen, a, b


def test_thousands_of_proposals(many_proposals):
    """~1500 proposals reach the RoI heads (of 3530 candidates before the RPN's NMS): the same as torchvision's,
    bitwise, and the same 100 detections (the cap), sorted by score, inside the image."""
    _, _, _, seen, a, b = many_proposals
    (theirs,), (proposals,) = seen["ref"], seen["ours"]
    assert len(proposals) >= 1000 and torch.equal(proposals, theirs), (len(proposals), len(theirs))
    assert_parity(compare(a, b), min_detections=100)
    (d,) = b
    assert d["boxes"].shape == (100, 4) and d["scores"].shape == (100,) and d["masks"].shape == (100, 1, 120, 160)
    assert torch.all(d["scores"][:-1] >= d["scores"][1:]) and torch.all(d["scores"] > 0.05)
    x1, y1, x2, y2 = d["boxes"].unbind(1)
    assert torch.all((0 <= x1) & (x1 <= x2) & (x2 <= 160) & (0 <= y1) & (y1 <= y2) & (y2 <= 120))


def test_one_detection(many_proposals):
    """box_detections_per_img=1: shapes [1, 4], [1], [1, 1, H, W], equal to torchvision's and to the best of the
    100 detections (both keep the first of the score-sorted NMS survivors)."""
    ref, ours, xs, _, _, many = many_proposals
    saved = ref.roi_heads.detections_per_img, ours.roi_heads.cfg
    try:
        ref.roi_heads.detections_per_img = 1
        ours.roi_heads.cfg = replace(ours.roi_heads.cfg, detections_per_img=1)
        a, b = run_both(ref, ours, xs)
    finally:
        ref.roi_heads.detections_per_img, ours.roi_heads.cfg = saved
    r = compare(a, b)
    assert_parity(r)
    (d,) = b
    assert r["detections"] == 1 and d["labels"].dtype == torch.int64
    assert d["boxes"].shape == (1, 4) and d["scores"].shape == (1,) and d["masks"].shape == (1, 1, 120, 160)
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(d[key], many[0][key][:1]), key


def test_official_v1_layout_and_frozen_eps0():
    """The official v1 file: pre-0.13 key names, FrozenBatchNorm2d with eps set to 0 after loading. A torchvision
    model built that way (random frozen statistics) converts to norm="frozen", norm_eps=0.0 and matches."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(7)
    ref = MaskRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=91, min_size=160,
                   max_size=267).eval()
    g = torch.Generator().manual_seed(7)
    for m in ref.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = 0.0  # torchvision's overwrite_eps(model, 0.0) for COCO_V1
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
    with torch.no_grad():
        ref.roi_heads.box_predictor.cls_score.bias[1] += 6.0
    state = ref.state_dict()
    legacy = {}
    for k, v in state.items():  # the names of maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"mask_head.{i}.0.", f"mask_head.mask_fcn{i + 1}.")
            k = k.replace(f"inner_blocks.{i}.0.", f"inner_blocks.{i}.").replace(f"layer_blocks.{i}.0.", f"layer_blocks.{i}.")
        legacy[k] = v
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn1.weight" in legacy
    from minseg.convert.torchvision import convert

    converted, overrides = convert(legacy, "maskrcnn_resnet50_fpn")
    assert overrides == {"num_classes": 91, "norm": "frozen", "norm_eps": 0.0}
    assert converted.keys() == minseg.convert("torchvision", state, arch="maskrcnn_resnet50_fpn").keys()
    ours = minseg.create_model("maskrcnn_resnet50_fpn", min_size=160, max_size=267)  # defaults: frozen, eps 0
    ours.load_state_dict(converted, strict=True)
    assert_parity(compare(*run_both(ref, ours, images([(120, 160), (100, 90)], seed=7))))


def test_converter_refuses_foreign_keys():
    ref, _ = build_pair("maskrcnn_resnet50_fpn", seed=0, peaky=False, min_size=160)
    state = dict(ref.state_dict())
    state["roi_heads.keypoint_head.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="keypoint_head"):
        minseg.convert("torchvision", state, arch="maskrcnn_resnet50_fpn")
    with pytest.raises(CheckpointError):  # a v1 file is not a v2 model
        minseg.convert("torchvision", ref.state_dict(), arch="maskrcnn_resnet50_fpn_v2")


def test_create_model_options():
    model = minseg.create_model("maskrcnn_resnet50_fpn_v2", num_classes=3, box_detections_per_img=7,
                                rpn_post_nms_top_n_test=50, min_size=64, max_size=96)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.cfg.detections_per_img == 7 and model.rpn.cfg.post_nms_top_n_test == 50
    with pytest.raises(TypeError, match="box_score_tresh"):
        minseg.create_model("maskrcnn_resnet50_fpn", box_score_tresh=0.5)
    with pytest.raises(ValueError):
        model([torch.zeros(1, 8, 8)])
    with pytest.raises(TypeError):
        model([torch.zeros(3, 8, 8, dtype=torch.uint8)])


def test_bfloat16_autocast_and_predict():
    ours = minseg.create_model("maskrcnn_resnet50_fpn", min_size=64, max_size=107)
    with torch.no_grad():
        ours.roi_heads.box_predictor.cls_score.bias[1] += 8.0
    xs = images([(64, 80)], seed=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(xs)[0]
    assert len(out["labels"]) > 0 and torch.isfinite(out["boxes"].float()).all() and out["labels"].dtype == torch.int64
    assert out["masks"].shape[1:] == (1, 64, 80)
    rgb = (images([(40, 50)], seed=9)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pred = ours.predict(rgb)
    assert len(pred) == 1 and pred[0]["masks"].shape[-2:] == (40, 50)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_torchvision_cuda(name):
    ref, ours = build_pair(name, seed=0, **SMALL)
    ref, ours = ref.cuda(), ours.cuda()
    xs = [x.cuda() for x in images([(240, 320), (200, 300)], seed=1)]
    # float32 parity: TF32 convolutions round their inputs to 10 bits, which turns a rounding-level difference in
    # the pooled features into ~1e-3 differences downstream (both sides use TF32 by default, so a user comparing
    # them sees that much)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = run_both(ref, ours, xs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # CUDA kernels (RoIAlign above all) round in their own order: float32 rounding, not bitwise, so detections
    # whose scores tie to within 1e-5 may come out swapped, and a mask may be pasted one pixel off where its box
    # sits on an integer edge (counted by compare(), not compared)
    a = [{k: v.cpu() for k, v in d.items()} for d in a]
    b, moved = align_near_ties(a, [{k: v.cpu() for k, v in d.items()} for d in b], tol=1e-5)
    r = compare(a, b)
    assert r["detections"] >= 60 and moved <= 4, (r, moved)
    assert r["boxes"].max_rel <= 1e-5 and r["scores"].max_abs <= 1e-5, r
    assert r["masks"].max_abs <= 1e-3, r["masks"].max_abs
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = ours(xs)
    assert all(torch.isfinite(d["boxes"].float()).all() for d in out)


def test_batch_equals_one_at_a_time(pair):
    """Images that resize to the same padded size: the batch gives each image what it gets alone (torchvision pads
    a batch to its largest image, so with different sizes the padding, and with it the result, would differ)."""
    name, _, ours = pair
    xs = images([(240, 320), (240, 320)], seed=10)
    with torch.no_grad():
        batch = ours(xs)
        alone = [ours([x])[0] for x in xs]
    for b, a in zip(batch, alone):
        assert torch.equal(b["labels"], a["labels"]) and len(b["labels"]) > 0
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(b["masks"], a["masks"], rtol=0, atol=1e-3)
