"""Panoptic fusion against the one-instance-at-a-time reference (minseg.ops.reference.panoptic_fusion, written
from detectron2's combine_semantic_and_instance_outputs)."""
import dataclasses

import pytest
import torch

from minseg.heads.panoptic_fusion import FusionConfig, combine_semantic_and_instances
from minseg.ops import reference as ops_reference


def reference(scores, labels, masks, semantic, cfg):
    return ops_reference.panoptic_fusion(scores, labels, masks, semantic, **dataclasses.asdict(cfg))


@pytest.mark.parametrize("gpu_form", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_fusion_matches_one_at_a_time(seed, gpu_form):
    """Both forms: one instance at a time (the CPU's) and the dense fixpoint (GPUs'), run here on the CPU."""
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
    panoptic, segments = combine_semantic_and_instances(scores, labels, masks, semantic, cfg,
                                                        impl="gpu" if gpu_form else "cpu")
    expected_panoptic, expected_segments = reference(scores, labels, masks, semantic, cfg)
    assert panoptic.dtype == torch.int32 and torch.equal(panoptic, expected_panoptic)
    assert segments == expected_segments


@pytest.mark.parametrize("overlap_thresh", [0.2, 0.5, 0.8])
def test_fixpoint_form_on_crowded_instances(overlap_thresh):
    """60 heavily overlapping instances: long chains of decisions that depend on earlier ones."""
    g = torch.Generator().manual_seed(int(overlap_thresh * 10))
    K, H, W = 60, 30, 30
    masks = torch.zeros(K, H, W, dtype=torch.bool)
    for k, (x, y, w, h) in enumerate(torch.randint(0, 20, (K, 4), generator=g).tolist()):
        masks[k, y:y + h + 3, x:x + w + 3] = True
    scores, labels = torch.rand(K, generator=g) * 0.5 + 0.5, torch.randint(0, 80, (K,), generator=g)
    semantic = torch.zeros(H, W, dtype=torch.int64)
    cfg = FusionConfig(overlap_thresh=overlap_thresh)
    panoptic, segments = combine_semantic_and_instances(scores, labels, masks, semantic, cfg, impl="gpu")
    expected_panoptic, expected_segments = reference(scores, labels, masks, semantic, cfg)
    assert torch.equal(panoptic, expected_panoptic) and segments == expected_segments
    assert 1 < len(segments) < K
