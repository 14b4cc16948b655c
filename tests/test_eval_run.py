"""`minseg eval` end to end on tiny generated datasets with random-init models (small settings for speed):
metrics equal brute-force references and pycocotools run directly on the written predictions.json, two
processes under torchrun print exactly what one prints, and every bad-data case exits 2 with one line naming
the file and leaves --out untouched."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minseg
from minseg.cli import main
from minseg.data import open_dataset
from minseg.weights import save_weights
from minseg_ref.tiny_data import write_coco_instances, write_coco_panoptic, write_semantic
from test_data import BAD, _break
from test_metrics import brute_force_pq, brute_force_stats

REPO = Path(__file__).resolve().parents[1]
SMALL = {  # tiny inputs and few proposals, so that a CPU test runs in seconds
    "unet_resnet34": {"num_classes": 3},
    "maskrcnn_resnet50_fpn": {"num_classes": 8, "min_size": 64, "max_size": 96, "rpn_pre_nms_top_n_test": 100,
                              "rpn_post_nms_top_n_test": 50, "box_detections_per_img": 30},
    "panoptic_fpn_resnet50": {"num_classes": 2, "num_sem_seg_classes": 3, "min_size_test": 64, "max_size_test": 96},
}
WRITERS = {"unet_resnet34": lambda root, n: write_semantic(root, n=n, num_classes=3),
           "maskrcnn_resnet50_fpn": lambda root, n: write_coco_instances(root, n=n),
           "panoptic_fpn_resnet50": lambda root, n: write_coco_panoptic(root, n=n)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("weights"), {}

    def get(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            model = minseg.create_model(name, **SMALL[name])
            made[name] = folder / f"{name}.safetensors"
            save_weights(model.state_dict(), made[name], arch=name, source="test", overrides=SMALL[name])
        return made[name]

    return get


def run_eval(capsys, name, weights, data, out, *extra):
    code = main(["eval", "--model", name, "--weights", str(weights), "--data", str(data), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rgb(image):
    return image.permute(1, 2, 0).numpy()


def test_semantic_miou_matches_brute_force(tmp_path, weights, capsys):
    data = WRITERS["unet_resnet34"](tmp_path / "data", 3)
    code, out, _ = run_eval(capsys, "unet_resnet34", weights("unet_resnet34"), data, tmp_path / "out")
    assert code == 0 and "mIoU" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    model = minseg.create_model("unet_resnet34", weights=weights("unet_resnet34"))
    inter, union = np.zeros(3), np.zeros(3)
    for image, target, _ in open_dataset(data):
        pred = model.predict([rgb(image)])[0]["labels"].numpy()
        mask = target["mask"].numpy()
        valid = mask != 255
        for k in range(3):
            inter[k] += ((pred == k) & (mask == k) & valid).sum()
            union[k] += (((pred == k) | (mask == k)) & valid).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    got = np.array([np.nan if c["iou"] is None else c["iou"] for c in metrics["per_class"]])
    np.testing.assert_allclose(got, iou, rtol=0, atol=1e-12)
    assert metrics["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12) and metrics["images"] == 3


def test_coco_ap_matches_pycocotools_on_the_written_predictions(tmp_path, weights, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    name = "maskrcnn_resnet50_fpn"
    data = WRITERS[name](tmp_path / "data", 3)
    code, out, _ = run_eval(capsys, name, weights(name), data, tmp_path / "out")
    assert code == 0 and "mask AP" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    # torchvision's labels are category ids: an id the dataset lacks is passed on, and COCOeval ignores it
    assert predictions and {p["category_id"] for p in predictions} <= set(range(1, 8))
    assert all(isinstance(p["segmentation"]["counts"], str) for p in predictions)
    gt = COCO(str(data / "annotations.json"))

    def score(results, iou_type):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        return evaluator.stats.tolist()

    box = score(str(tmp_path / "out" / "predictions.json"), "bbox")  # the file as it is
    assert list(metrics["bbox"].values()) == box
    # segm: detectron2's COCOEvaluator drops the boxes so that areas come from the masks; AP, AP50, AP75 do not
    # depend on it
    mask = score([{k: v for k, v in p.items() if k != "bbox"} for p in predictions], "segm")
    assert list(metrics["segm"].values()) == mask
    assert score(str(tmp_path / "out" / "predictions.json"), "segm")[:3] == mask[:3]


class Oracle:
    """Stands in for Mask R-CNN with non-trivial AP: each image's ground truth shifted by a few pixels, a third of
    the labels wrong, random scores."""

    def __init__(self, dataset, seed=0):
        self.targets, self.rng = iter([t for _, t, _ in dataset]), np.random.default_rng(seed)

    def predict(self, images):
        t = next(self.targets)
        K = len(t["boxes"])
        shift = self.rng.integers(-3, 4, K).tolist()
        masks = torch.stack([m.roll(d, dims=1) for m, d in zip(t["masks"], shift)]) if K else t["masks"]
        labels = torch.where(torch.from_numpy(self.rng.random(K) < 0.33),
                             torch.from_numpy(self.rng.choice([1, 3, 7], K)), t["category_ids"])
        return [{"boxes": t["boxes"] + torch.tensor(shift, dtype=torch.float32)[:, None] * torch.tensor([1, 0, 1, 0]),
                 "labels": labels, "scores": torch.from_numpy(self.rng.random(K)).float(),
                 "masks": masks[:, None].float()}]


def test_coco_ap_of_an_oracle_matches_pycocotools(tmp_path):
    """Non-zero AP through evaluate() and write_outputs, against pycocotools on the written file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from minseg.evaluate import evaluate, write_outputs

    data = write_coco_instances(tmp_path / "data", n=6)
    dataset = open_dataset(data)
    metrics = evaluate("maskrcnn_resnet50_fpn", Oracle(dataset), dataset, progress=False)
    write_outputs(tmp_path / "out", metrics, metrics.pop("predictions"))
    gt = COCO(str(data / "annotations.json"))
    for iou_type in ("bbox", "segm"):
        results = json.loads((tmp_path / "out" / "predictions.json").read_text())
        if iou_type == "segm":
            results = [{k: v for k, v in p.items() if k != "bbox"} for p in results]
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert list(metrics[iou_type].values()) == evaluator.stats.tolist()
        assert 0.2 < metrics[iou_type]["AP"] < 0.9
        for k, c in enumerate(evaluator.params.catIds):
            p = evaluator.eval["precision"][:, :, k, 0, -1]
            row = next(r for r in metrics["per_class"] if r["id"] == c)
            assert row[f"{iou_type}_ap"] == pytest.approx(p[p > -1].mean(), abs=1e-15)


class Recorder:
    """A model whose predictions are kept, for the brute-force reference to score the same outputs."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def predict(self, images):
        out = self.model.predict(images)
        self.outputs.extend(out)
        return out


def test_panoptic_pq_matches_brute_force(tmp_path, weights):
    """(The command line's panoptic run is checked by the torchrun test below.)"""
    from minseg.evaluate import evaluate

    name = "panoptic_fpn_resnet50"
    dataset = open_dataset(WRITERS[name](tmp_path / "data", 2))
    model = Recorder(minseg.create_model(name, weights=weights(name)))
    metrics = evaluate(name, model, dataset, progress=False)
    total = {}
    for (_, target, _), result in zip(dataset, model.outputs, strict=True):
        pcat = {0: -1} | {s["id"]: (1, 3)[s["category_id"]] if s["isthing"] else (10, 20)[s["category_id"] - 1]
                          for s in result["segments_info"]}
        tcat = {0: -1} | {s["id"]: s["category_id"] for s in target["segments"]}
        crowds = {s["id"] for s in target["segments"] if s["iscrowd"]}
        stats = brute_force_stats(result["panoptic_seg"].numpy(), pcat, target["panoptic"].numpy(), tcat, crowds)
        for c, s in stats.items():
            total[c] = [a + b for a, b in zip(total.get(c, [0.0, 0, 0, 0]), s)]
    assert any(s["iscrowd"] for s in dataset[0][1]["segments"])
    per_class = {c["id"]: c for c in metrics["per_class"]}
    assert set(per_class) == set(total)
    for c, (iou, tp, fp, fn) in total.items():
        assert (per_class[c]["tp"], per_class[c]["fp"], per_class[c]["fn"]) == (tp, fp, fn)
    expected = brute_force_pq(total)
    for c, pq in expected.items():
        assert per_class[c]["pq"] == pytest.approx(pq, abs=1e-12)
    for group, ids in (("all", {1, 3, 10, 20}), ("things", {1, 3}), ("stuff", {10, 20})):
        values = [expected[c] for c in expected if c in ids]
        assert metrics[group]["pq"] == pytest.approx(np.mean(values) if values else 0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["unet_resnet34", "maskrcnn_resnet50_fpn", "panoptic_fpn_resnet50"])
def test_two_processes_print_the_one_process_numbers(tmp_path, weights, name):
    """torchrun --nproc_per_node 2 (gloo): rank 0 takes images 0 and 2, rank 1 image 1; the records are gathered
    back into dataset order, so stdout and the written files are byte for byte those of one process."""
    data = WRITERS[name](tmp_path / "data", 3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread each: the same float sums
    args = ["-m", "minseg", "eval", "--model", name, "--weights", str(weights(name)), "--data", str(data), "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], capture_output=True, text=True, env=env,
                         timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and "1 process)" in one.stderr and "2 processes)" in two.stderr
    for file in sorted(os.listdir(tmp_path / "one")):
        assert (tmp_path / "two" / file).read_bytes() == (tmp_path / "one" / file).read_bytes(), file


MODEL_FOR = {"no mask": "unet_resnet34", "mask size": "unet_resnet34", "label": "unet_resnet34",
             "unreadable image": "unet_resnet34", "unreadable coco image": "maskrcnn_resnet50_fpn",
             "malformed json": "maskrcnn_resnet50_fpn", "json schema": "maskrcnn_resnet50_fpn",
             "bad rle": "maskrcnn_resnet50_fpn", "panoptic size": "panoptic_fpn_resnet50",
             "panoptic id": "panoptic_fpn_resnet50", "no layout": "unet_resnet34"}


def _problem_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("eval: ")]  # progress lines aside


def check_refused(capsys, tmp_path, weights, kind, out):
    named = _break(tmp_path / "data", kind)
    name = MODEL_FOR[kind]
    code, stdout, err = run_eval(capsys, name, weights(name), tmp_path / "data", out)
    lines = _problem_lines(err)
    assert code == 2 and len(lines) == 1 and str(named) in lines[0] and stdout == "", err


@pytest.mark.parametrize("kind", BAD)
def test_bad_data_exits_2_naming_the_file(tmp_path, weights, capsys, kind):
    """--out holds an earlier run's file: it stays as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("earlier run")
    check_refused(capsys, tmp_path, weights, kind, out)
    assert os.listdir(out) == ["metrics.json"] and (out / "metrics.json").read_text() == "earlier run"


@pytest.mark.parametrize("kind", ["label", "malformed json"])  # refused per item, and at open
def test_bad_data_creates_no_out_folder(tmp_path, weights, capsys, kind):
    check_refused(capsys, tmp_path, weights, kind, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_pycocotools_is_one_line(tmp_path, weights, capsys, monkeypatch):
    data = write_coco_instances(tmp_path / "data", n=1)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)
    code, _, err = run_eval(capsys, "maskrcnn_resnet50_fpn", weights("maskrcnn_resnet50_fpn"), data, tmp_path / "out")
    assert code == 2 and _problem_lines(err) == [
        "minseg eval: error: COCO AP needs pycocotools, the `eval` extra: pip install 'minseg[eval]'"]
    assert not (tmp_path / "out").exists()


def test_model_and_dataset_must_agree(tmp_path, weights, capsys):
    data = write_coco_instances(tmp_path / "data", n=1)
    code, _, err = run_eval(capsys, "unet_resnet34", weights("unet_resnet34"), data, tmp_path / "out")
    assert code == 2 and "needs a semantic dataset" in err and not (tmp_path / "out").exists()
