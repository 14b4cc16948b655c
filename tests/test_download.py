"""`minseg download` / create_model(weights="official") end to end with file:// addresses (no network here)."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

import minseg
from minseg.download import download


@pytest.fixture()
def official(tmp_path, monkeypatch):
    """A torchvision FCN checkpoint named like torchvision's (sha256 prefix in the name) and a manifest for it."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    raw = tmp_path / "raw.pth"
    torch.save(ref.state_dict(), raw)
    prefix = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    path = tmp_path / f"fcn_resnet50_coco-{prefix}.pth"
    raw.rename(path)
    manifest = tmp_path / "manifest.json"
    entry = {"arch": "fcn_resnet50", "source": "torchvision", "file": path.name, "url": path.as_uri(),
             "hash": "sha256", "hash_prefix": prefix}
    manifest.write_text(json.dumps({"checkpoints": [entry]}))
    monkeypatch.setenv("MINSEG_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MINSEG_MANIFEST", str(manifest))
    return ref, path, manifest


def test_download_verify_convert_cache(official, tmp_path):
    ref, path, manifest = official
    target = download("fcn_resnet50", progress=False)
    assert target == tmp_path / "cache" / "fcn_resnet50.safetensors"
    model = minseg.create_model("fcn_resnet50", weights="official")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], ref(x)["out"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["fcn_resnet50.safetensors"]


def test_corrupt_download_refused_and_removed(official, tmp_path):
    ref, path, manifest = official
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(minseg.CheckpointError, match="does not match"):
        download("fcn_resnet50", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cli_download(official, tmp_path):
    r = subprocess.run([sys.executable, "-m", "minseg", "download", "fcn_resnet50"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / "fcn_resnet50.safetensors").is_file()
    r = subprocess.run([sys.executable, "-m", "minseg", "download", "unet_resnet34"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_torch_hub_local(official):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    model = torch.hub.load(str(repo), "fcn_resnet50", source="local", weights="official")
    ref = official[0]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], ref(x)["out"])
