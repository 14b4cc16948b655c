"""`minseg predict` for every family: overlay PNG and JSON written, nothing else left in the output folder."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import minseg

FAMILIES = ["deeplabv3_resnet50", "unet_resnet34", "yolact_resnet50", "panoptic_fpn_resnet50", "maskrcnn_resnet50_fpn"]


@pytest.mark.parametrize("name", FAMILIES)
def test_predict_writes_png_and_json(tmp_path, name):
    if name not in minseg.list_models():
        pytest.skip(f"{name} not built")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "minseg", "predict", "--model", name, str(tmp_path / "photo.jpg"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"photo.{name}.json", f"photo.{name}.png"]
    picture = Image.open(out / f"photo.{name}.png")
    assert picture.height >= 48 and picture.width >= 64
    info = json.loads((out / f"photo.{name}.json").read_text())
    assert info["model"] == name and any(k in info for k in ("classes", "detections", "segments_info"))
