"""Hostile and broken inputs: checkpoints that must be refused without running anything, odd images."""
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import minseg
from minseg.image import load_rgb


class Payload:
    """Unpickling this runs `touch MARKER` — what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(Payload):
    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def hostile_files(tmp_path, marker):
    """A corpus of hostile checkpoints in the formats users download: .pth zip, legacy .pth, plain pickle."""
    state = {"backbone.conv1.weight": torch.zeros(1), "evil": Payload(marker)}
    nested = {"model": {"a": {"b": [ExecPayload(marker)]}}, "__author__": "x"}
    files = {}
    for name, obj in (("flat", state), ("nested", nested)):
        files[f"{name}_zip.pth"] = lambda p, o=obj: torch.save(o, p)
        files[f"{name}_legacy.pth"] = lambda p, o=obj: torch.save(o, p, _use_new_zipfile_serialization=False)
        files[f"{name}.pkl"] = lambda p, o=obj: p.write_bytes(pickle.dumps(o))
    paths = []
    for name, write in files.items():
        path = tmp_path / name
        write(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("source,arch", [("torchvision", "fcn_resnet50"), ("smp", "unet_resnet34"),
                                         ("yolact", "yolact_resnet50"), ("detectron2", "panoptic_fpn_resnet50")])
def test_hostile_checkpoints_never_run(tmp_path, source, arch):
    if arch not in minseg.list_models():
        pytest.skip(f"{arch} not built yet")
    marker = tmp_path / "marker"
    for path in hostile_files(tmp_path, marker):
        with pytest.raises(minseg.CheckpointError):
            minseg.convert(source, str(path), arch=arch)
        assert not marker.exists(), f"{path.name} ran code through the {source} converter"


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
                                     b"PK\x03\x04truncated zip"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])  # torch.load hands .safetensors to safetensors
def test_broken_files_refused(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(minseg.CheckpointError):
        minseg.convert("torchvision", str(path), arch="fcn_resnet50")


@pytest.fixture(scope="module")
def small_state():
    """A valid torchvision FCN-ResNet50 state dict (random init)."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=2).state_dict()


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_mutated_state_dicts_are_refused(small_state, data):
    keys = list(small_state)
    key = data.draw(st.sampled_from([k for k in keys if "num_batches_tracked" not in k]))
    kind = data.draw(st.sampled_from(["drop", "rename", "reshape", "to_int"]))
    state = dict(small_state)
    if kind == "drop":
        del state[key]
    elif kind == "rename":
        state[key + "_x"] = state.pop(key)
    elif kind == "reshape":
        state[key] = state[key].reshape(-1)[:-1] if state[key].numel() > 1 else torch.zeros(2)
    else:
        state[key] = state[key].to(torch.int64)
    with pytest.raises(minseg.CheckpointError) as e:
        minseg.convert("torchvision", state, arch="fcn_resnet50")
    assert key.split(".")[-1] in str(e.value) or kind == "rename"


def test_float64_state_is_cast(small_state):
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in small_state.items()}
    out = minseg.convert("torchvision", state, arch="fcn_resnet50")
    assert all(v.dtype == torch.float32 for k, v in out.items() if "num_batches" not in k)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def test_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    cases = {
        "gray.png": base.convert("L"), "rgba.png": base.convert("RGBA"), "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
    }
    for name, img in cases.items():
        out = load_rgb(save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (8, 6)
    sixteen = Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000)
    out = np.asarray(load_rgb(save(sixteen, tmp_path / "deep.png")))
    assert out.shape == (6, 8, 3) and out[0, 1, 0] == round(1000 / 257) and out.max() == round(47000 / 257)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (4, 8)


def test_unreadable_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    for name in ("empty.png", "text.png"):
        with pytest.raises(ValueError, match="not a readable image"):
            load_rgb(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="uint8"):
        load_rgb(np.zeros((4, 4, 3), np.float32))


def test_tiny_and_elongated_images():
    model = minseg.create_model("fcn_resnet50", num_classes=2)
    (out,) = model.predict(np.zeros((1, 1, 3), np.uint8))
    assert out["labels"].shape == (1, 1)
    with pytest.raises(ValueError, match="elongated"):
        model.predict(np.zeros((1, 2000, 3), np.uint8))
    for name in ("maskrcnn_resnet50_fpn", "panoptic_fpn_resnet50"):  # resized to a long side of 1333: short 0 px
        with pytest.raises(ValueError, match="elongated"):
            minseg.create_model(name).predict(np.zeros((1, 3000, 3), np.uint8))


def non_finite_input(name: str):
    """Model `name`'s input format holding one NaN, one inf and one -inf (in its second image for the detectors)."""
    g = torch.Generator().manual_seed(0)
    clean, bad = torch.rand(3, 40, 48, generator=g), torch.rand(3, 40, 48, generator=g)
    bad[0, 1, 2], bad[1, 3, 4], bad[2, 39, 47] = float("nan"), float("inf"), -float("inf")
    if name.startswith("maskrcnn"):
        return [clean, bad], "image 1"
    if name.startswith("panoptic_fpn"):
        return [{"image": clean * 255}, {"image": bad * 255}], "image 1"
    return bad[None], "input"


@pytest.mark.parametrize("name", minseg.list_models())
def test_non_finite_inputs_refused(name):
    model = minseg.create_model(name)
    x, where = non_finite_input(name)
    message = f"{where} contains NaN or inf values \\(3 of 5760 elements\\)"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(x)


def test_non_finite_check_compiles_with_fullgraph():
    """The NaN/inf check branches on tensor values: skipped while torch.compile traces, so fullgraph=True still
    captures a network that calls it (minseg_ref/compile_check.py compiles whole models)."""
    from minseg.models._inputs import check_images

    def net(x):
        check_images(x)
        return x * 2

    x = torch.randn(1, 3, 8, 8)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(net, fullgraph=True, backend="eager")(x), x * 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        net(x.log())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minseg", *args], capture_output=True, text=True)


def test_cli_bad_images_exit_2(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    out = tmp_path / "out"
    r = run_cli("predict", "--model", "fcn_resnet50", str(tmp_path / "text.png"), "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_cli_bad_device_exit_2(tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    out = tmp_path / "out"
    for device in ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"]):
        r = run_cli("predict", "--model", "fcn_resnet50", "--device", device, str(image), "--out", str(out))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert device in r.stderr and not out.exists()


@pytest.mark.parametrize("command", ["list", "convert", "predict", "parity", "bench"])
def test_help_for_every_subcommand(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage" in r.stdout
