"""unet_resnet34 against segmentation_models_pytorch.Unet("resnet34"): parity, conversion, sizes, decoder, predict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import minseg
from minseg.convert import convert_with_overrides
from minseg.models.unet import DecoderBlock
from minseg.weights import save_weights
from minseg_ref.common import diff
from minseg_ref.parity_unet import TOLERANCE, build_pair, build_smp, perturb_norms

smp = pytest.importorskip("segmentation_models_pytorch")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def outputs(ref, ours, x):
    with torch.no_grad():
        return ref(x), ours(x)


def assert_parity(a: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    """ours (a) against smp (b): same shape, max abs diff relative to max |smp| within tolerance, same argmax."""
    d, rel = diff(a, b)
    assert rel <= tolerance, f"max abs diff {d:.3g} (relative {rel:.3g}) exceeds {tolerance}"
    if a.shape[1] > 1:
        assert torch.equal(a.argmax(1), b.argmax(1))


@pytest.fixture(scope="module")
def smp_k3():
    """(smp Unet K=3 seed 0, its state dict) shared by the full-size parity and key tests."""
    ref = build_smp(num_classes=3, seed=0)
    return ref, ref.state_dict()


def test_parity_full_size(smp_k3):
    """The one full-size check: batch 2, non-square 224x320, K=3."""
    ref, state = smp_k3
    ours = minseg.create_model("unet_resnet34", num_classes=3)
    ours.load_state_dict(minseg.convert("smp", state, arch="unet_resnet34"), strict=True)
    x = torch.randn(2, 3, 224, 320, generator=torch.Generator().manual_seed(0))
    b, a = outputs(ref, ours.eval(), x)
    assert a.shape == b.shape == (2, 3, 224, 320)
    assert_parity(a, b)


@pytest.mark.parametrize("seed,num_classes,in_channels,size", [
    (1, 1, 3, (64, 96)),     # smp's default: one class
    (2, 3, 1, (96, 64)),     # grayscale input: the stem conv takes 1 channel
    (3, 3, 3, (45, 71)),     # not divisible by 32: smp.Unet accepts it, so must we
    (4, 2, 4, (17, 9)),      # tiny and odd: every stage rounds its size
])
def test_parity_small(seed, num_classes, in_channels, size):
    ref, ours = build_pair(num_classes=num_classes, in_channels=in_channels, seed=seed)
    x = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(seed))
    b, a = outputs(ref, ours, x)
    assert a.shape == b.shape == (2, num_classes, *size)
    assert_parity(a, b)


def test_converted_from_disk_and_safetensors(tmp_path):
    """A torch.save'd smp state dict converts from disk; the minseg file carries num_classes/in_channels."""
    ref = build_smp(num_classes=1, in_channels=1, seed=5)
    path = tmp_path / "unet.pth"
    torch.save(ref.state_dict(), path)
    state, overrides = convert_with_overrides("smp", str(path), arch="unet_resnet34")
    assert overrides == {"num_classes": 1, "in_channels": 1}
    out = tmp_path / "unet.safetensors"
    save_weights(state, out, arch="unet_resnet34", source="smp", overrides=overrides)
    ours = minseg.create_model("unet_resnet34", weights=str(out))
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    b, a = outputs(ref, ours, x)
    assert_parity(a, b)


def test_every_key_consumed(smp_k3):
    _, state = smp_k3
    converted = minseg.convert("smp", state, arch="unet_resnet34")
    assert len(converted) == len(state)  # one to one: nothing dropped, nothing invented
    assert set(converted) == set(minseg.create_model("unet_resnet34", num_classes=3).state_dict())


@pytest.mark.parametrize("mutate,named", [
    (lambda s: s.update({"decoder.blocks.0.extra.weight": torch.zeros(1)}), "decoder.blocks.0.extra.weight"),
    (lambda s: s.pop("decoder.blocks.2.conv2.1.running_var"), "decoder.blocks.2.conv2.1.running_var"),
    (lambda s: s.update({"encoder.layer9.0.conv1.weight": s.pop("encoder.layer4.0.conv1.weight")}), "encoder.layer9.0.conv1.weight"),
    (lambda s: s.update({"decoder.blocks.1.conv1.3.weight": s.pop("decoder.blocks.1.conv1.0.weight")}), "decoder.blocks.1.conv1.3.weight"),
    (lambda s: s.update({"encoder.fc.weight": torch.zeros(1000, 512)}), "encoder.fc.weight"),
    (lambda s: s.update({"decoder.blocks.3.conv1.0.weight": torch.zeros(32, 100, 3, 3)}), "decoder.blocks.3.conv1.0.weight"),
])
def test_bad_keys_refused_by_name(smp_k3, mutate, named):
    state = dict(smp_k3[1])
    mutate(state)
    with pytest.raises(minseg.CheckpointError) as info:
        minseg.convert("smp", state, arch="unet_resnet34")
    # group_keys writes a.b.{x,y}: check the prefix and the last part separately
    head, _, tail = named.rpartition(".")
    assert head in str(info.value) and tail in str(info.value), str(info.value)


def test_attention_decoder_refused():
    """smp's scse attention adds weights minseg's U-Net has no place for: refused, naming them."""
    torch.manual_seed(0)
    ref = smp.Unet("resnet34", encoder_weights=None, classes=2, decoder_attention_type="scse")
    with pytest.raises(minseg.CheckpointError, match="attention1"):
        minseg.convert("smp", ref.state_dict(), arch="unet_resnet34")


def test_aux_classifier_dropped_by_rule():
    """smp's optional aux classification head is dropped by its named rule; the masks stay equal."""
    torch.manual_seed(0)
    ref = smp.Unet("resnet34", encoder_weights=None, classes=2, aux_params={"classes": 4}).eval()
    perturb_norms(ref, 7)
    ours = minseg.create_model("unet_resnet34", num_classes=2)
    ours.load_state_dict(minseg.convert("smp", ref.state_dict(), arch="unet_resnet34"), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        masks, _ = ref(x)
        assert_parity(ours(x), masks)


def test_wrong_inputs_raise_clearly():
    model = minseg.create_model("unet_resnet34", in_channels=1)
    with pytest.raises(ValueError, match="Tensor\\[N, 1, H, W\\]"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input channels"):
        model.predict(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="num_classes must be an integer in 1.."):
        minseg.create_model("unet_resnet34", num_classes=0)


def reference_block(block: DecoderBlock, x, size, skip):
    """The decoder block spelled out with functional ops: nearest resize, concat, 2 x (conv, BN, ReLU)."""
    y = F.interpolate(x, size=size, mode="nearest")
    if skip is not None:
        y = torch.cat([y, skip], dim=1)
    for unit in (block.conv1, block.conv2):
        conv, bn = unit[0], unit[1]
        y = F.conv2d(y, conv.weight, None, stride=1, padding=1)
        y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y = F.relu(y)
    return y


@settings(max_examples=30, deadline=None)
@given(cin=st.integers(1, 6), skip_channels=st.integers(0, 5), cout=st.integers(1, 6),
       h=st.integers(1, 7), w=st.integers(1, 7), H=st.integers(1, 15), W=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_decoder_block_matches_functional(cin, skip_channels, cout, h, w, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    block = DecoderBlock(cin, skip_channels, cout)
    perturb_norms(block, seed)
    block.eval()
    x = torch.randn(2, cin, h, w, generator=g)
    skip = torch.randn(2, skip_channels, H, W, generator=g) if skip_channels else None
    with torch.no_grad():
        got = block(x, (H, W), skip)
        want = reference_block(block, x, (H, W), skip)
    assert got.shape == (2, cout, H, W)
    torch.testing.assert_close(got, want)


def test_predict_labels_at_image_size():
    """predict = smp's preprocessing (0..1, ImageNet mean/std) + forward + softmax/argmax at the image's own size."""
    ref, ours = build_pair(num_classes=3, seed=8)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (45, 71, 3), dtype=np.uint8), rng.integers(0, 256, (33, 20, 3), dtype=np.uint8)]
    results = ours.predict(images)
    from segmentation_models_pytorch.encoders._preprocessing import preprocess_input

    # smp's resnet34 "imagenet" preprocessing parameters (its hub config; get_preprocessing_fn would fetch them)
    params = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_range": [0, 1], "input_space": "RGB"}
    for image, result in zip(images, results):
        H, W = image.shape[:2]
        assert result["labels"].shape == (H, W) and result["labels"].dtype == torch.int64
        assert result["probs"].shape == (3, H, W)
        x = torch.from_numpy(preprocess_input(image, **params).astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
        with torch.no_grad():
            probs = ref(x)[0].softmax(0)
        torch.testing.assert_close(result["probs"], probs, rtol=0, atol=1e-4)  # float32 vs smp's float64 preprocessing
        top2 = probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-3
        assert torch.equal(result["labels"][clear], probs.argmax(0)[clear])


def test_predict_binary():
    """num_classes=1 (smp's default): sigmoid probabilities, labels 1 where > 0.5."""
    model = minseg.create_model("unet_resnet34")
    result = model.predict(np.zeros((40, 50, 3), np.uint8))[0]
    assert result["probs"].shape == (1, 40, 50) and result["labels"].shape == (40, 50)
    assert torch.equal(result["labels"], (result["probs"][0] > 0.5).long())


def test_autocast_bfloat16_cpu():
    """Under CPU bfloat16 autocast minseg runs the same ops as smp, so the outputs still agree."""
    ref, ours = build_pair(num_classes=3, seed=9)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b, a = outputs(ref, ours, x)
    assert a.dtype == b.dtype and a.shape == (1, 3, 64, 96)
    assert_parity(a.float(), b.float())


@cuda
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_parity_cuda(dtype):
    ref, ours = build_pair(num_classes=3, seed=10)
    ref, ours = ref.cuda(), ours.cuda()
    x = torch.randn(2, 3, 224, 320, generator=torch.Generator().manual_seed(10)).cuda()
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        b, a = outputs(ref, ours, x)
    assert a.device.type == "cuda" and a.dtype == b.dtype
    assert_parity(a.float(), b.float())
