"""minseg.losses against segmentation_models_pytorch.losses (values and input gradients, bitwise) and, for Dice and
Jaccard, against the formula written out directly in float64."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import minseg.losses as M

smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")

IGNORE = 255
MODES = ["binary", "multiclass", "multilabel"]


def make_inputs(mode: str, seed: int, N: int, C: int, H: int, W: int, present: int, ignored: float, scale: float):
    """(logits, targets) for `mode`: logits N(0, scale); labels in 0..present-1 (classes >= present are empty);
    a fraction `ignored` of the pixels (1.0: all) set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    C = 1 if mode == "binary" else C
    logits = torch.randn(N, C, H, W, generator=g) * scale
    if mode == "multiclass":
        target = torch.randint(0, max(1, min(present, C)), (N, H, W), generator=g)  # present = 0: class 0 only
    else:
        target = (torch.rand(N, C, H, W, generator=g) < 0.5).float() * (present > 0)  # present = 0: no positives
    drop = torch.rand(target.shape, generator=g) < ignored
    return logits, target.masked_fill(drop, IGNORE)


def assert_same(ours_cls, theirs_cls, kwargs: dict, y_pred: torch.Tensor, y_true: torch.Tensor) -> None:
    """Same loss value and same gradient with respect to y_pred, bit for bit (NaN where both are NaN)."""
    a, b = y_pred.clone().requires_grad_(), y_pred.clone().requires_grad_()
    expected, ours = theirs_cls(**kwargs)(a, y_true), ours_cls(**kwargs)(b, y_true)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True)
    if expected.requires_grad and torch.isfinite(expected).all():
        expected.sum().backward()
        ours.sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, equal_nan=True)


shapes = dict(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 3), C=st.integers(1, 4), H=st.integers(1, 7),
              W=st.integers(1, 7), present=st.integers(0, 4), ignored=st.sampled_from([0.0, 0.3, 1.0]),
              scale=st.sampled_from([0.1, 3.0, 30.0]))


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["DiceLoss", "JaccardLoss", "TverskyLoss"]), mode=st.sampled_from(MODES),
       log_loss=st.booleans(), from_logits=st.booleans(), smooth=st.sampled_from([0.0, 1.0]),
       use_ignore=st.booleans(), subset=st.booleans(), weighted=st.booleans(),
       tversky=st.sampled_from([(0.5, 0.5, 1.0), (0.3, 0.7, 2.0)]), **shapes)
def test_region_losses_equal_smp(name, mode, log_loss, from_logits, smooth, use_ignore, subset, weighted, tversky,
                                 seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs(mode, seed, N, C, H, W, present, ignored if use_ignore else 0.0, scale)
    y_pred = logits if from_logits else (logits.softmax(1) if mode == "multiclass" else logits.sigmoid())
    C = logits.shape[1]
    kwargs = dict(mode=mode, log_loss=log_loss, from_logits=from_logits, smooth=smooth,
                  ignore_index=IGNORE if use_ignore else None)
    if mode != "binary":
        kwargs["classes"] = list(range(0, C, 2)) if subset else None
        kwargs["class_weights"] = [1.0 + c for c in range(C)] if weighted else None
    if name == "TverskyLoss":
        kwargs.update(zip(("alpha", "beta", "gamma"), tversky))
    assert_same(getattr(M, name), getattr(smp_losses, name), kwargs, y_pred, target)


@settings(max_examples=120, deadline=None)
@given(mode=st.sampled_from(MODES), alpha=st.sampled_from([None, 0.25]), gamma=st.sampled_from([0.0, 2.0, 3.5]),
       use_ignore=st.booleans(), from_logits=st.booleans(), reduction=st.sampled_from(["mean", "sum"]),
       normalized=st.booleans(), reduced_threshold=st.sampled_from([None, 0.5]), weighted=st.booleans(), **shapes)
def test_focal_loss_equals_smp(mode, alpha, gamma, use_ignore, from_logits, reduction, normalized, reduced_threshold,
                               weighted, seed, N, C, H, W, present, ignored, scale):
    use_ignore = use_ignore and mode != "multilabel"  # smp's multilabel focal loss raises with ignore_index
    logits, target = make_inputs(mode, seed, N, C, H, W, present, ignored if use_ignore else 0.0, scale)
    y_pred = logits if from_logits else (logits.softmax(1) if mode == "multiclass" else logits.sigmoid())
    kwargs = dict(mode=mode, alpha=alpha, gamma=gamma, ignore_index=IGNORE if use_ignore else None,
                  from_logits=from_logits, reduction=reduction, normalized=normalized,
                  reduced_threshold=reduced_threshold)
    if mode != "binary" and weighted:
        kwargs["class_weights"] = [1.0 + c for c in range(logits.shape[1])]
    assert_same(M.FocalLoss, smp_losses.FocalLoss, kwargs, y_pred, target)


def test_multilabel_focal_ignores_each_channels_own_pixels():
    """smp raises here; minseg gives the per-channel focal loss over that channel's kept pixels, averaged."""
    logits, target = make_inputs("multilabel", 3, 2, 3, 5, 6, 2, 0.3, 3.0)
    ours = M.FocalLoss("multilabel", ignore_index=IGNORE)(logits, target)
    per_channel = []
    for c in range(3):
        keep = target[:, c] != IGNORE
        per_channel.append(smp_losses.FocalLoss("binary")(logits[:, c][keep], target[:, c][keep]))
    torch.testing.assert_close(ours, torch.stack(per_channel).mean(), rtol=0, atol=0)


@settings(max_examples=100, deadline=None)
@given(mode=st.sampled_from(MODES), per_image=st.booleans(), use_ignore=st.booleans(), **shapes)
def test_lovasz_loss_equals_smp(mode, per_image, use_ignore, seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs(mode, seed, N, C, H, W, max(present, 1), ignored if use_ignore else 0.0, scale)
    if mode == "multiclass":
        if logits.shape[1] == 1:  # smp raises for a single softmax class
            return
        if use_ignore and (target == IGNORE).reshape(N if per_image else 1, -1).all(1).any():
            return  # smp returns an empty tensor here (see test_lovasz_all_ignored)
    kwargs = dict(mode=mode, per_image=per_image, ignore_index=IGNORE if use_ignore else None)
    assert_same(M.LovaszLoss, smp_losses.LovaszLoss, kwargs, logits, target)


@pytest.mark.parametrize("mode", MODES)
def test_lovasz_all_ignored_is_zero_with_zero_gradient(mode):
    logits, target = make_inputs(mode, 0, 2, 3, 4, 5, 3, 1.0, 1.0)
    x = logits.requires_grad_()
    loss = M.LovaszLoss(mode, ignore_index=IGNORE)(x, target)
    loss.backward()
    assert loss.item() == 0 and not x.grad.any()


@settings(max_examples=80, deadline=None)
@given(use_ignore=st.booleans(), smooth_factor=st.sampled_from([None, 0.1]), reduction=st.sampled_from(["mean", "sum", "none"]),
       weighted=st.booleans(), **shapes)
def test_soft_bce_equals_smp(use_ignore, smooth_factor, reduction, weighted, seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs("multilabel", seed, N, C, H, W, present, ignored if use_ignore else 0.0, scale)
    kwargs = dict(ignore_index=IGNORE if use_ignore else None, smooth_factor=smooth_factor, reduction=reduction)
    if weighted:
        kwargs["pos_weight"] = torch.linspace(0.5, 2.0, logits.shape[1]).reshape(-1, 1, 1)
    assert_same(M.SoftBCEWithLogitsLoss, smp_losses.SoftBCEWithLogitsLoss, kwargs, logits, target)


@settings(max_examples=80, deadline=None)
@given(use_ignore=st.booleans(), smooth_factor=st.sampled_from([0.0, 0.1]), reduction=st.sampled_from(["mean", "sum", "none"]),
       **shapes)
def test_soft_cross_entropy_equals_smp(use_ignore, smooth_factor, reduction, seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs("multiclass", seed, N, C, H, W, max(present, 1), ignored if use_ignore else 0.0, scale)
    kwargs = dict(ignore_index=IGNORE if use_ignore else None, smooth_factor=smooth_factor, reduction=reduction)
    assert_same(M.SoftCrossEntropyLoss, smp_losses.SoftCrossEntropyLoss, kwargs, logits, target)


def test_soft_cross_entropy_without_smoothing_is_cross_entropy():
    logits, target = make_inputs("multiclass", 5, 2, 4, 6, 7, 4, 0.3, 3.0)
    ours = M.SoftCrossEntropyLoss(reduction="sum", ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum"))


@settings(max_examples=60, deadline=None)
@given(eps=st.sampled_from([1e-5, 1e-2]), **shapes)
def test_mcc_loss_equals_smp(eps, seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs("binary", seed, N, C, H, W, present, 0.0, scale)
    assert_same(M.MCCLoss, smp_losses.MCCLoss, dict(eps=eps), logits.sigmoid(), target)


def region_loss_float64(logits, target, mode, alpha, beta, smooth, eps, ignore_index):
    """The Tversky family written out: p = softmax / sigmoid, t one-hot, per class over the batch
    TP = sum p t, FP = sum p (1 - t), FN = sum (1 - p) t; loss_c = 1 - (TP + s) / max(TP + a FP + b FN + s, eps),
    0 for a class without target pixels; mean over classes."""
    C = logits.shape[1]
    if mode == "multiclass":
        keep = (target != ignore_index).unsqueeze(1).double()
        p = logits.softmax(1)
        t = F.one_hot(target.clamp(max=C - 1), C).permute(0, 3, 1, 2).double()
    else:
        keep = (target != ignore_index).double()
        p, t = logits.sigmoid(), target.double()
    p, t = p * keep, t * keep
    dims = (0, 2, 3)
    tp, fp, fn = (p * t).sum(dims), (p * (1 - t)).sum(dims), ((1 - p) * t).sum(dims)
    score = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(eps)
    return ((1 - score) * (t.sum(dims) > 0)).mean()


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["DiceLoss", "JaccardLoss"]), mode=st.sampled_from(MODES), smooth=st.sampled_from([0.0, 1.0]),
       **shapes)
def test_dice_and_jaccard_equal_float64_formula(name, mode, smooth, seed, N, C, H, W, present, ignored, scale):
    logits, target = make_inputs(mode, seed, N, C, H, W, present, ignored, scale)
    logits = logits.double()
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    alpha = beta = 0.5 if name == "DiceLoss" else 1.0
    ours = getattr(M, name)(mode, smooth=smooth, ignore_index=IGNORE)(a, target)
    expected = region_loss_float64(b, target, mode, alpha, beta, smooth, 1e-7, IGNORE)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_segmentation_loss_is_torchvisions_criterion():
    """references/segmentation/train.py: CE(out, ignore 255) + 0.5 CE(aux, ignore 255); "out" alone without aux."""
    logits, target = make_inputs("multiclass", 1, 2, 4, 5, 6, 4, 0.3, 3.0)
    aux = logits.flip(-1)
    expected = F.cross_entropy(logits, target, ignore_index=255) + 0.5 * F.cross_entropy(aux, target, ignore_index=255)
    assert torch.equal(M.segmentation_loss({"out": logits, "aux": aux}, target), expected)
    assert torch.equal(M.segmentation_loss({"out": logits}, target), F.cross_entropy(logits, target, ignore_index=255))
    assert torch.equal(M.segmentation_loss(logits, target, aux_weight=0.3), M.segmentation_loss({"out": logits}, target))


def test_bad_mode_raises():
    with pytest.raises(ValueError):
        M.DiceLoss("binnary")
    with pytest.raises(ValueError):
        M.DiceLoss("binary", classes=[0])
