"""Every architecture exports end to end (minseg/export.py): the torch.export program equals eager bitwise on image
sizes it was not traced with, an image with no detections included, and its ONNX file run in onnxruntime (CPU)
equals eager to float32 rounding with identical discrete outputs (shapes, labels, bool masks).

Random-init weights, small images. A detector's score threshold is set between the best score eager gives the busy
image and the one it gives the plain image, so that one program shows both cases (checked on the eager result).
ONNX tolerance: |onnx - eager| <= 1e-4 * max|eager| + 1e-5 per output (float32 rounding of a different kernel
order: measured up to 2e-7 relative on boxes and 7e-6 on mask probabilities; Panoptic FPN: 1.4e-6 on boxes, 3.8e-6
on scores, 9.4e-7 on sem_seg logits).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves

import minseg
from minseg.export import export_program, panoptic_results, save, to_onnx
from minseg.heads.panoptic_fusion import FusionConfig

ort = pytest.importorskip("onnxruntime")

MASK_RCNN = dict(num_classes=3, min_size=128, max_size=160, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                 box_detections_per_img=10)
YOLACT = dict(num_classes=4, top_k=30, max_detections=20)


def assert_equal(a, b) -> None:
    for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x, y)


def assert_onnx_close(session, inputs, expected) -> None:
    """Run the ONNX session on the flattened inputs; floats to float32 rounding, everything else identical."""
    feeds = [np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x) for x in tree_leaves(inputs)]
    outputs = session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feeds, strict=True)})
    for want, got in zip(tree_leaves(expected), outputs, strict=True):
        want = want.numpy()
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.dtype.kind == "f":
            scale = float(np.abs(want).max()) if want.size else 0.0
            assert np.abs(got - want).max(initial=0.0) <= 1e-4 * scale + 1e-5
        else:
            assert np.array_equal(got, want)


def onnx_session(program, tmp_path):
    path = tmp_path / "model.onnx"
    to_onnx(program).save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def with_threshold(name: str, option: str, best_score, busy, plain, **options):
    """Model `name` whose score threshold `option` lies between the best scores eager gives `busy` and `plain`."""
    torch.manual_seed(0)
    model = minseg.create_model(name, **{option: 0.0}, **options)
    with torch.no_grad():
        hi, lo = float(best_score(model, busy)), float(best_score(model, plain))
    assert hi > lo, "the plain image should score lower than the busy one"
    tuned = minseg.create_model(name, **{option: (hi + lo) / 2}, **options)
    tuned.load_state_dict(model.state_dict())
    return tuned.eval()


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50", "unet_resnet34"])
def test_dense(name, tmp_path):
    torch.manual_seed(0)
    model = minseg.create_model(name, num_classes=5).eval()
    program = export_program(model)  # traced at 2 x 96 x 128
    session = onnx_session(program, tmp_path)
    for shape in [(1, 3, 72, 104), (3, 3, 130, 66)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        assert_equal(program.module()(x), expected)
        assert_onnx_close(session, (x,), expected)


def _rcnn_best(model, image):
    return model([image])[0]["scores"].max()


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_mask_rcnn(name, tmp_path):
    busy, plain = torch.rand(3, 90, 150, generator=torch.Generator().manual_seed(1)), torch.full((3, 140, 110), 0.5)
    model = with_threshold(name, "box_score_thresh", _rcnn_best, busy, plain, **MASK_RCNN)
    program = export_program(model, ([torch.rand(3, 100, 130)],))
    session = onnx_session(program, tmp_path)
    for image, detections in [(busy, True), (plain, False)]:
        with torch.no_grad():
            expected = model([image])
        assert (len(expected[0]["boxes"]) > 0) == detections
        assert_equal(program.module()([image]), expected)
        assert_onnx_close(session, ([image],), expected)


def _panoptic_model():
    """A small Panoptic FPN (3 things, 5 semantic classes, 20 proposals, 10 detections, stuff from 800 px), its
    RoI score threshold between the best scores eager gives a busy and a plain image; with those images. Pixels are
    divided by detectron2's torchvision-style PIXEL_STD: with detectron2's random init and the MSRA default (std 1)
    the untrained logits are so large that every foreground probability underflows to 0, and nothing is detected."""
    torch.manual_seed(0)
    model = minseg.create_model("panoptic_fpn_resnet50", num_classes=3, num_sem_seg_classes=5,
                                fusion=FusionConfig(stuff_area_thresh=800), pixel_std=(57.375, 57.120, 58.395)).eval()
    with torch.no_grad():  # detectron2's mask predictor init (std 0.001) leaves every mask probability within
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.1)  # rounding of the 0.5 threshold
    model.rpn.cfg = replace(model.rpn.cfg, pre_nms_top_n_test=50, post_nms_top_n_test=20)
    busy = {"image": torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1)) * 255, "height": 90,
            "width": 120}
    plain = {"image": torch.full((3, 130, 70), 128.0), "height": 150, "width": 81}  # output size unlike the input's
    model.roi_heads.cfg = replace(model.roi_heads.cfg, detections_per_img=10, score_thresh=0.0)
    with torch.no_grad():
        hi, lo = (float(model([x])[0]["instances"]["scores"].max()) for x in (busy, plain))
    assert hi > lo, "the plain image should score lower than the busy one"
    model.roi_heads.cfg = replace(model.roi_heads.cfg, score_thresh=(hi + lo) / 2)
    return model, busy, plain


def test_panoptic_fpn(tmp_path):
    """Panoptic fusion included: segments_info leaves the graph as tensors, `panoptic_results` makes the dicts."""
    model, busy, plain = _panoptic_model()
    program = export_program(model)  # traced at 96 x 128, output 104 x 120
    session = onnx_session(program, tmp_path)
    for item, detections in [(busy, True), (plain, False)]:
        with torch.no_grad():
            expected, raw = model([item]), program.module()([item])
        assert (len(expected[0]["instances"]["boxes"]) > 0) == detections
        assert expected[0]["segments_info"]  # stuff at least
        assert panoptic_results(raw)[0]["segments_info"] == expected[0]["segments_info"]
        assert_equal([{k: v for k, v in r.items() if k != "segments_info"} for r in raw],
                     [{k: v for k, v in r.items() if k != "segments_info"} for r in expected])
        assert_onnx_close(session, ([item],), raw)


def _yolact_best(model, x):
    return model(x)["conf"][..., 1:].max()


def test_yolact(tmp_path):
    g = torch.Generator().manual_seed(1)
    busy, plain = torch.randn(1, 3, 550, 550, generator=g), torch.zeros(1, 3, 550, 550)
    model = with_threshold("yolact_resnet50", "conf_thresh", _yolact_best, busy, plain, **YOLACT)
    program = export_program(model, (torch.randn(1, 3, 550, 550, generator=g), [(70, 90)]))
    session = onnx_session(program, tmp_path)
    for x, size, detections in [(busy, (100, 80), True), (plain, (50, 130), False)]:
        with torch.no_grad():
            expected = model.postprocess(model(x), [size])
        assert (len(expected[0]["boxes"]) > 0) == detections
        assert_equal(program.module()(x, [size]), expected)
        assert_onnx_close(session, (x, [size]), expected)


class BatchedNMS(torch.nn.Module):
    def forward(self, boxes, scores, idxs):
        return minseg.ops.batched_nms(boxes, scores, idxs, 0.5)


def test_batched_nms_both_paths(tmp_path):
    """The traced batched_nms takes torchvision's offset path up to 1000 boxes and its per-class path above, as
    eager; no boxes too. Boxes on a coarse grid, so many overlap; exact score ties avoided (ONNX's TopK and eager's
    unstable sort may order them differently)."""
    g = torch.Generator().manual_seed(0)

    def case(n):
        xy = torch.randint(0, 40, (n, 2), generator=g).float()
        boxes = torch.cat((xy, xy + torch.randint(4, 20, (n, 2), generator=g)), dim=1)
        return boxes, torch.randperm(n, generator=g).float() / n, torch.randint(0, 5, (n,), generator=g)

    N = torch.export.Dim("N", min=0, max=10_000)
    program = torch.export.export(BatchedNMS(), case(50), dynamic_shapes=({0: N}, {0: N}, {0: N}))
    session = onnx_session(program, tmp_path)
    for n in (0, 300, 1500):
        inputs = case(n)
        expected = minseg.ops.batched_nms(*inputs, 0.5)
        assert_equal(program.module()(*inputs), expected)
        assert_onnx_close(session, inputs, expected)


def test_save_and_cli(tmp_path):
    """`minseg export` writes a loadable pt2 (atomically: nothing else left in the folder); bad input: exit 2."""
    from minseg.cli import main

    out = tmp_path / "fcn.pt2"
    assert main(["export", "--model", "fcn_resnet50", "--format", "pt2", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt2"]
    x = torch.randn(2, 3, 70, 90)
    loaded = torch.export.load(str(out)).module()
    assert loaded(x)["out"].shape == (2, 21, 70, 90)
    assert main(["export", "--model", "nope", "--format", "pt2", str(tmp_path / "x.pt2")]) == 2
    assert main(["export", "--model", "fcn_resnet50", "--weights", str(tmp_path / "missing.safetensors"),
                 "--format", "onnx", str(tmp_path / "x.onnx")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fcn.pt2"]
    with pytest.raises(ValueError):
        save(minseg.create_model("fcn_resnet50"), tmp_path / "x.bin", format="tflite")


def test_traced_forms_equal_eager():
    """The traced-only forms, run eagerly on cases the model test may not reach: adaptive RoIAlign with empty and
    large RoIs, aligned or not, and no RoIs; panoptic fusion with 0..12 overlapping instances, things and stuff."""
    import importlib

    from minseg.heads import panoptic_fusion as fusion
    from minseg.ops.feature_table import feature_table

    roi_align = importlib.import_module("minseg.ops.roi_align")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 30, 40, generator=g)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([160.0, 120.0])
    boxes = torch.cat((xy, xy + torch.rand(60, 2, generator=g) * 80), dim=1)
    boxes[5, 2] = boxes[5, 0]  # empty
    rois = torch.cat((torch.randint(0, 2, (60, 1), generator=g).float(), boxes), dim=1)
    table = feature_table([x], torch.float32)
    for K, aligned in [(60, True), (60, False), (0, True)]:
        r = rois[:K]
        expected = roi_align.roi_align(x, r, (7, 7), 0.25, 0, aligned, impl="cpu")
        got = roi_align._pool_adaptive_traced(table, r, r[:, 0].long() * 1200, torch.full((K,), 30),
                                              torch.full((K,), 40), torch.full((K,), 0.25), (7, 7), aligned)
        assert torch.equal(got.view(K, 7, 7, 8).permute(0, 3, 1, 2), expected)

    cfg = fusion.FusionConfig(stuff_area_thresh=200, overlap_thresh=0.4)
    for K in [0, 1, 5, 12]:
        masks = torch.zeros(K, 40, 50, dtype=torch.bool)
        for k in range(K):
            y, x = torch.randint(0, 40, (2,), generator=g), torch.randint(0, 50, (2,), generator=g)
            masks[k, y.min():y.max() + 1, x.min():x.max() + 1] = True
        scores, labels = torch.rand(K, generator=g), torch.randint(0, 80, (K,), generator=g)
        semantic = torch.randint(0, 6, (40, 50), generator=g) * (torch.rand(40, 50, generator=g) > 0.2)
        panoptic, segments = fusion.combine_semantic_and_instances(scores, labels, masks, semantic, cfg, impl="cpu")
        traced, tensors = fusion._combine_traced(scores, labels, masks, semantic, cfg, 54)
        assert torch.equal(traced, panoptic) and fusion.segments_info_list(tensors) == segments
