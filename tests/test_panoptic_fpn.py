"""panoptic_fpn_resnet50 / panoptic_fpn_resnet101 against detectron2: every stage of both recorded cases (floats
within 1e-5 rel, discrete outputs identical up to a measured allowance; bitwise where a canary shows the
recording's kernels), the
detectron2 checkpoint reader (safe unpickling, .pth, legacy keys), the R-101 key list derived from the spec, and
eval-time edge cases (batches of different sizes, no detections, no stuff, autocast, CUDA)."""
import os
import pickle
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch

import minseg
from minseg.errors import CheckpointError
from minseg_ref import parity_panoptic as ref
from minseg_ref.common import load_synth

from conftest import cuda

CASES = ("model", "predictor")


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: the recorded outputs, the synthetic checkpoint, the converted model

@pytest.fixture(scope="module")
def recorded():
    try:
        return ref.load_fixture()
    except FileNotFoundError as e:
        pytest.skip(f"Panoptic FPN parity fixture absent: {e}")


@pytest.fixture(scope="module")
def r50_keys(recorded):
    return ref.read_keys(recorded[2])


@pytest.fixture(scope="module")
def synth_state(recorded, r50_keys):
    return ref.synthetic_state(r50_keys, recorded[1])


@pytest.fixture(scope="module")
def converted(synth_state):
    return ref.convert_synthetic(synth_state)


@pytest.fixture(scope="module")
def model(converted):
    torch.set_num_threads(2)
    model = minseg.create_model("panoptic_fpn_resnet50")
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def outputs(model, recorded):
    """Each case's (output, captured stages), as run_report() leaves them."""
    return {case: ref.run_case(model, recorded[0], case) for case in CASES}


@pytest.fixture(scope="module")
def pairs(recorded, outputs):
    out = {}
    for case in CASES:
        out.update(ref.stage_pairs(recorded[0], case, *outputs[case]))
    return out


@pytest.fixture(scope="module")
def allowances(model, recorded, outputs):
    return ref.allowances(model, recorded[0], outputs)


# ---------------------------------------------------------------------------------------------------------------------
# parity with the recorded original

def test_every_recorded_stage_is_compared(pairs, recorded):
    inputs = {"model.image", "predictor.rgb"}
    assert set(recorded[0]) - inputs == set(pairs)


def test_fixture_stages(pairs, allowances):
    """Float stages within TOLERANCE relative to their scale; discrete outputs (proposal order up to near-tie swaps,
    classes, masks, panoptic map, segments) identical but for the measured allowance (values within rounding of a
    threshold). Bitwise where this machine has the recording's kernels: the next test."""
    stages = [ref.compare_stage(name, a, b) for name, (a, b) in pairs.items()]
    assert ref.failures(stages, ref.TOLERANCE, allowances) == [], ref.allowance_table(allowances)


def test_fixture_bitwise_where_the_kernels_match(model, recorded, pairs):
    """Where the canary (the sem-seg head and the RPN re-run from the recording's own FPN features) is bitwise, this
    CPU computes what the recording's did, and then every stage is bitwise."""
    same_kernels, why = ref.canary(model, recorded[0])
    if not same_kernels:
        pytest.skip(f"this CPU's kernels round otherwise than the recording's ({why}); floats are checked within "
                    f"{ref.TOLERANCE:g} rel above")
    assert [name for name, (ours, expected) in pairs.items() if not torch.equal(ours.to(expected.dtype), expected)] == []


def test_canary_is_bitwise_on_its_own_forward(model, recorded, outputs):
    """The canary re-runs exactly the forward's steps: fed this machine's own FPN features, sem_seg and proposals in
    place of the recording's, it reproduces them bitwise, so a canary that differs is the kernels, not the harness."""
    out, cap = outputs["model"]
    fx = dict(recorded[0])
    fx.update({f"model.features.{level}": cap["features"][level] for level in ref.LEVELS})
    (proposals,) = cap["proposals"]
    fx.update({"model.sem_seg": out["sem_seg"], "model.proposals.boxes": proposals["boxes"],
               "model.proposals.objectness_logits": proposals["scores"]})
    assert ref.canary(model, fx) == (True, "")


def test_allowance_table_is_small_and_measured(allowances):
    assert all(a.limit <= 10 and a.reason for a in allowances.values()), ref.allowance_table(allowances)


def test_near_tie_swaps_are_rematched(recorded):
    """The predictor case's instances 25 and 26 score 6.3e-6 apart: where rounding swaps them, the raw and final
    instances are put back in the recording's order and the segment ids relabelled, so the comparison sees the
    recording itself; any other difference is left alone."""
    fx = recorded[0]
    case, (i, j) = "predictor", (25, 26)
    swap = torch.arange(len(fx[f"{case}.raw.scores"]))
    swap[[i, j]] = swap[[j, i]]
    raw = {key: fx[f"{case}.raw.{rec}"][swap] for key, rec in
           (("boxes", "pred_boxes"), ("scores", "scores"), ("labels", "pred_classes"), ("mask_probs", "mask_probs"))}
    instances = {key: fx[f"{case}.instances.{rec}"][swap] for key, rec in
                 (("boxes", "pred_boxes"), ("scores", "scores"), ("labels", "pred_classes"), ("masks", "pred_masks"))}
    ids = {int(a): int(b) for a, b in zip(fx[f"{case}.segments.id"], fx[f"{case}.segments.instance_id"])}
    first, second = [s for s, inst in ids.items() if inst in (i, j)]  # their segments, as fusion numbered them
    panoptic = fx[f"{case}.panoptic_seg"].clone()
    panoptic[fx[f"{case}.panoptic_seg"] == first], panoptic[fx[f"{case}.panoptic_seg"] == second] = second, first
    segments = [{"id": {first: second, second: first}.get(int(s), int(s)), "isthing": bool(t), "category_id": int(c),
                 "instance_id": int(swap[inst]) if inst >= 0 else -1}
                for s, t, c, inst in zip(fx[f"{case}.segments.id"], fx[f"{case}.segments.isthing"],
                                         fx[f"{case}.segments.category_id"], fx[f"{case}.segments.instance_id"])]
    segments = sorted(segments, key=lambda s: s["id"])
    out = {"instances": instances, "panoptic_seg": panoptic, "segments_info": segments}
    followed, cap = ref.follow_recorded_order(fx, case, out, {"raw": [raw]})
    assert torch.equal(cap["raw"][0]["labels"], fx[f"{case}.raw.pred_classes"])
    assert torch.equal(followed["instances"]["masks"], fx[f"{case}.instances.pred_masks"])
    assert torch.equal(followed["panoptic_seg"], fx[f"{case}.panoptic_seg"])
    assert [s["id"] for s in followed["segments_info"]] == fx[f"{case}.segments.id"].tolist()
    assert [s["instance_id"] for s in followed["segments_info"]] == fx[f"{case}.segments.instance_id"].tolist()


def test_proposal_matching_only_forgives_near_tie_swaps():
    rec = torch.tensor([[0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 8, 8]], dtype=torch.float32)
    swapped, _ = ref.match_proposals(rec[[1, 0, 2]], torch.tensor([3.0, 3.00001, 1.0]), rec, torch.tensor([3.0, 2, 1]))
    assert torch.equal(swapped, rec)
    kept, _ = ref.match_proposals(rec[[0, 2, 1]], torch.tensor([3.0, 2.0, 1.0]), rec, torch.tensor([3.0, 2, 1]))
    assert torch.equal(kept, rec[[0, 2, 1]])


def test_segments_info_matches_recorded_dicts(recorded, outputs, allowances):
    """The segments_info dicts themselves (keys, types, values) as detectron2 returned them (meta.json); a stuff
    area may differ by the pixels the allowance table counts."""
    fx, meta, _ = recorded
    out, _ = ref.follow_recorded_order(fx, "model", *outputs["model"])
    expected = meta["cases"]["model"]["segments_info"]
    assert [sorted(s) for s in out["segments_info"]] == [sorted(s) for s in expected]
    for ours, theirs in zip(out["segments_info"], expected):
        for key, value in theirs.items():
            assert type(ours[key]) is type(value), key
            if key == "score":
                assert ours[key] == pytest.approx(value, rel=ref.TOLERANCE)
            elif key == "area":
                assert abs(ours[key] - value) <= allowances["model.segments.area"].limit
            else:
                assert ours[key] == value, key


# ---------------------------------------------------------------------------------------------------------------------
# the checkpoint reader

def test_pkl_round_trip_equals_state(synth_state, converted):
    """All 330 entries consumed; every value read back through the safe unpickler bit for bit."""
    from minseg.convert.detectron2 import rename_detectron2

    assert len(converted) == len(synth_state) == 330
    renamed = rename_detectron2(synth_state, "synthetic state")
    assert renamed.keys() == converted.keys()
    assert all(torch.equal(renamed[k], converted[k]) for k in converted)


def test_pth_and_in_memory_dict_convert_identically(synth_state, converted, tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": synth_state, "iteration": 89999}, path)
    for source in (path, {"model": {k: v.numpy() for k, v in synth_state.items()}, "__author__": "x"}, synth_state):
        other = minseg.convert("detectron2", source, arch="panoptic_fpn_resnet50")
        assert other.keys() == converted.keys() and all(torch.equal(other[k], converted[k]) for k in other)


def test_legacy_cell_anchors_dropped_unknown_keys_refused(synth_state):
    legacy = {**synth_state, **{f"proposal_generator.anchor_generator.cell_anchors.{i}": torch.zeros(3, 4)
                                for i in range(5)}}
    minseg.convert("detectron2", legacy, arch="panoptic_fpn_resnet50")
    with pytest.raises(CheckpointError, match="roi_heads.keypoint_head"):
        minseg.convert("detectron2", {**synth_state, "roi_heads.keypoint_head.fcn1.weight": torch.zeros(1)},
                       arch="panoptic_fpn_resnet50")
    missing = dict(synth_state)
    missing.pop("sem_seg_head.predictor.bias")
    with pytest.raises(CheckpointError, match="sem_seg_head.predictor.bias"):
        minseg.convert("detectron2", missing, arch="panoptic_fpn_resnet50")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "inside_model", "as_array_subtype"])
def test_hostile_pickle_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    if where == "top":
        obj = payload
    elif where == "inside_model":
        obj = {"model": {"backbone.fpn_lateral2.weight": np.zeros(2, np.float32), "x": payload}, "__author__": "x"}
    else:
        obj = {"model": {"w": np.zeros(2, np.float32)}, "__author__": "x", "evil": [payload]}
    path = tmp_path / "model_final_evil.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="not allowed"):
        minseg.convert("detectron2", path, arch="panoptic_fpn_resnet50")
    assert not marker.exists()


def test_object_arrays_and_caffe2_pickles_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.array([1, "a"], dtype=object)}, "__author__": "x"}))
    with pytest.raises(CheckpointError, match="not allowed"):
        minseg.convert("detectron2", path, arch="panoptic_fpn_resnet50")
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros(2, np.float32)}}))
    with pytest.raises(CheckpointError, match="Caffe2"):
        minseg.convert("detectron2", path, arch="panoptic_fpn_resnet50")
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError):
        minseg.convert("detectron2", path, arch="panoptic_fpn_resnet50")


def test_pickle_protocol_5_arrays_read(tmp_path, synth_state):
    path = tmp_path / "p5.pkl"
    path.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in synth_state.items()}, "__author__": "x"},
                                  protocol=5))
    out = minseg.convert("detectron2", path, arch="panoptic_fpn_resnet50")
    assert torch.equal(out["sem_seg_head.predictor.weight"], synth_state["sem_seg_head.predictor.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# ResNet-101: the key list derived from the spec

def test_r101_keys_all_consumed_and_model_runs(r50_keys, recorded):
    keys = ref.r101_keys(r50_keys)
    assert len(keys) == 585 and len({k for k, _, _ in keys}) == 585
    state = ref.synthetic_state(keys, recorded[1])
    converted = ref.convert_synthetic(state, "panoptic_fpn_resnet101")
    assert len(converted) == 585
    model = minseg.create_model("panoptic_fpn_resnet101")
    model.load_state_dict(converted, strict=True)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 48, "width": 72}])
    assert out["sem_seg"].shape == (54, 48, 72) and out["panoptic_seg"].shape == (48, 72)
    assert out["panoptic_seg"].dtype == torch.int32
    with pytest.raises(CheckpointError, match="panoptic_fpn_resnet101"):
        minseg.convert("detectron2", state, arch="panoptic_fpn_resnet50")


# ---------------------------------------------------------------------------------------------------------------------
# eval-time behaviour

def small_images():
    """Two sizes that pad to the same 96x128: padding is normalised-zero, but after the first conv + FrozenBN it is
    not zero any more, so (in the original too) an image's results depend on how far its batch is padded."""
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, 70, 97, generator=g) * 255, torch.rand(3, 93, 110, generator=g) * 255]


def assert_same_output(a: dict, b: dict):
    for k in ("boxes", "scores"):
        torch.testing.assert_close(a["instances"][k], b["instances"][k], rtol=1e-4, atol=1e-3)
    assert torch.equal(a["instances"]["labels"], b["instances"]["labels"])
    assert (a["instances"]["masks"] != b["instances"]["masks"]).sum() <= 2
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=1e-4, atol=1e-4)
    assert (a["panoptic_seg"] != b["panoptic_seg"]).float().mean() < 1e-3


def test_batch_of_different_sizes_equals_one_at_a_time(model):
    images = small_images()
    batch = [{"image": images[0], "height": 50, "width": 61}, {"image": images[1]}]
    with torch.no_grad():
        together = model(batch)
        alone = [model([item])[0] for item in batch]
    assert together[1]["sem_seg"].shape == (54, 93, 110)
    for a, b in zip(together, alone):
        assert_same_output(a, b)


def model_with(synth_state, key: str, value: torch.Tensor):
    """The fixture model with one detectron2 entry replaced, converted as a user would."""
    state = {**synth_state, key: value}
    model = minseg.create_model("panoptic_fpn_resnet50")
    model.load_state_dict(minseg.convert("detectron2", state, arch="panoptic_fpn_resnet50"), strict=True)
    return model.eval()


def test_no_detections(synth_state):
    """Background wins every proposal: no instances, masks of shape (0, H, W) bool, only stuff segments."""
    bias = synth_state["roi_heads.box_predictor.cls_score.bias"].clone()
    bias[-1] = 1e4  # background is the last class
    model = model_with(synth_state, "roi_heads.box_predictor.cls_score.bias", bias)
    with torch.no_grad():
        (out,) = model([{"image": small_images()[0], "height": 70, "width": 97}])
    inst = out["instances"]
    assert inst["boxes"].shape == (0, 4) and inst["scores"].shape == (0,) and inst["labels"].shape == (0,)
    assert inst["masks"].shape == (0, 70, 97) and inst["masks"].dtype == torch.bool
    assert out["segments_info"] and all(not s["isthing"] for s in out["segments_info"])


def test_no_stuff(synth_state):
    """The sem-seg head predicts "things" everywhere: only thing segments, void where no instance is."""
    bias = torch.full_like(synth_state["sem_seg_head.predictor.bias"], -1e4)
    bias[0] = 1e4
    model = model_with(synth_state, "sem_seg_head.predictor.bias", bias)
    with torch.no_grad():
        (out,) = model([{"image": small_images()[0], "height": 70, "width": 97}])
    assert (out["sem_seg"].argmax(0) == 0).all()
    assert out["segments_info"] and all(s["isthing"] for s in out["segments_info"])
    assert (out["panoptic_seg"] == 0).any()  # pixels no instance claimed stay void


def test_autocast_bfloat16_runs(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model([{"image": small_images()[0]}])
    assert out["panoptic_seg"].dtype == torch.int32 and out["instances"]["masks"].dtype == torch.bool


def test_predict_reads_a_file_like_the_recorded_array(model, recorded, outputs, tmp_path):
    """An image file gives what the recorded RGB array gives (compared with the recording in test_fixture_stages)."""
    from PIL import Image

    fx = recorded[0]
    Image.fromarray(fx["predictor.rgb"].numpy()).save(tmp_path / "im.png")
    (out,) = model.predict(tmp_path / "im.png")
    assert torch.equal(out["panoptic_seg"], outputs["predictor"][0]["panoptic_seg"])


def assert_well_formed(out: dict, height: int, width: int, max_detections: int = 100):
    """Instances sorted by score above the 0.05 threshold, labels 0..79, boxes inside the image, bool masks; every
    segment id of panoptic_seg listed once in segments_info and every listed segment present."""
    inst = out["instances"]
    K = len(inst["scores"])
    assert 0 < K <= max_detections and inst["boxes"].shape == (K, 4) and inst["labels"].shape == (K,)
    assert inst["masks"].shape == (K, height, width) and inst["masks"].dtype == torch.bool
    assert torch.all(inst["scores"][:-1] >= inst["scores"][1:]) and torch.all(inst["scores"] > 0.05)
    assert inst["labels"].min() >= 0 and inst["labels"].max() <= 79
    x1, y1, x2, y2 = inst["boxes"].unbind(1)
    assert torch.all((0 <= x1) & (x1 < x2) & (x2 <= width) & (0 <= y1) & (y1 < y2) & (y2 <= height))
    ids = [s["id"] for s in out["segments_info"]]
    assert len(ids) == len(set(ids)) and set(ids) == set(out["panoptic_seg"].unique().tolist()) - {0}


@contextmanager
def cfg_changed(module, **changes):
    """`module.cfg` with `changes` while the block runs (the model fixture is shared by this file's tests)."""
    saved = module.cfg
    module.cfg = replace(saved, **changes)
    try:
        yield
    finally:
        module.cfg = saved


def test_thousands_of_proposals(model, recorded):
    """post_nms_top_n 1000 -> 5000 on the recorded input: all ~1200 proposals that survive the RPN's NMS (of 3525
    candidates) reach the RoI heads, by decreasing objectness; the first 1000 are the ones detectron2 kept
    (recorded), the others rank below them; at most 100 well-formed detections and a consistent panoptic map."""
    fx = recorded[0]
    with cfg_changed(model.rpn, post_nms_top_n_test=5000):
        out, captured = ref.run_case(model, fx, "model")
    (proposals,) = captured["proposals"]
    boxes, logits = proposals["boxes"], proposals["scores"]
    assert len(boxes) > 1000 and torch.all(logits[:-1] >= logits[1:])
    first = ref.match_proposals(boxes[:1000], logits[:1000], fx["model.proposals.boxes"],
                                fx["model.proposals.objectness_logits"])
    stages = [ref.compare_stage(key, ours, fx[key]) for ours, key in
              zip(first, ("model.proposals.boxes", "model.proposals.objectness_logits"))]
    assert ref.failures(stages, ref.TOLERANCE, {}) == []
    assert len(captured["raw"][0]["scores"]) == 100  # the cap
    assert_well_formed(out, 120, 168)


def test_one_detection(model, recorded, allowances):
    """detections_per_img=1: shapes [1, 4], [1], [1, H, W]; the first of detectron2's 100 recorded instances (its
    NMS survivors are sorted by score, the cap keeps the first); at most one thing segment."""
    fx = recorded[0]
    with cfg_changed(model.roi_heads, detections_per_img=1):
        out, _ = ref.run_case(model, fx, "model")
    inst = out["instances"]
    assert inst["boxes"].shape == (1, 4) and inst["scores"].shape == (1,) and inst["labels"].shape == (1,)
    assert_well_formed(out, 120, 168, max_detections=1)
    stages = [ref.compare_stage(f"model.instances.{rec}", ours, fx[f"model.instances.{rec}"][:1]) for ours, rec in
              ((inst["boxes"], "pred_boxes"), (inst["scores"], "scores"), (inst["labels"], "pred_classes"),
               (inst["masks"].to(torch.uint8), "pred_masks"))]
    assert ref.failures(stages, ref.TOLERANCE, allowances) == []
    assert sum(s["isthing"] for s in out["segments_info"]) <= 1


def test_bad_inputs_raise_clearly(model):
    with pytest.raises(ValueError, match="Tensor\\[3, H, W\\]"):
        model([{"image": torch.zeros(64, 64)}])
    with pytest.raises(ValueError, match="non-empty list"):
        model([])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.int64)}])


def test_uint8_image_as_detectron2_takes_it(model):
    """detectron2's DatasetMapper hands the model uint8 images; the normalisation turns them into floats."""
    image = small_images()[0].round()
    with torch.no_grad():
        (as_uint8,) = model([{"image": image.to(torch.uint8)}])
        (as_float,) = model([{"image": image}])
    assert torch.equal(as_uint8["sem_seg"], as_float["sem_seg"])
    assert torch.equal(as_uint8["panoptic_seg"], as_float["panoptic_seg"])


@cuda
def test_cuda_matches_cpu(model):
    images = small_images()
    with torch.no_grad():
        cpu = model([{"image": images[0]}])[0]
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = model.cuda()([{"image": images[0].cuda()}])[0]
        model.cpu()
    gpu = {"instances": {k: v.cpu() for k, v in gpu["instances"].items()}, "sem_seg": gpu["sem_seg"].cpu(),
           "panoptic_seg": gpu["panoptic_seg"].cpu()}
    assert_same_output(gpu, cpu)


@cuda
def test_cuda_float16_autocast_runs(model):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        (out,) = model.cuda()([{"image": small_images()[0].cuda(), "height": 35, "width": 48}])
    model.cpu()
    assert out["panoptic_seg"].shape == (35, 48) and out["panoptic_seg"].dtype == torch.int32
    assert out["instances"]["masks"].dtype == torch.bool and out["instances"]["masks"].is_cuda


def test_non_finite_candidates_are_dropped_as_detectron2_does():
    """detectron2 drops proposals with an inf/NaN box or score before anything else (an infinite coordinate
    would clip to a finite one): selecting from candidates with such rows equals selecting from the rest."""
    from minseg.models.panoptic_fpn import detectron2_roi_heads, detectron2_rpn

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 80
    boxes = torch.cat((xy, xy + 5 + torch.rand(60, 2, generator=g) * 40), dim=1)
    scores, levels = torch.randn(60, generator=g), torch.randint(0, 3, (60,), generator=g)
    boxes[3, 2], boxes[7, 0], scores[11] = float("inf"), float("nan"), float("nan")
    finite = torch.ones(60, dtype=torch.bool)
    finite[[3, 7, 11]] = False
    rpn = detectron2_rpn()
    ours = rpn.select(boxes, scores, levels, (96, 128), 1000)
    theirs = rpn.select(boxes[finite], scores[finite], levels[finite], (96, 128), 1000)
    assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "scores"))

    heads = detectron2_roi_heads(num_classes=3)
    class_boxes = boxes.repeat(1, 3)  # (60, 3 * 4): one box per class
    probs = torch.rand(60, 4, generator=g).softmax(dim=1) * 4
    probs[20, 1] = float("inf")
    finite = torch.isfinite(class_boxes).all(dim=1)  # rows 3 and 7
    finite[20] = False
    ours = heads.select(class_boxes, probs, (96, 128))
    theirs = heads.select(class_boxes[finite], probs[finite], (96, 128))
    assert len(ours["boxes"]) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "scores", "labels"))
