"""FCN and DeepLabV3: parity with torchvision (its own seeded init, converted with minseg.convert)."""
import pytest
import torch

import minseg
from minseg_ref.common import Tally
from minseg_ref.parity_semantic import TOLERANCE, build_pair, compare

from conftest import cuda

SMALL = [("fcn_resnet50", 0), ("deeplabv3_resnet50", 1)]


@pytest.mark.parametrize("name,seed", SMALL + [("fcn_resnet50", 3), ("deeplabv3_resnet50", 4)])
@pytest.mark.parametrize("aux", [False, True])
def test_parity_small_inputs(name, seed, aux):
    ref, ours = build_pair(name, num_classes=5, aux_loss=aux, seed=seed)
    tally = Tally()
    g = torch.Generator().manual_seed(seed)
    compare(ref, ours, torch.randn(2, 3, 65, 97, generator=g), tally)   # batch of 2, odd non-square
    compare(ref, ours, torch.randn(1, 3, 33, 17, generator=g), tally)
    assert tally.max_rel <= TOLERANCE, (tally.max_abs, tally.max_rel)


@pytest.mark.parametrize("name", ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_parity_full_size(name):
    """One full-size check per model: batch 2 at the odd size 333x517, with the aux head."""
    ref, ours = build_pair(name, aux_loss=True, seed=7)
    tally = Tally()
    compare(ref, ours, torch.randn(2, 3, 333, 517, generator=torch.Generator().manual_seed(7)), tally)
    assert tally.max_rel <= TOLERANCE, (tally.max_abs, tally.max_rel)


def test_output_size_follows_input():
    model = minseg.create_model("deeplabv3_resnet50", num_classes=3, aux_loss=True)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 31, 45))
    assert out["out"].shape == (1, 3, 31, 45) and out["aux"].shape == (1, 3, 31, 45)


def test_bad_tensor_inputs():
    model = minseg.create_model("fcn_resnet50", num_classes=2)
    with pytest.raises(ValueError, match="Tensor"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="Tensor"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_predict_labels_at_image_size():
    import numpy as np

    model = minseg.create_model("fcn_resnet50", num_classes=4)
    rgb = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    (out,) = model.predict(rgb)
    assert out["labels"].shape == (37, 53) and out["labels"].dtype == torch.int64
    assert torch.allclose(out["probs"].sum(0), torch.ones(37, 53), atol=1e-5)


def test_bfloat16_autocast_runs_close():
    ref, ours = build_pair("fcn_resnet50", num_classes=3, seed=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = ref(x)["out"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = ours(x)["out"]
    # bfloat16 has 8 mantissa bits; through ~50 conv layers the error is a few percent of the output scale
    assert (half.float() - full).abs().max() <= 0.1 * full.abs().max()


@cuda
@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_parity_cuda(name):
    ref, ours = build_pair(name, aux_loss=True, seed=5)
    ref, ours = ref.cuda(), ours.cuda()
    tally = Tally()
    compare(ref, ours, torch.randn(2, 3, 333, 517, device="cuda"), tally)
    assert tally.max_rel <= TOLERANCE, (tally.max_abs, tally.max_rel)


def test_channels_last_same_outputs():
    ref, ours = build_pair("deeplabv3_resnet50", num_classes=3, aux_loss=True, seed=6)
    ours = ours.to(memory_format=torch.channels_last)
    tally = Tally()
    compare(ref, ours, torch.randn(1, 3, 67, 45).contiguous(memory_format=torch.channels_last), tally)
    assert tally.max_rel <= TOLERANCE, (tally.max_abs, tally.max_rel)
