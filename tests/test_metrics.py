"""mIoU and PQ against brute-force references written here (one mask per class / segment, float64)."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from minseg.metrics import confusion_matrix, mean_iou, panoptic_quality, panoptic_stats


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 6))
def test_miou_matches_per_class_masks(seed, c):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, (9, 11))
    target[rng.random((9, 11)) < 0.1] = 255
    pred = rng.integers(0, c, (9, 11))
    result = mean_iou(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), c))
    ious = []
    valid = target != 255
    for k in range(c):
        inter = ((pred == k) & (target == k) & valid).sum()
        union = (((pred == k) | (target == k)) & valid).sum()
        ious.append(inter / union if union else np.nan)
    np.testing.assert_allclose(result["iou"].numpy(), ious)
    assert np.isclose(result["miou"], np.nanmean(ious))


def brute_force_stats(pred, pcat, target, tcat, crowds=frozenset()):
    """{category: [sum IoU, TP, FP, FN]} by panopticapi's rules, one mask at a time: crowds match nothing and are
    no false negatives; a prediction more than half on void plus the crowd region of its own category is no false
    positive."""
    stats = {}
    matched_p, matched_t = set(), set()
    void = target == 0
    for t in np.unique(target):
        for p in np.unique(pred):
            if t == 0 or p == 0 or t in crowds or tcat[t] != pcat[p]:
                continue
            tm, pm = target == t, pred == p
            inter = (tm & pm).sum()
            union = (tm | pm).sum() - (pm & void).sum()
            if union and inter / union > 0.5:
                s = stats.setdefault(tcat[t], [0.0, 0, 0, 0])
                s[0] += inter / union; s[1] += 1
                matched_p.add(p); matched_t.add(t)
    for t in np.unique(target):
        if t and t not in matched_t and t not in crowds:
            stats.setdefault(tcat[t], [0.0, 0, 0, 0])[3] += 1
    for p in np.unique(pred):
        crowd_region = np.isin(target, [t for t in crowds if tcat[t] == pcat[p]])
        if p and p not in matched_p and ((pred == p) & (void | crowd_region)).sum() / (pred == p).sum() <= 0.5:
            stats.setdefault(pcat[p], [0.0, 0, 0, 0])[2] += 1
    return stats


def brute_force_pq(stats):
    """{category: PQ} from brute_force_stats."""
    return {c: (s[0] / (s[1] + 0.5 * s[2] + 0.5 * s[3])) for c, s in stats.items()}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), with_crowds=st.booleans())
def test_pq_matches_brute_force(seed, with_crowds):
    rng = np.random.default_rng(seed)
    # blocky segment maps so that matches with IoU > 0.5 actually happen
    target = np.kron(rng.integers(0, 5, (4, 4)), np.ones((3, 3), int))
    pred = target.copy()
    flip = rng.random(pred.shape) < 0.25
    pred[flip] = rng.integers(0, 6, flip.sum())
    tcat = {i: int(rng.integers(0, 3)) for i in range(6)}
    pcat = {i: (tcat[i] if rng.random() < 0.8 else int(rng.integers(0, 3))) for i in range(6)}
    # at most one crowd segment per category (panopticapi keeps one crowd region per category)
    crowds = {max(t for t in range(1, 6) if tcat[t] == c) for c in set(tcat.values()) - {tcat[0]}
              if rng.random() < 0.5} if with_crowds and len(set(tcat.values())) > 1 else set()
    stats = panoptic_stats(torch.from_numpy(pred), pcat, torch.from_numpy(target), tcat, target_crowds=crowds)
    result = panoptic_quality([stats], things={0})
    expected = brute_force_pq(brute_force_stats(pred, pcat, target, tcat, crowds))
    assert set(result["per_class"]) == set(expected)
    for c, pq in expected.items():
        assert np.isclose(result["per_class"][c]["pq"], pq)
    if expected:
        assert np.isclose(result["all"]["pq"], np.mean(list(expected.values())))


def test_crowd_rules():
    """A prediction mostly on a crowd of its own category is ignored; on a crowd of another category it is a
    false positive; the crowd itself is no false negative."""
    target = torch.tensor([[1, 1, 1, 2, 2, 2]] * 2)
    pred = torch.tensor([[5, 5, 5, 0, 0, 0]] * 2)
    stats = panoptic_stats(pred, {5: 0}, target, {1: 0, 2: 1}, target_crowds={1})
    assert stats == {1: {"iou": 0.0, "tp": 0, "fp": 0, "fn": 1}}
    stats = panoptic_stats(pred, {5: 1}, target, {1: 0, 2: 1}, target_crowds={1})
    assert stats == {1: {"iou": 0.0, "tp": 0, "fp": 1, "fn": 1}}


def test_perfect_prediction():
    seg = torch.tensor([[1, 1, 2], [1, 2, 2], [0, 3, 3]])
    cats = {1: 0, 2: 1, 3: 1}
    r = panoptic_quality([panoptic_stats(seg, cats, seg, cats)], things={0})
    assert r["all"]["pq"] == 1.0 and r["things"]["n"] == 1 and r["stuff"]["n"] == 1
