"""`minseg train` end to end on tiny generated datasets (CPU, 32-64 pixel images, a few steps each): the loss falls
and a short run overfits, --resume ends bitwise equal to an uninterrupted run, two torchrun processes hold equal
weights after every step and equal one process with the same global batch, bad data exits 2 with --out untouched,
and the augmentations move targets with their images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minseg
from minseg.cli import main
from minseg.data import open_dataset
from minseg.data import transforms as T
from minseg.data.coco import mask_boxes
from minseg.training import adapters
from minseg.training.run import Settings, train
from minseg_ref.tiny_data import write_coco_instances, write_coco_panoptic, write_semantic

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv) -> int:
    return main(["train", *map(str, argv)])


def weights_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "last.safetensors"))


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> Path:
    return write_semantic(tmp_path_factory.mktemp("data") / "sem", n=2, size=(32, 32), num_classes=3)


def test_unet_overfits_and_writes_a_run(semantic, tmp_path, capsys):
    """From random init, 24 Adam steps on two 32x32 images: the Dice loss falls to under a fifth and the saved
    model (eval mode: running statistics) reaches mIoU > 0.9 on its training images by `minseg eval` (measured:
    0.992); the run's files are all there."""
    out = tmp_path / "run"
    assert run_cli("--model", "unet_resnet34", "--data", semantic, "--out", out, "--num-classes", 3, "--steps", 24,
                   "--lr", 2e-3, "--no-augment", "--log-every", 1) == 0
    log = log_of(out)
    assert [line["step"] for line in log] == list(range(1, 25))
    assert log[-1]["dice"] < 0.2 * log[0]["dice"]
    assert set(log[0]) == {"step", "loss", "dice", "lr", "seconds", "data_seconds"}
    assert Image.open(out / "loss.png").size == (800, 480)
    assert "step 24/24" in capsys.readouterr().err
    assert main(["eval", "--model", "unet_resnet34", "--weights", str(out / "last.safetensors"), "--data",
                 str(semantic), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["miou"] > 0.9


def test_unet_resume_extends_bitwise(tmp_path):
    """U-Net's schedule is constant, so --steps 1 then --resume --steps 3 (from the middle of an epoch of two
    batches) is the uninterrupted 3-step run, bit for bit."""
    data = write_semantic(tmp_path / "sem", n=4, size=(32, 32), num_classes=3)
    common = ["--model", "unet_resnet34", "--data", data, "--num-classes", 3, "--lr", 1e-3, "--image-size", 32,
              "--log-every", 1]
    assert run_cli(*common, "--out", tmp_path / "a", "--steps", 3) == 0
    assert run_cli(*common, "--out", tmp_path / "b", "--steps", 1) == 0
    assert run_cli(*common, "--out", tmp_path / "b", "--steps", 3, "--resume") == 0
    assert_bitwise_equal(weights_of(tmp_path / "a"), weights_of(tmp_path / "b"))
    assert [line["step"] for line in log_of(tmp_path / "b")] == [1, 2, 3]
    assert run_cli(*common, "--out", tmp_path / "a", "--steps", 3) == 2  # refuses to replace a run


def test_maskrcnn_loss_falls_and_resume_is_bitwise(tmp_path):
    """Mask R-CNN v1 from random init on one 48x64 image (resized to 64, batch 1; a Mask R-CNN step costs seconds
    on CPU even this small): the summed loss falls in 3 steps; stopped after 1 and resumed (optimiser, the RNG of
    the anchor and proposal sampling, data order), the weights equal the uninterrupted run's bit for bit."""
    data = write_coco_instances(tmp_path / "ins", n=1, size=(48, 64))
    settings = dict(model="maskrcnn_resnet50_fpn", data=str(data), steps=3, batch_size=1, lr=0.01, image_size=64,
                    augment=False, log_every=1)
    train(Settings(out=str(tmp_path / "a"), **settings))
    log = log_of(tmp_path / "a")
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} < set(log[0])
    assert log[-1]["loss"] < log[0]["loss"]
    train(Settings(out=str(tmp_path / "b"), **settings), stop_after=1)
    assert log_of(tmp_path / "b")[-1]["step"] == 1
    assert run_cli("--model", "maskrcnn_resnet50_fpn", "--data", data, "--out", tmp_path / "b", "--resume",
                   "--log-every", 1) == 0
    assert_bitwise_equal(weights_of(tmp_path / "a"), weights_of(tmp_path / "b"))
    assert [line["step"] for line in log_of(tmp_path / "b")] == [1, 2, 3]


def test_torchrun_two_processes_equal_one(semantic, tmp_path):
    """FCN with frozen BatchNorm, no dropout (its masks are drawn per process) and CE on masks without ignored
    pixels: under torchrun (gloo) both ranks hold the same weights after every step (--check-replicas compares
    their sha256), and the result equals one process with the same global batch of 2 to float rounding."""
    data = tmp_path / "sem"
    write_semantic(data, n=2, size=(32, 32), num_classes=3)
    for mask in (data / "masks").iterdir():  # no ignored pixels: each rank's mean is then half the global mean
        labels = np.array(Image.open(mask))
        Image.fromarray(np.where(labels == 255, 0, labels).astype(np.uint8), mode="L").save(mask)
    common = ["--model", "fcn_resnet50", "--data", data, "--num-classes", 3, "--steps", 2, "--no-augment",
              "--freeze-bn", "--no-dropout", "--lr", 0.01, "--log-every", 1]
    assert run_cli(*common, "--out", tmp_path / "one", "--batch-size", 2) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "minseg", "train", *map(str, common), "--out", str(tmp_path / "two"), "--batch-size", "1",
           "--check-replicas"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = weights_of(tmp_path / "one"), weights_of(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-7)  # measured: at most 7.5e-9 apart


def test_num_classes_reinitialises_only_class_layers(semantic, tmp_path, capsys):
    first = tmp_path / "first"
    assert run_cli("--model", "unet_resnet34", "--data", semantic, "--out", first, "--num-classes", 3, "--steps", 1,
                   "--image-size", 32) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    binary = tmp_path / "binary"
    write_semantic(binary, n=2, size=(32, 32), num_classes=2)
    assert run_cli("--model", "unet_resnet34", "--data", binary, "--out", second, "--weights",
                   first / "last.safetensors", "--num-classes", 2, "--steps", 1, "--image-size", 32, "--amp") == 0
    err = capsys.readouterr().err
    assert "--num-classes 2 differs from the weights' 3: re-initialised classifier (random init)" in err
    assert minseg.create_model("unet_resnet34", weights=second / "last.safetensors").classifier.out_channels == 2


def _break_semantic(root: Path, case: str) -> Path:
    masks = root / "masks"
    if case == "missing mask":
        (masks / "0001.png").unlink()
        return root / "images" / "0001.png"
    if case == "mask of another size":
        Image.new("L", (20, 20)).save(masks / "0001.png")
        return masks / "0001.png"
    if case == "label >= num_classes":
        Image.fromarray(np.full((32, 32), 7, np.uint8), mode="L").save(masks / "0001.png")
        return masks / "0001.png"
    (root / "images" / "0001.png").write_bytes(b"not a png")  # unreadable image
    return root / "images" / "0001.png"


@pytest.mark.parametrize("case", ["missing mask", "mask of another size", "label >= num_classes", "unreadable image",
                                  "malformed json"])
def test_bad_data_exits_2_and_leaves_out_untouched(tmp_path, capsys, case):
    if case == "malformed json":
        data = write_coco_instances(tmp_path / "ins", n=2)
        (data / "annotations.json").write_text('{"images": [')
        named, model = data / "annotations.json", "maskrcnn_resnet50_fpn"
    else:
        data = write_semantic(tmp_path / "sem", n=2, size=(32, 32), num_classes=3)
        named, model = _break_semantic(data, case), "unet_resnet34"
    out = tmp_path / "out"
    assert run_cli("--model", model, "--data", data, "--out", out, "--num-classes", 3, "--steps", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(named) in err[0], err
    assert not out.exists()


def test_images_without_objects_are_left_out_as_each_original_does(tmp_path, capsys):
    """Each original filters its training set (adapters.trains_on): torchvision leaves out an image without annotations
    or whose boxes are all at most 1 pixel on a side, detectron2 one with crowds only, YOLACT only one without any
    annotation. A set with nothing left to train on exits 2, --out untouched."""
    data = write_coco_instances(tmp_path / "ins", n=4)
    coco = json.loads((data / "annotations.json").read_text())
    by_image = {i: [a for a in coco["annotations"] if a["image_id"] == i] for i in (1, 2, 3, 4)}
    thin = {**by_image[3][0], "bbox": [5.0, 5.0, 1.0, 20.0]}
    coco["annotations"] = [a for a in by_image[1] if a["iscrowd"]] + [thin] + by_image[4]  # image 2: none at all
    (data / "annotations.json").write_text(json.dumps(coco))
    dataset = open_dataset(data)
    kept = {family: [dataset.ids[i] for i in range(len(dataset)) if adapters.trains_on(family, dataset.objects(i))]
            for family in ("maskrcnn", "panoptic_fpn", "yolact", "semantic")}
    assert kept == {"maskrcnn": [1, 4], "panoptic_fpn": [3, 4], "yolact": [1, 3, 4], "semantic": [1, 2, 3, 4]}

    assert run_cli("--model", "maskrcnn_resnet50_fpn", "--data", data, "--out", tmp_path / "a", "--steps", 1,
                   "--batch-size", 1, "--image-size", 64) == 0
    assert "on 2 images (instances, 2 without objects left out as the original's)" in capsys.readouterr().err

    coco["annotations"] = []
    (data / "annotations.json").write_text(json.dumps(coco))
    assert run_cli("--model", "yolact_resnet50", "--data", data, "--out", tmp_path / "b", "--steps", 1,
                   "--image-size", 64) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of its 4 images holds an object" in err[0], err
    assert not (tmp_path / "b").exists()


def test_transforms_move_targets_with_images(tmp_path):
    """Boxes stay the boxes of their masks through each recipe's flips, resizes and crops (to a pixel of
    nearest-neighbour rounding), and a seed gives the same result twice."""
    image, target, _ = open_dataset(write_coco_instances(tmp_path / "ins", n=1))[0]
    for recipe in (lambda i, t, g: T.detection_train(i, t, g), lambda i, t, g: T.shortest_edge_train(i, t, g),
                   lambda i, t, g: T.yolact_train(i, t, g, size=96)):
        for seed in range(4):
            a = recipe(image, target, torch.Generator().manual_seed(seed))
            b = recipe(image, target, torch.Generator().manual_seed(seed))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
            boxes, masks = a[1]["boxes"], a[1]["masks"].bool()
            assert masks.shape[-2:] == a[0].shape[-2:]
            torch.testing.assert_close(boxes, mask_boxes(masks), atol=2.0, rtol=0)
    mask = torch.randint(0, 3, (40, 50))
    out, t = T.segmentation_train(image[:, :40, :50], {"mask": mask}, torch.Generator().manual_seed(0),
                                  base_size=40, crop_size=36)
    assert out.shape == (3, 36, 36) and t["mask"].shape == (36, 36)


def test_yolact_step(tmp_path):
    """One YOLACT step through its adapter (SSD augmentation, relative boxes, S x S masks, crowds last): the four
    losses of model.loss are logged and finite. --image-size sets YOLACT's input side (max_size, priors scaled)."""
    data = write_coco_instances(tmp_path / "ins", n=1)  # image 0 holds a crowd
    assert run_cli("--model", "yolact_resnet50", "--data", data, "--out", tmp_path / "run", "--steps", 1,
                   "--batch-size", 1, "--log-every", 1, "--image-size", 64) == 0
    (line,) = log_of(tmp_path / "run")
    assert {"box", "class", "mask", "semantic"} < set(line) and np.isfinite(line["loss"])


def test_panoptic_fpn_step(tmp_path):
    data = write_coco_panoptic(tmp_path / "pan", n=2)  # image 0's one thing is a crowd: detectron2 leaves it out
    assert run_cli("--model", "panoptic_fpn_resnet50", "--data", data, "--out", tmp_path / "run", "--steps", 1,
                   "--batch-size", 1, "--image-size", 64, "--log-every", 1) == 0
    (line,) = log_of(tmp_path / "run")
    assert {"loss_rpn_cls", "loss_sem_seg", "loss_mask"} < set(line) and np.isfinite(line["loss"])


def test_model_options_from_the_command_line(semantic, tmp_path, capsys, monkeypatch):
    """--option KEY=VALUE reaches the fresh run's create_model options (int, float, bool or text); an unknown option
    exits 2 with one line naming it and a malformed one is refused by the parser, --out untouched either way."""
    seen = {}
    monkeypatch.setattr("minseg.training.run.train", lambda s: seen.setdefault("options", s.options))
    assert run_cli("--model", "panoptic_fpn_resnet50", "--data", semantic, "--out", tmp_path / "a",
                   "--option", "norm=GN", "--option", "freeze_at=0", "--option", "sem_seg_loss_weight=0.25") == 0
    assert seen["options"] == {"norm": "GN", "freeze_at": 0, "sem_seg_loss_weight": 0.25}
    monkeypatch.undo()
    out = tmp_path / "b"
    argv = ("--model", "unet_resnet34", "--data", semantic, "--out", out, "--steps", 1, "--num-classes", 3)
    assert run_cli(*argv, "--option", "colour=red") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "colour" in err[0], err
    with pytest.raises(SystemExit) as exit_:
        run_cli(*argv, "--option", "colour")
    assert exit_.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert not out.exists()
