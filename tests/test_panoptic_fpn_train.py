"""panoptic_fpn_resnet50 in train mode against one training step recorded by running detectron2
(shared/parity/panoptic_fpn_R_50_train): the six losses (relative 1e-5; on the recording's kernels they are
bitwise), the sampled anchors and proposals (identical), head inputs and outputs, every gradient (norm, seeded
projection within 1e-3 of the norm, full head gradients to float32 rounding), frozen layers and FrozenBN buffers;
a 0.1% change of one weight moves every loss out of tolerance; an image without objects trains as detectron2's (all negatives); train mode
without targets is a ValueError. One recorded forward/backward is shared by the module (minseg_ref/
parity_panoptic_train.py holds the harness and prints the full report)."""
from __future__ import annotations

import pytest
import torch

from minseg_ref import parity_panoptic_train as ref


@pytest.fixture(scope="module")
def recorded():
    try:
        return ref.load_fixture()
    except FileNotFoundError as e:
        pytest.skip(f"Panoptic FPN training fixture absent: {e}")


@pytest.fixture(scope="module")
def model(recorded):
    torch.set_num_threads(2)  # the recording's thread count
    return ref.build_model(recorded[1])


@pytest.fixture(scope="module")
def step(model, recorded):
    return ref.run_step(model, recorded[0])


@pytest.fixture(scope="module")
def report(step, recorded):
    return ref.compare(step, recorded[0])


def entries(report: dict[str, float], prefix: str, suffix: str = "") -> dict[str, float]:
    return {k: v for k, v in report.items() if k.startswith(prefix) and k.endswith(suffix)}


def test_losses(step, report, recorded):
    fx, meta = recorded
    assert list(step.losses) == meta["loss_order"]  # detectron2's dict order: sem_seg, RPN, RoI heads
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in step.losses.values())
    losses = entries(report, "loss")
    assert len(losses) == 7 and ref.failures(losses) == [], losses


def test_sampled_anchors_and_proposals_are_identical(report):
    """Matcher labels, matched gt, the sampled anchor labels and proposal indices (torch.randperm in detectron2's
    order: RPN image 0, 1, then RoI image 0, 1), the proposals themselves (same order) and the mask targets."""
    discrete = {k: v for k, v in report.items() if "differing" in k}
    assert len(discrete) == 13 and all(v == 0 for v in discrete.values()), discrete
    floats = {**entries(report, "proposals"), **entries(report, "rpn anchors")}
    assert len(floats) == 5 and ref.failures(floats) == [], floats


def test_head_tensors(report):
    names = ("rpn objectness_logits", "rpn anchor_deltas", "roi cls_logits", "roi bbox_deltas",
             "mask logits_gt_class", "sem_seg logits")
    values = {n: report[n] for n in names}
    values.update(entries(report, "features"))
    assert len(values) == 16 and ref.failures(values) == [], values


def test_gradients(report, step, recorded):
    assert report["grad parameters (missing or extra)"] == 0
    assert len(step.grads) == recorded[1]["parameters"]["n_with_grad"] == 107
    grads = {**entries(report, "grad ", " norm"), **entries(report, "grad ", " proj"), **entries(report, "grad_full")}
    assert len(grads) == 2 * 107 + 12 and ref.failures(grads) == [], ref.failures(grads)


def test_frozen_layers_and_norms(model, step, recorded):
    """FREEZE_AT = 2: the stem and res2 have requires_grad False; FrozenBN buffers are untouched by a step;
    no BatchNorm2d anywhere."""
    assert sorted(step.frozen) == sorted(recorded[1]["parameters"]["requires_grad_false"])
    assert step.buffers_unchanged
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_a_weight_changed_by_a_tenth_of_a_percent_is_caught(model, recorded, step):
    """The recording's own check: backbone stem conv1 weight x 1.001 moves every loss out of tolerance (README:
    from 1.2e-5 relative for loss_sem_seg to 7.4e-3 for loss_cls, 3.7e-3 for the total). A training forward (the
    same FrozenBN path) without the backward, to keep the module at one backward."""
    fx = recorded[0]
    weight = model.backbone.conv1.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.001)
        torch.manual_seed(ref.SEED)
        losses = {k: v.detach() for k, v in model(ref.make_batch(fx)).items()}
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    moved = {k: abs(v.item() / fx[f"train.loss.{k}"].item() - 1) for k, v in losses.items()}
    assert all(v > ref.LOSS_TOLERANCE for v in moved.values()), moved
    total = sum(losses.values())
    assert abs(total.item() / fx["train.loss.total"].item() - 1) > 100 * ref.LOSS_TOLERANCE


def test_an_image_without_objects_trains_with_negatives_only(model):
    """detectron2: every anchor and proposal is background (RPN: 256 negatives; RoI heads: class K), so the box,
    anchor-box and mask losses are 0 (the mask loss still on the graph), the classification losses are not."""
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 70, 90, generator=g) * 255).to(torch.uint8)
    batch = [{"image": image, "height": 70, "width": 90,
              "instances": {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                            "masks": torch.zeros(0, 70, 90, dtype=torch.bool)},
              "sem_seg": torch.randint(0, 54, (70, 90), generator=g)}]
    model.zero_grad(set_to_none=True)
    with ref.recording(model) as cap:
        torch.manual_seed(0)
        losses = model(batch)
        sum(losses.values()).backward()
    ((pos, neg),) = cap["rpn_sample"][0]
    assert len(pos) == 0 and len(neg) == 256
    ((roi_pos, roi_neg),) = cap["roi_sample"][0]
    assert len(roi_pos) == 0 and len(roi_neg) > 0
    assert cap["box"][0].shape[0] == len(roi_neg)
    assert {k: v.item() == 0 for k, v in losses.items()} == {
        "loss_sem_seg": False, "loss_rpn_cls": False, "loss_rpn_loc": True, "loss_cls": False, "loss_box_reg": True,
        "loss_mask": True}
    assert model.roi_heads.mask_head.predictor.weight.grad is not None  # 0 * sum: connected, zero gradient
    model.zero_grad(set_to_none=True)


def test_train_mode_needs_targets(model):
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="instances"):
        model([{"image": image}])
    with pytest.raises(ValueError, match="sem_seg"):
        model([{"image": image, "sem_seg": torch.zeros(32, 32, dtype=torch.int64),
                "instances": {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                              "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}}])
    with pytest.raises(ValueError, match="lacks"):
        model([{"image": image, "sem_seg": torch.zeros(64, 64, dtype=torch.int64), "instances": {}}])
