"""What a new user meets first (issue 22): honest predict output, parity/bench rows as they finish, a row for
every listed model, pictures whose colours can be told apart, uniform JSON, help texts.

CLI cases run `minseg.cli.main` in this process with captured stdout/stderr (a subprocess per case would
spend most of its time importing torch); an uncaught exception fails the test. The download cases (offline,
no address, hostile servers) are in test_download.py.
"""
import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import minseg
from minseg.cli import main
from minseg.data.classes import TORCHVISION_COCO_CLASSES
from minseg.visualize import describe, instance_overlay, palette, panoptic_colours, panoptic_overlay, place_tag, srgb_to_lab


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def min_delta_e(colours: np.ndarray) -> float:
    lab = srgb_to_lab(np.asarray(colours, np.float64))
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    return float(d[~np.eye(len(lab), dtype=bool)].min())


# ---------------------------------------------------------------------------------------------------------------------
# predict: which weights, and what came out

def test_predict_says_random_init_and_summarises(tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = tmp_path / "out"
    rc, stdout, stderr = cli(capsys, "predict", "--model", "unet_resnet34", str(tmp_path / "a.png"), "--out", str(out))
    assert rc == 0, stderr
    assert stdout.split() == [str(out / "a.unet_resnet34.png"), str(out / "a.unet_resnet34.json")]
    lines = stderr.splitlines()
    assert len(lines) == 2 and "random init" in lines[0] and "no --weights" in lines[0]
    assert lines[1].startswith(f"{tmp_path / 'a.png'}: ") and "class" in lines[1]
    info = json.loads((out / "a.unet_resnet34.json").read_text())
    assert info["weights"] == "random init" and info["summary"] == lines[1].split(": ", 1)[1]


def test_predict_names_its_weights(tmp_path, capsys):
    from minseg.weights import save_weights

    model = minseg.create_model("unet_resnet34", num_classes=2)
    weights = tmp_path / "u.safetensors"
    save_weights(model.state_dict(), weights, arch="unet_resnet34", source="smp", overrides={"num_classes": 2})
    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "a.png")
    rc, stdout, stderr = cli(capsys, "predict", "--model", "unet_resnet34", "--weights", str(weights),
                             str(tmp_path / "a.png"), "--out", str(tmp_path / "out"))
    assert rc == 0, stderr
    assert "random init" not in stderr and len(stderr.splitlines()) == 1
    assert json.loads((tmp_path / "out" / "a.unet_resnet34.json").read_text())["weights"] == str(weights)


def test_summaries():
    assert describe({"detections": []}) == "0 detections"
    detections = [{"score": 0.9}, {"score": 0.2}]
    assert describe({"detections": detections}, 0.5) == "2 detections, 1 drawn (score >= 0.5)"
    segments = [{"isthing": True}, {"isthing": False}, {"isthing": False}]
    assert describe({"segments_info": segments}) == "3 segments: 1 thing, 2 stuff"
    classes = [{"name": "background", "pixels": 75}, {"name": "cat", "pixels": 25}]
    assert describe({"classes": classes}) == "2 classes: background 75%, cat 25%"


# ---------------------------------------------------------------------------------------------------------------------
# pictures: distinct fixed colours, things vs stuff, labels, uniform JSON

def test_palette_is_fixed_and_distinct():
    things, stuff = panoptic_colours()
    assert len(things) == 80 and len(stuff) == 54  # stuff 0: detectron2's "things" placeholder
    assert min_delta_e(np.concatenate([things, stuff[1:]])) >= 16  # every COCO panoptic class from every other
    assert min_delta_e(palette(21)) >= 35  # Pascal VOC's classes
    assert np.array_equal(palette(7), palette(200)[:7])  # class i gets colour i, whatever n is asked
    # the pairs the issue reported as indistinguishable: "baseball glove" vs "sand", "cabinet-merged" vs "food-other-merged"
    from minseg.data.classes import COCO_CLASSES, COCO_PANOPTIC_STUFF

    glove, sand = things[COCO_CLASSES.index("baseball glove")], stuff[COCO_PANOPTIC_STUFF.index("sand")]
    cabinet, food = stuff[COCO_PANOPTIC_STUFF.index("cabinet-merged")], stuff[COCO_PANOPTIC_STUFF.index("food-other-merged")]
    assert min_delta_e([glove, sand]) >= 16 and min_delta_e([cabinet, food]) >= 16


def synthetic_panoptic(h=120, w=160):
    """Five stuff bands and six thing boxes (two classes repeated), as detectron2 lists them."""
    seg = np.zeros((h, w), np.int32)
    info, sid = [], 0
    for i, cat in enumerate([21, 30, 40, 2, 5]):
        sid += 1
        seg[i * h // 5:(i + 1) * h // 5] = sid
        info.append({"id": sid, "isthing": False, "category_id": cat, "area": 0})
    for k, cat in enumerate([34, 34, 0, 0, 0, 60]):
        sid += 1
        seg[10 + 15 * k:30 + 15 * k, 5 + 22 * k:30 + 22 * k] = sid
        info.append({"id": sid, "isthing": True, "category_id": cat, "score": 0.9 - 0.1 * k, "instance_id": k})
    return {"panoptic_seg": torch.from_numpy(seg), "segments_info": info}


def test_panoptic_overlay_legend_labels_and_uniform_segments():
    rgb = np.full((120, 160, 3), 128, np.uint8)
    result = synthetic_panoptic()
    picture, info = panoptic_overlay(rgb, result)
    segments = info["segments_info"]
    assert len({tuple(sorted(s)) for s in segments}) == 1  # the same keys on every segment
    assert set(segments[0]) == {"id", "category_id", "isthing", "name", "score", "area"}
    assert all(s["score"] is None for s in segments if not s["isthing"])
    assert all(isinstance(s["score"], float) for s in segments if s["isthing"])
    seg = result["panoptic_seg"].numpy()
    assert all(s["area"] == int((seg == s["id"]).sum()) for s in segments)
    json.dumps(info)  # plain JSON types only
    # legend: "things:" then 3 classes, "stuff:" then 5; swatch colours pairwise distinct
    legend = np.asarray(picture)[:, 160:]
    rows = [4 + i * 14 + 5 for i in range(10)]
    swatches = legend[rows, 9]  # centre of each swatch column
    colours = np.delete(swatches, [0, 4], axis=0)  # rows 0 and 4 hold the headings "things:" and "stuff:"
    assert min_delta_e(colours) >= 16
    # labels drawn on the image: stuff tags are white boxes, so white appears off the (white) segment borders
    from minseg.visualize import boundaries

    white = (np.asarray(picture)[:120, :160] == 255).all(-1)
    assert (white & ~boundaries(seg)).sum() > 100


def test_instance_tags_inside_and_named():
    rng = np.random.default_rng(0)
    h, w, k = 120, 160, 20
    corner = torch.tensor(rng.random((k, 2)) * [w, h], dtype=torch.float32)
    boxes = torch.cat([corner, corner + torch.tensor(rng.random((k, 2)) * 40 + 10, dtype=torch.float32)], 1)
    labels = torch.tensor([12, 26, 1, 3] * 5)  # 12 and 26: torchvision's unused ("N/A") COCO ids
    result = {"boxes": boxes, "labels": labels, "scores": torch.linspace(0.99, 0.6, k), "masks": torch.zeros(k, 1, h, w)}
    picture, info = instance_overlay(np.zeros((h, w, 3), np.uint8), result, TORCHVISION_COCO_CLASSES)
    names = [d["name"] for d in info["detections"]]
    assert "N/A" not in names and names[:2] == ["class 12", "class 26"]
    assert picture.size == (w, h)


def test_place_tag_inside_and_apart():
    taken = []
    for _ in range(3):  # three tags wanted at the same spot, off the top-right corner
        rect = place_tag([(150, -5), (150, 12), (150, 24)], (30, 12), (160, 120), taken)
        assert 0 <= rect[0] and rect[2] <= 160 and 0 <= rect[1] and rect[3] <= 120
        assert not any(rect[0] < t[2] and t[0] < rect[2] and rect[1] < t[3] and t[1] < rect[3] for t in taken)
        taken.append(rect)


# ---------------------------------------------------------------------------------------------------------------------
# parity: a row for every listed model, rows as they finish, the checks explained

def test_every_listed_model_has_a_parity_row():
    from minseg_ref.parity import all_checks

    assert set(minseg.list_models()) <= set(all_checks())


def test_parity_streams_rows_and_explains_checks(monkeypatch, capsys):
    from minseg_ref import parity
    from minseg_ref.common import ParityRow

    seen, printed = [], []

    def fake(name, checks):
        def check():
            seen.append(name)
            printed.append(capsys.readouterr().out)  # what was printed before this check ran
            nan = float("nan")
            return ParityRow(name, "orig", 0.0 if checks == "numbers" else nan, 0.0 if checks == "numbers" else nan,
                             True, "why", checks=checks)
        return "orig", check

    monkeypatch.setattr(parity, "all_checks", lambda: {"a": fake("a", "numbers"), "b": fake("b", "structure only")})
    rc = main(["parity"])
    out, err = capsys.readouterr()
    assert rc == 0 and seen == ["a", "b"] and err == ""  # no progress line: stderr is not a terminal
    assert printed[0] == "" and printed[1].splitlines()[2].startswith("a ")  # header and row a, before b ran
    lines = out.splitlines()
    assert lines[0].startswith("b ") and "structure only" in lines[0] and " - " in lines[0]
    assert lines[-1].startswith("checks: ") and "structure only" in lines[-1]


def test_bench_streams_rows(monkeypatch, capsys):
    from minseg_ref import bench

    printed = []

    def fake(name):
        def measure(device, repeats):
            printed.append(capsys.readouterr().out)
            return bench.BenchRow(name, device, "1x3x8x8", 2.0, 1.0)
        return measure

    monkeypatch.setattr(bench, "family_benches", lambda: {"a": fake("a"), "b": fake("b")})
    assert main(["bench", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    assert printed[0] == "" and printed[1].splitlines()[2].startswith("a ") and err == ""
    assert out.splitlines()[0].startswith("b ") and "ratio = minseg time" in out


def test_progress_line_only_on_a_terminal():
    from minseg_ref.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        with Progress(2, stream) as progress:
            progress.step(1, "fcn_resnet50")
            progress.clear()
    assert "[1/2] fcn_resnet50 ..." in tty.getvalue() and pipe.getvalue() == ""


# ---------------------------------------------------------------------------------------------------------------------
# help

def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"minseg {minseg.__version__}"
    for argv, words in [(["list", "--help"], ["model names"]),
                        (["predict", "--help"], ["IMAGE", "image files", "random init", "model name", "output directory"]),
                        (["download", "--help"], ["--sha256", "24-bit"])]:
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert all(w in out for w in words), (argv, out)
