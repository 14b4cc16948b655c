"""ResNet, ASPP, registry, weights and converter framework: properties against direct computations, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import minseg
from minseg.backbones.resnet import resnet
from minseg.necks.aspp import ASPP
from minseg.ops.layers import FrozenBatchNorm2d, MaxPool2d
from minseg.weights import load_weights, save_weights


def conv_bn_relu(x, seq, relu=True):
    """Functional conv -> batch norm (eval) -> ReLU from a ConvNormAct's parameters."""
    conv, bn = seq[0], seq[1]
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.relu(y) if relu else y


def randomise_norms(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.running_mean.shape[0]
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return module


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 21), w=st.integers(1, 21), rates=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       seed=st.integers(0, 100))
def test_aspp_equals_direct_computation(h, w, rates, seed):
    torch.manual_seed(seed)
    aspp = randomise_norms(ASPP(8, tuple(rates), out_channels=4), seed).eval()
    x = torch.randn(2, 8, h, w)
    branches = [conv_bn_relu(x, b) for b in aspp.branches]
    pooled = conv_bn_relu(x.mean((2, 3), keepdim=True), aspp.pooling.conv)
    branches.append(pooled.expand(-1, -1, h, w))  # bilinear upsampling of a 1x1 map is a broadcast
    expected = conv_bn_relu(torch.cat(branches, 1), aspp.project)
    with torch.no_grad():
        got = aspp(x)
    assert got.shape == (2, 4, h, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), dilate=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_resnet_output_sizes(h, w, dilate):
    """Each stride-2 step maps n -> floor((n - 1) / 2) + 1 (conv k3/p1, k7/p3, k1/p0 and the max pool all agree)."""
    model = resnet(50, replace_stride_with_dilation=dilate).eval()
    half = lambda n: (n - 1) // 2 + 1
    sizes = {"c1": (half(h), half(w))}
    sizes["c2"] = (half(sizes["c1"][0]), half(sizes["c1"][1]))
    for level, previous, d in (("c3", "c2", dilate[0]), ("c4", "c3", dilate[1]), ("c5", "c4", dilate[2])):
        sizes[level] = sizes[previous] if d else (half(sizes[previous][0]), half(sizes[previous][1]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == sizes


def test_resnet_out_features_returns_those_stages_unchanged():
    """out_features only chooses what forward keeps (the rest is freed early); the kept stages are bitwise equal."""
    torch.manual_seed(0)
    full = randomise_norms(resnet(50)).eval()
    some = resnet(50, out_features=("c2", "c5")).eval()
    some.load_state_dict(full.state_dict())
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        a, b = full(x), some(x)
    assert list(b) == ["c2", "c5"] and all(torch.equal(b[k], a[k]) for k in b)
    with pytest.raises(ValueError, match="out_features"):
        resnet(50, out_features=("c6",))


def test_dilated_stage_equals_direct_computation():
    """layer4 of a dilation-(F,T,T) ResNet-50: first block dilation 2, later blocks 4, stride 1 (torchvision's rule)."""
    torch.manual_seed(0)
    model = randomise_norms(resnet(50, replace_stride_with_dilation=(False, True, True))).eval()
    block0, block1 = model.layer4[0], model.layer4[1]
    assert block0.conv2.dilation == (2, 2) and block1.conv2.dilation == (4, 4) and block0.conv2.stride == (1, 1)
    x = torch.randn(1, 1024, 9, 11)

    def bottleneck(x, b):
        y = conv_bn_relu(x, (b.conv1, b.bn1))
        y = conv_bn_relu(y, (b.conv2, b.bn2))
        y = conv_bn_relu(y, (b.conv3, b.bn3), relu=False)
        identity = conv_bn_relu(x, b.downsample, relu=False) if b.downsample is not None else x
        return F.relu(y + identity)

    expected = bottleneck(bottleneck(x, block0), block1)
    with torch.no_grad():
        got = block1(block0(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_frozen_batch_norm_arithmetics_agree():
    bn = randomise_norms(torch.nn.BatchNorm2d(6)).eval()
    x = torch.randn(2, 6, 5, 5)
    for arithmetic in ("affine", "batch_norm"):
        frozen = FrozenBatchNorm2d(6, arithmetic=arithmetic)
        frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and ignored
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 19), w=st.integers(1, 19), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool_without_indices_equals_nn_max_pool(h, w, ties, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, h, w, generator=g)
    if ties:  # many equal maxima in a window: the recomputed argmax must pick the forward's
        x = x.round().relu()
    grad = torch.randn(2, 3, (h - 1) // 2 + 1, (w - 1) // 2 + 1, generator=g)
    results = []
    for pool in (torch.nn.MaxPool2d(3, 2, 1), MaxPool2d(3, 2, 1)):
        xi = x.clone().requires_grad_()
        y = pool(xi)
        y.backward(grad)
        results.append((y, xi.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_max_pool_saves_no_index_tensor():
    x = torch.randn(1, 4, 16, 16).relu().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaxPool2d(3, 2, 1)(x)
    assert [t.dtype for t in saved] == [torch.float32] and saved[0].data_ptr() == x.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(MaxPool2d(3, 2, 1)(x), F.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)


def test_registry_errors():
    with pytest.raises(ValueError, match="fcn_resnet50"):
        minseg.create_model("fcn_resnet5")
    with pytest.raises(TypeError, match="num_clases"):
        minseg.create_model("fcn_resnet50", num_clases=3)
    assert "deeplabv3_resnet101" in minseg.list_models()


@pytest.fixture(scope="module")
def fcn_checkpoint(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    path = tmp_path_factory.mktemp("ckpt") / "fcn.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_convert_save_load_roundtrip(fcn_checkpoint, tmp_path):
    ref, path = fcn_checkpoint
    state = minseg.convert("torchvision", str(path), arch="fcn_resnet50")
    out = tmp_path / "fcn.safetensors"
    save_weights(state, out, arch="fcn_resnet50", source="torchvision", overrides={"num_classes": 3, "aux_loss": False})
    loaded, meta = load_weights(out)
    assert meta["arch"] == "fcn_resnet50" and meta["source"] == "torchvision" and meta["minseg_version"]
    model = minseg.create_model("fcn_resnet50", weights=str(out))  # num_classes comes from the file's metadata
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], ref(x)["out"])


def test_convert_refusals(fcn_checkpoint, tmp_path):
    ref, path = fcn_checkpoint
    with pytest.raises(minseg.CheckpointError, match="no such file"):
        minseg.convert("torchvision", str(tmp_path / "missing.pth"), arch="fcn_resnet50")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 100_000])
    with pytest.raises(minseg.CheckpointError):
        minseg.convert("torchvision", str(truncated), arch="fcn_resnet50")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(minseg.CheckpointError):
        minseg.convert("torchvision", str(text), arch="fcn_resnet50")
    with pytest.raises(minseg.CheckpointError, match="head|classifier"):  # an FCN checkpoint is not a DeepLabV3
        minseg.convert("torchvision", str(path), arch="deeplabv3_resnet50")
    state = ref.state_dict()
    state["classifier.0.weight"] = state["classifier.0.weight"][:, :10]
    with pytest.raises(minseg.CheckpointError, match=r"head.block.0.weight expects \(512, 2048, 3, 3\)"):
        minseg.convert("torchvision", state, arch="fcn_resnet50")
    state = dict(ref.state_dict())
    del state["backbone.layer2.0.conv1.weight"]
    state["backbone.layer9.weight"] = torch.zeros(1)
    with pytest.raises(minseg.CheckpointError, match="layer9") as e:
        minseg.convert("torchvision", state, arch="fcn_resnet50")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minseg", *args], capture_output=True, text=True)


def test_cli_convert_and_errors(fcn_checkpoint, tmp_path):
    ref, path = fcn_checkpoint
    out = tmp_path / "fcn.safetensors"
    r = run_cli("convert", "--from", "torchvision", "--arch", "fcn_resnet50", str(path), str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    bad = tmp_path / "bad.safetensors"
    for args in (["--arch", "deeplabv3_resnet50", str(path)], ["--arch", "fcn_resnet50", str(tmp_path / "nope.pth")]):
        r = run_cli("convert", "--from", "torchvision", *args, str(bad))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert not bad.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left behind
    r = run_cli("list")
    assert r.returncode == 0 and "fcn_resnet50" in r.stdout.split()
