"""YOLACT against dbolya/yolact: every stage of the recorded yolact_resnet50 fixture (floats within 1e-5 rel,
discrete outputs identical up to a measured allowance; bitwise where a canary shows the recording's kernels),
Detect and postprocess on the recorded network outputs, batches, odd sizes, zero detections and autocast, the converter's rules and refusals, the checkpoint structure of every variant (yolact_resnet101 =
yolact_base, im700, darknet53) as the spec describes it, and YOLACT's box ops against direct loops."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import minseg
from minseg.convert import convert_with_overrides
from minseg.errors import CheckpointError
from minseg_ref import parity_yolact as ref
from minseg_ref.common import diff, load_synth
from minseg_ref.parity_yolact import meta_state, yolact_keys

from conftest import cuda


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: the recorded outputs, the synthetic checkpoint, the converted model

@pytest.fixture(scope="module")
def recorded():
    try:
        return ref.load_fixture()
    except FileNotFoundError as e:
        pytest.skip(f"YOLACT parity fixture absent: {e}")


@pytest.fixture(scope="module")
def synth_state(recorded):
    _, meta, folder = recorded
    return ref.synthetic_state(folder, meta)


@pytest.fixture(scope="module")
def model(synth_state):
    torch.set_num_threads(2)
    return ref.build_model(state=synth_state)


@pytest.fixture(scope="module")
def outputs():
    """The network outputs of both recorded cases, as stage_pairs() leaves them (for the allowance table)."""
    return {}


@pytest.fixture(scope="module")
def pairs(model, recorded, outputs):
    return ref.stage_pairs(model, recorded[0], outputs)


@pytest.fixture(scope="module")
def allowances(model, recorded, pairs, outputs):
    return ref.allowances(model, recorded[0], outputs)


@pytest.fixture(scope="module")
def small_outputs(model, recorded):
    """Network outputs of a 2-image batch at an odd, non-square size (the fixture input, cropped and flipped)."""
    x = recorded[0]["tensor.x"][..., :321, :387]
    with torch.no_grad():
        return x, model(torch.cat([x, x.flip(-1)]))


# ---------------------------------------------------------------------------------------------------------------------
# parity with the recorded original

def test_every_recorded_stage_is_compared(pairs, recorded):
    assert list(pairs) == ref.STAGES
    recorded_outputs = {k.replace(".masks_packbits", ".masks") for k in recorded[0] if k not in ("tensor.x", "image.rgb")}
    assert recorded_outputs <= set(ref.STAGES)


@pytest.mark.parametrize("stage", ref.STAGES)
def test_fixture_stage(pairs, allowances, stage):
    """Float stages within TOLERANCE relative to their scale; discrete stages (classes, int boxes, masks, mask sizes)
    identical but for the measured allowance (values within rounding of a threshold). Bitwise where this machine
    has the recording's kernels: the next test."""
    s = ref.compare_stage(stage, *pairs[stage])
    assert not ref.failures([s], ref.TOLERANCE, allowances), s


def test_fixture_bitwise_where_the_kernels_match(model, recorded, pairs):
    """Where the canary (the head, protonet and Detect re-run from the recording's own inputs) is bitwise, this CPU
    computes what the recording's did, and then every stage is bitwise: minseg follows the original's op order."""
    same_kernels, why = ref.canary(model, recorded[0])
    if not same_kernels:
        pytest.skip(f"this CPU's kernels round otherwise than the recording's ({why}); floats are checked within "
                    f"{ref.TOLERANCE:g} rel above")
    assert [name for name, (ours, expected) in pairs.items() if not torch.equal(ours.to(expected.dtype), expected)] == []


def test_canary_is_bitwise_on_its_own_forward(model, recorded, outputs, pairs):
    """The canary re-runs exactly the forward's steps: fed this machine's own P3..P7 and network outputs in place of
    the recording's, it reproduces them bitwise, so a canary that differs is the kernels, not the harness."""
    fx, out = dict(recorded[0]), outputs["tensor"]
    fx.update({f"tensor.P{i + 3}": p for i, p in enumerate(outputs["tensor.levels"])})
    fx.update({f"tensor.{k}": out[k] for k in ("loc", "conf", "mask", "priors", "proto")})
    fx["tensor.det.box"] = model.detect(out)[0]["boxes_rel"]
    assert ref.canary(model, fx) == (True, "")


def test_allowance_table_is_small_and_measured(allowances):
    """Every discrete stage with a postprocess threshold has its allowance, and each is a few values: the measured
    count of values within BAND of a threshold, not a blanket tolerance."""
    assert {s for s in ref.STAGES if s.endswith((".classes", ".boxes", ".masks", ".mask_sums"))} == set(allowances)
    assert all(a.limit <= 20 and a.reason for a in allowances.values()), ref.allowance_table(allowances)


def test_verdict_allows_only_the_measured_values():
    """A float stage beyond the tolerance fails; a discrete stage fails when more values differ than its allowance
    (none without one); bitwise stages always pass."""
    from minseg_ref.common import Allowance, Stage, failures

    stages = [Stage("f", False, 1e-3, 2e-5), Stage("g", False, 1e-3, 1e-5), Stage("d", False, differing=3, discrete=True),
              Stage("e", False, differing=1, discrete=True), Stage("b", True, discrete=True)]
    assert failures(stages, 1e-5, {"e": Allowance(1, "one mask pixel within 1e-5 of 0.5")}) == \
        ["f (max rel 2e-05)", "d (3 values differ, 0 allowed)"]


def test_detect_and_postprocess_on_recorded_outputs(model, recorded, allowances):
    """Detect and postprocess fed the original's own network outputs. Bitwise where that holds by construction on
    every CPU: classes, scores and coefficients are gathers of the recorded tensors. The boxes go through exp, which
    is not correctly rounded and differs by CPU (MKL dispatches on the CPU itself: 2 of 400 values differ by 1 ulp,
    2.98e-8, on an AVX-512 CPU, also with ATEN_CPU_CAPABILITY=avx2): within TOLERANCE. Postprocessed discrete outputs
    identical but for the allowance."""
    fx = recorded[0]
    outputs = recorded_outputs(fx)
    pairs = ref.detection_pairs("tensor.det", model.detect(outputs)[0], fx)
    assert [k for k in ("tensor.det.class", "tensor.det.score", "tensor.det.mask") if not torch.equal(*pairs[k])] == []
    for prefix, (h, w) in ref.POST_SIZES.items():
        (post,) = model.postprocess(outputs, [(h, w)])
        pairs.update(ref.postprocessed_pairs(f"tensor.{prefix}", post, fx, w, f"tensor.{prefix}.masks_packbits" in fx))
    assert ref.failures(ref.report(pairs), ref.TOLERANCE, allowances) == []


# ---------------------------------------------------------------------------------------------------------------------
# batches, odd sizes, zero detections, autocast, CUDA

def test_batch_equals_one_at_a_time(model, small_outputs):
    x, batched = small_outputs
    sizes = [(100, 120), (57, 33)]
    together = model.postprocess(batched, sizes)
    with torch.no_grad():
        for i, image in enumerate((x, x.flip(-1))):
            single = model(image)
            for key in ("loc", "conf", "mask", "proto"):
                assert diff(batched[key][i:i + 1], single[key])[1] <= ref.TOLERANCE, key
            assert torch.equal(batched["priors"], single["priors"])
            (alone,) = model.postprocess(single, sizes[i:i + 1])
            for key in ("labels", "masks"):
                assert torch.equal(together[i][key], alone[key]), key
            for key in ("boxes", "scores"):
                assert diff(together[i][key], alone[key])[1] <= ref.TOLERANCE, key


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (551, 3)])
def test_postprocess_odd_sizes(model, small_outputs, size):
    h, w = size
    _, outputs = small_outputs
    out = model.postprocess(outputs, [size, (h + 1, w)])
    for det in out:
        K = det["labels"].shape[0]
        assert K > 0 and det["boxes"].shape == (K, 4) and det["scores"].shape == (K,)
        assert det["labels"].dtype == torch.int64 and 0 <= det["labels"].min() and det["labels"].max() <= 79
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        x1, y1, x2, y2 = det["boxes"].unbind(1)
        assert torch.all((0 <= x1) & (x1 <= x2) & (x2 <= w) & (0 <= y1) & (y1 <= y2))
    assert out[0]["masks"].shape == (out[0]["labels"].shape[0], h, w) and out[0]["masks"].dtype == torch.bool
    assert out[1]["masks"].shape[1:] == (h + 1, w)
    assert torch.all(out[0]["boxes"][:, 3] <= h) and torch.all(out[1]["boxes"][:, 3] <= h + 1)


def test_postprocess_rejects_wrong_number_of_sizes(model, small_outputs):
    with pytest.raises(ValueError, match="sizes"):
        model.postprocess(small_outputs[1], [(10, 10)])


def test_zero_detections(model, small_outputs):
    """A background logit far above every class: no prior passes the 0.05 threshold; empty, well-typed outputs."""
    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.head.conf.bias.view(3, 81)[:, 0] = 100.0  # channel = anchor * 81 + class
        outputs = silent(small_outputs[0][..., :64, :96])
    assert all(d["labels"].numel() == 0 for d in silent.detect(outputs))
    (det,) = silent.postprocess(outputs, [(30, 41)])
    assert det["boxes"].shape == (0, 4) and det["boxes"].dtype == torch.float32
    assert det["labels"].shape == (0,) and det["labels"].dtype == torch.int64
    assert det["scores"].shape == (0,)
    assert det["masks"].shape == (0, 30, 41) and det["masks"].dtype == torch.bool


def test_threshold_override_gives_zero_detections(model, small_outputs):
    strict = minseg.create_model("yolact_resnet50", conf_thresh=1.0)  # no softmax score exceeds 1
    strict.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        (det,) = strict.postprocess(strict(small_outputs[0][..., :64, :96]), [(20, 30)])
    assert det["labels"].numel() == 0 and det["masks"].shape == (0, 20, 30)


def recorded_outputs(fx: dict) -> dict[str, torch.Tensor]:
    return {k: fx[f"tensor.{k}"] for k in ("loc", "conf", "mask", "priors", "proto")}


def with_cfg(model, **changes):
    other = copy.deepcopy(model)
    other.cfg = dataclasses.replace(model.cfg, **changes)
    return other


def test_thousands_of_candidates(model, recorded, allowances):
    """The recorded outputs send 19137 of 19248 priors past conf_thresh, 200 per class into Fast NMS; with
    max_detections=2000 all 2000 come out, well formed. The cap only cuts the score-sorted survivors, so the
    first 100 are the original's 100 detections: classes, scores and coefficients bitwise (gathers of the recorded
    tensors), boxes within TOLERANCE (exp), postprocessed boxes and masks identical but for the allowance."""
    fx = recorded[0]
    outputs = recorded_outputs(fx)
    assert (outputs["conf"][0, :, 1:].max(1).values > model.cfg.conf_thresh).sum() > 19000
    many = with_cfg(model, max_detections=2000)
    (det,) = many.detect(outputs)
    assert det["labels"].shape == (2000,) and det["coeffs"].shape == (2000, 32)
    first = ref.detection_pairs("tensor.det", {k: v[:100] for k, v in det.items()}, fx)
    assert [k for k in ("tensor.det.class", "tensor.det.score", "tensor.det.mask") if not torch.equal(*first[k])] == []
    assert ref.failures(ref.report(first), ref.TOLERANCE, allowances) == []
    (post,) = many.postprocess(outputs, [(120, 160)])
    assert post["boxes"].shape == (2000, 4) and post["masks"].shape == (2000, 120, 160)
    assert torch.all(post["scores"][:-1] >= post["scores"][1:])
    assert post["labels"].min() >= 0 and post["labels"].max() <= 79
    x1, y1, x2, y2 = post["boxes"].unbind(1)
    assert torch.all((0 <= x1) & (x1 <= x2) & (x2 <= 160) & (0 <= y1) & (y1 <= y2) & (y2 <= 120))
    pairs = ref.postprocessed_pairs("tensor.post160x120", {k: v[:100] for k, v in post.items()}, fx, 160, True)
    assert ref.failures(ref.report(pairs), ref.TOLERANCE, allowances) == []


def test_one_detection(model, recorded, allowances):
    """max_detections=1: shapes [1, 4], [1], [1, H, W]; the original's best detection (as in the test above)."""
    fx = recorded[0]
    outputs = recorded_outputs(fx)
    one = with_cfg(model, max_detections=1)
    (det,) = one.detect(outputs)
    first = {k: v[:1] for k, v in fx.items() if k.startswith(("tensor.det.", "tensor.post160x120."))}
    det_pairs = ref.detection_pairs("tensor.det", det, first)
    assert [k for k in ("tensor.det.class", "tensor.det.score", "tensor.det.mask") if not torch.equal(*det_pairs[k])] == []
    assert ref.failures(ref.report(det_pairs), ref.TOLERANCE, allowances) == []
    (post,) = one.postprocess(outputs, [(120, 160)])
    assert post["boxes"].shape == (1, 4) and post["labels"].shape == (1,) and post["scores"].shape == (1,)
    assert post["masks"].shape == (1, 120, 160) and post["masks"].dtype == torch.bool
    pairs = ref.postprocessed_pairs("tensor.post160x120", post, first, 160, True)
    assert ref.failures(ref.report(pairs), ref.TOLERANCE, allowances) == []


def test_cross_class_nms_option(model, small_outputs):
    cc = copy.deepcopy(model)
    cc.cfg = dataclasses.replace(model.cfg, cross_class_nms=True)
    (det,) = cc.detect({k: v[:1] if k != "priors" else v for k, v in small_outputs[1].items()})
    K = det["labels"].shape[0]
    assert 0 < K <= 200 and torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_predict_from_file(model, recorded, pairs, tmp_path):
    from PIL import Image

    rgb = recorded[0]["image.rgb"].numpy()
    Image.fromarray(rgb).save(tmp_path / "image.png")
    (from_path,) = model.predict(str(tmp_path / "image.png"))
    expected, _ = pairs["image.predict.masks"]
    assert torch.equal(from_path["masks"], expected)
    assert torch.equal(from_path["labels"], pairs["image.predict.classes"][0])


def test_preprocess_any_size(model):
    x = model.preprocess(np.full((7, 13, 3), 128, dtype=np.uint8))
    assert x.shape == (1, 3, 550, 550)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(128 - 123.68) / 58.40, (128 - 116.78) / 57.12,
                                                            (128 - 103.94) / 57.38]))


def test_autocast_bfloat16_cpu(model, small_outputs):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(small_outputs[0][..., :128, :160])
        (det,) = model.postprocess(outputs, [(40, 50)])
    assert outputs["conf"].dtype == torch.float32
    assert det["boxes"].dtype == torch.float32 and det["masks"].dtype == torch.bool and det["masks"].shape[1:] == (40, 50)


@cuda
def test_cuda_matches_recorded(model, recorded):
    """On CUDA (TF32 off): float stages near the original's CPU numbers, identical detections."""
    fx = recorded[0]
    gpu = copy.deepcopy(model).cuda()
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            out = gpu(fx["tensor.x"].cuda())
            (post,) = gpu.postprocess(out, [(120, 160)])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
    for key in ("loc", "conf", "mask", "proto"):
        assert diff(out[key].cpu(), fx[f"tensor.{key}"])[1] <= 1e-4, key
    assert torch.equal(out["priors"].cpu(), fx["tensor.priors"])
    assert torch.equal(post["labels"].cpu(), fx["tensor.post160x120.classes"])
    agree = (post["masks"].cpu() == ref.unpack_masks(fx["tensor.post160x120.masks_packbits"], 160)).float().mean()
    assert agree > 0.999


@cuda
def test_cuda_autocast_float16(model, recorded):
    gpu = copy.deepcopy(model).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        out = gpu(recorded[0]["tensor.x"][..., :200, :300].cuda())
        (det,) = gpu.postprocess(out, [(50, 70)])
    assert det["masks"].shape[1:] == (50, 70) and det["boxes"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# converter

def zeros_state(keys) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in keys}


@pytest.fixture(scope="module")
def r50_keys():
    """yolact_resnet50's checkpoint keys as the spec describes them (checked against the fixture's keys.tsv below),
    so the converter tests run without the fixture."""
    return yolact_keys("resnet50")


def test_convert_without_num_batches_tracked(r50_keys, synth_state):
    with_counters = minseg.convert("yolact", synth_state, arch="yolact_resnet50")
    without = {k: v for k, v in synth_state.items() if not k.endswith("num_batches_tracked")}
    assert len(without) == len(synth_state) - 53
    converted = minseg.convert("yolact", without, arch="yolact_resnet50")
    assert converted.keys() == with_counters.keys()
    assert all(torch.equal(converted[k], with_counters[k]) for k in converted)


def test_convert_legacy_file_format(synth_state, tmp_path):
    path = tmp_path / "yolact_legacy.pth"
    torch.save(synth_state, path, _use_new_zipfile_serialization=False)
    converted = minseg.convert("yolact", path, arch="yolact_resnet50")
    expected = minseg.convert("yolact", synth_state, arch="yolact_resnet50")
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_convert_drops_the_originals_load_time_keys(r50_keys):
    state = zeros_state(r50_keys)
    assert "semantic_seg_conv.weight" in state
    state["backbone.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)   # old torchvision-style name
    state["fpn.downsample_layers.2.weight"] = torch.zeros(256, 256, 3, 3)  # v1.0 extra downsample layer
    state["fpn.downsample_layers.2.bias"] = torch.zeros(256)
    converted = minseg.convert("yolact", state, arch="yolact_resnet50")
    model_keys = minseg.create_model("yolact_resnet50").state_dict().keys()
    assert converted.keys() == model_keys
    assert torch.equal(converted["semantic.weight"], state["semantic_seg_conv.weight"])  # kept: training needs it


def test_convert_rename_map(synth_state):
    converted = minseg.convert("yolact", synth_state, arch="yolact_resnet50")
    for theirs, ours in [("fpn.lat_layers.0.weight", "fpn.lateral.2.weight"), ("fpn.pred_layers.2.bias", "fpn.output.0.bias"),
                         ("fpn.downsample_layers.1.weight", "fpn.p7.weight"), ("proto_net.8.weight", "protonet.up_conv.weight"),
                         ("backbone.layers.3.0.downsample.1.running_var", "backbone.layer4.0.downsample.1.running_var"),
                         ("prediction_layers.0.mask_layer.bias", "head.mask.bias")]:
        assert torch.equal(converted[ours], synth_state[theirs]), theirs


def test_convert_unknown_key_is_named(r50_keys):
    state = zeros_state(r50_keys)
    state["prediction_layers.0.score_layer.weight"] = torch.zeros(3, 256, 3, 3)
    with pytest.raises(CheckpointError, match="score_layer"):
        minseg.convert("yolact", state, arch="yolact_resnet50")


def test_convert_refuses_yolact_plus_plus(r50_keys):
    state = zeros_state(r50_keys)
    state["maskiou_net.maskiou_net.0.weight"] = torch.zeros(8, 1, 3, 3)
    with pytest.raises(CheckpointError, match="YOLACT\\+\\+"):
        minseg.convert("yolact", state, arch="yolact_resnet50")


def test_convert_missing_key_is_named(r50_keys):
    state = zeros_state(r50_keys)
    del state["proto_net.10.bias"]
    with pytest.raises(CheckpointError, match="protonet.out.bias"):
        minseg.convert("yolact", state, arch="yolact_resnet50")


def test_convert_wrong_depth_refused(r50_keys):
    with pytest.raises(CheckpointError, match="ResNet-50 backbone.*arch='yolact_resnet50'"):
        minseg.convert("yolact", zeros_state(r50_keys), arch="yolact_resnet101")
    with pytest.raises(CheckpointError, match="ResNet-101 backbone"):
        minseg.convert("yolact", meta_state(yolact_keys("resnet101")), arch="yolact_resnet50")


def test_convert_reads_num_classes_from_shapes(r50_keys):
    state = zeros_state(r50_keys)
    state["prediction_layers.0.conf_layer.weight"] = torch.zeros(3 * 21, 256, 3, 3)
    state["prediction_layers.0.conf_layer.bias"] = torch.zeros(3 * 21)
    state["semantic_seg_conv.weight"] = torch.zeros(20, 256, 1, 1)  # the original's semantic head: one per class
    state["semantic_seg_conv.bias"] = torch.zeros(20)
    converted, overrides = convert_with_overrides("yolact", state, arch="yolact_resnet50")
    assert overrides == {"num_classes": 21}
    minseg.create_model("yolact_resnet50", num_classes=21).load_state_dict(converted, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# ResNet-101 (yolact_base): structure from the spec's key list

def test_key_list_derivation_matches_recorded_r50(recorded):
    assert yolact_keys("resnet50") == load_synth().read_keys(recorded[2] / "keys.tsv")


@pytest.mark.parametrize("arch", list(ref.VARIANTS))
def test_every_checkpoint_key_consumed(arch):
    """Every key of the original's checkpoint (spec section 5.2) is renamed or dropped by a named rule; entry and
    parameter counts as spec section 0 gives them; the original's output shapes (a meta-device forward)."""
    assert ref.structure_problems(arch) == []
    backbone = ref.VARIANTS[arch][0]
    other = next(a for a, v in ref.VARIANTS.items() if v[0] != backbone)
    with pytest.raises(CheckpointError, match="backbone; convert it with arch="):
        minseg.convert("yolact", meta_state(yolact_keys(backbone)), arch=other)


def test_im700_priors():
    model = minseg.create_model("yolact_im700")
    assert model.cfg.scales == (30, 61, 122, 244, 488)
    priors = model.priors([(88, 88), (44, 44), (22, 22), (11, 11), (6, 6)], torch.device("cpu"))
    assert priors.shape == (30963, 4) and priors[0, 2].item() == pytest.approx(30 / 700)


def test_darknet_preprocess_is_to_float():
    model = minseg.create_model("yolact_darknet53")
    x = model.preprocess(np.full((5, 6, 3), 51, dtype=np.uint8))
    assert x.shape == (1, 3, 550, 550) and torch.allclose(x, torch.full_like(x, 0.2))


def test_r101_runs_and_detects_shapes():
    model = minseg.create_model("yolact_resnet101").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    P = sum(h * w * 3 for h, w in [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)])
    assert out["loc"].shape == (1, P, 4) and out["conf"].shape == (1, P, 81) and out["proto"].shape == (1, 24, 32, 32)


# ---------------------------------------------------------------------------------------------------------------------
# YOLACT box ops against direct loops

def test_priors_equal_the_originals_loop():
    """make_priors paraphrased: Python float64 loop over (y, x, ratio), square sides, one float32 cast at the end."""
    from minseg.ops import yolact_priors

    sizes, scales, ratios = [(5, 7), (3, 2)], (24, 48), (1, 1 / 2, 2)
    data = []
    for (h, w), scale in zip(sizes, scales):
        for j in range(h):
            for i in range(w):
                for a in ratios:
                    side = scale * math.sqrt(a) / 550
                    data.append([(i + 0.5) / w, (j + 0.5) / h, side, side])
    assert torch.equal(yolact_priors(sizes, scales, ratios, 550), torch.tensor(data, dtype=torch.float32))
    torch.testing.assert_close(yolact_priors([(1, 1)], (24,), ratios, 550)[:, 2],
                               torch.tensor([0.0436364, 0.0308556, 0.0617111]), rtol=0, atol=1e-7)  # spec 2.6 table


def test_decode_float_order():
    """x2 = x1 + w (not cx + w / 2) and the variance applied before the prior size, in float32."""
    from minseg.ops import decode_yolact

    g = torch.Generator().manual_seed(0)
    loc, priors = torch.randn(50, 4, generator=g), torch.rand(50, 4, generator=g)
    boxes = decode_yolact(loc, priors)
    cx = priors[:, 0] + loc[:, 0] * 0.1 * priors[:, 2]
    w = priors[:, 2] * torch.exp(loc[:, 2] * 0.2)
    assert torch.equal(boxes[:, 0], cx - w / 2) and torch.equal(boxes[:, 2], w + (cx - w / 2))
    assert torch.equal(decode_yolact(loc[None].expand(3, 50, 4), priors)[2], boxes)


def test_crop_masks_matches_loop():
    from minseg.ops import crop_masks

    g = torch.Generator().manual_seed(1)
    masks = torch.rand(9, 11, 4, generator=g)
    boxes = torch.tensor([[0.2, 0.1, 0.5, 0.9], [0.9, 0.8, 0.1, 0.3], [-0.2, -0.1, 1.3, 1.2], [0.5, 0.5, 0.5, 0.5]])
    out = crop_masks(masks, boxes)
    for k, (bx1, by1, bx2, by2) in enumerate(boxes.tolist()):
        x1, x2 = max(min(bx1, bx2) * 11 - 1, 0), min(max(bx1, bx2) * 11 + 1, 11)
        y1, y2 = max(min(by1, by2) * 9 - 1, 0), min(max(by1, by2) * 9 + 1, 9)
        for r in range(9):
            for c in range(11):
                inside = x1 <= c < x2 and y1 <= r < y2
                assert out[r, c, k] == (masks[r, c, k] if inside else 0), (k, r, c)


def test_resnet101_backbone_equals_torchvision_layout():
    """The YOLACT flavour of the shared ResNet is torchvision's layout with plain BatchNorm: loading a torchvision
    resnet101's weights (random, with non-trivial BN statistics) gives the same stage outputs bitwise."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet101(weights=None).eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.2, 0.4)
    backbone = minseg.create_model("yolact_resnet101").backbone
    backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(1, 3, 75, 99)
    with torch.no_grad():
        ours = backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for name, layer in zip(("c2", "c3", "c4", "c5"), (tv.layer1, tv.layer2, tv.layer3, tv.layer4)):
            y = layer(y)
            assert torch.equal(ours[name], y), name


def test_converted_weights_round_trip(synth_state, tmp_path):
    """convert -> minseg .safetensors -> create_model(weights=...): every tensor as converted, in eval mode."""
    from minseg.weights import save_weights

    converted, overrides = convert_with_overrides("yolact", synth_state, arch="yolact_resnet50")
    save_weights(converted, tmp_path / "y.safetensors", arch="yolact_resnet50", source="yolact", overrides=overrides)
    model = minseg.create_model("yolact_resnet50", weights=str(tmp_path / "y.safetensors"))
    assert not model.training
    assert all(torch.equal(v, converted[k]) for k, v in model.state_dict().items())


def test_network_exports_with_torch_export():
    """The tensor part (everything before Detect) exports: the original's could not (yolact#74)."""
    model = minseg.create_model("yolact_resnet50")
    x = torch.randn(1, 3, 96, 128)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        expected, got = model(x), exported(x)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_predict_with_a_bfloat16_model():
    """A model cast with .to(bfloat16): predict feeds it its own dtype and still returns float32 boxes, bool masks."""
    torch.manual_seed(0)
    model = minseg.create_model("yolact_resnet50").to(torch.bfloat16)
    with torch.no_grad():
        model.head.conf.bias.view(3, 81)[:, 1] = 10.0  # class 0 (person) everywhere: detections to postprocess
    (det,) = model.predict(np.zeros((40, 50, 3), dtype=np.uint8))
    assert det["labels"].numel() > 0 and det["labels"][0] == 0 and det["scores"][0] > 0.5
    assert det["boxes"].dtype == torch.float32 and det["masks"].shape[1:] == (40, 50) and det["masks"].dtype == torch.bool
