"""Panoptic fusion against a one-instance-at-a-time reference written from detectron2's
combine_semantic_and_instance_outputs (Python floats, boolean-mask assignment, a host read per step)."""
import pytest
import torch

from minseg.heads.panoptic_fusion import FusionConfig, combine_semantic_and_instances
from minseg.ops import forms


def reference(scores, labels, masks, semantic, cfg):
    panoptic = torch.zeros_like(semantic, dtype=torch.int32)
    segments, current_id = [], 0
    for i in torch.argsort(-scores):
        score = scores[i].item()
        if score < cfg.instances_score_thresh:
            break
        mask = masks[i]
        area = mask.sum().item()
        if area == 0:
            continue
        overlap = (mask & (panoptic > 0)).sum().item()
        if overlap * 1.0 / area > cfg.overlap_thresh:
            continue
        current_id += 1
        panoptic[mask & (panoptic == 0)] = current_id
        segments.append({"id": current_id, "isthing": True, "score": score, "category_id": labels[i].item(),
                         "instance_id": i.item()})
    for label in torch.unique(semantic).tolist():
        mask = (semantic == label) & (panoptic == 0)
        if label == cfg.things_label or mask.sum().item() < cfg.stuff_area_thresh:
            continue
        current_id += 1
        panoptic[mask] = current_id
        segments.append({"id": current_id, "isthing": False, "category_id": label, "area": mask.sum().item()})
    return panoptic, segments


@pytest.mark.parametrize("gpu_form", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_fusion_matches_one_at_a_time(seed, gpu_form, monkeypatch):
    """Both forms: one instance at a time (the CPU's) and the dense fixpoint (GPUs'), run here on the CPU."""
    monkeypatch.setattr(forms, "launch_bound", lambda t: gpu_form)
    g = torch.Generator().manual_seed(seed)
    K, H, W = int(torch.randint(0, 12, (1,), generator=g)), 40, 50
    scores = torch.rand(K, generator=g)
    if K > 2 and seed % 3 == 0:
        scores[1] = scores[0]  # an exact tie
    labels = torch.randint(0, 80, (K,), generator=g)
    masks = torch.zeros(K, H, W, dtype=torch.bool)
    for k, (x, y) in enumerate(torch.randint(0, 40, (K, 2), generator=g).tolist()):
        masks[k, y:y + int(torch.randint(0, 20, (1,), generator=g)), x:x + 15] = True  # some empty
    semantic = torch.randint(0, 5, (4, 5), generator=g).repeat_interleave(10, 0).repeat_interleave(10, 1)
    cfg = FusionConfig(overlap_thresh=float(torch.rand(1, generator=g)),
                       stuff_area_thresh=int(torch.randint(1, 400, (1,), generator=g)))
    panoptic, segments = combine_semantic_and_instances(scores, labels, masks, semantic, cfg)
    expected_panoptic, expected_segments = reference(scores, labels, masks, semantic, cfg)
    assert panoptic.dtype == torch.int32 and torch.equal(panoptic, expected_panoptic)
    assert segments == expected_segments


@pytest.mark.parametrize("overlap_thresh", [0.2, 0.5, 0.8])
def test_fixpoint_form_on_crowded_instances(overlap_thresh, monkeypatch):
    """60 heavily overlapping instances: long chains of decisions that depend on earlier ones."""
    monkeypatch.setattr(forms, "launch_bound", lambda t: True)
    g = torch.Generator().manual_seed(int(overlap_thresh * 10))
    K, H, W = 60, 30, 30
    masks = torch.zeros(K, H, W, dtype=torch.bool)
    for k, (x, y, w, h) in enumerate(torch.randint(0, 20, (K, 4), generator=g).tolist()):
        masks[k, y:y + h + 3, x:x + w + 3] = True
    scores, labels = torch.rand(K, generator=g) * 0.5 + 0.5, torch.randint(0, 80, (K,), generator=g)
    semantic = torch.zeros(H, W, dtype=torch.int64)
    cfg = FusionConfig(overlap_thresh=overlap_thresh)
    panoptic, segments = combine_semantic_and_instances(scores, labels, masks, semantic, cfg)
    expected_panoptic, expected_segments = reference(scores, labels, masks, semantic, cfg)
    assert torch.equal(panoptic, expected_panoptic) and segments == expected_segments
    assert 1 < len(segments) < K
