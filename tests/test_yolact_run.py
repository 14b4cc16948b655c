"""`minseg train` and `minseg eval` for YOLACT at a small input side: the original's own mechanism for another
input size (cfg.max_size with the prior scales int(s / 550 * max_size), as its yolact_im400 / yolact_im700 configs
derive from yolact_base) keeps a step at 64 x 64 cheap enough for CPU tests. From random init (the original's
xavier init of everything but the backbone) on the tiny generated shapes: the loss falls and a short run overfits
them as `minseg eval` measures; --resume ends bitwise equal to an uninterrupted run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minseg
from minseg.cli import main
from minseg.data import transforms as T
from minseg.training.run import Settings, train
from minseg_ref.tiny_data import write_coco_instances

STEPS, LR = 60, 0.005         # the overfit run: the original's schedule (x0.1 at 35%, 75%, ...) at 40 x its 1-image lr
BOX_AP, MASK_AP = 0.25, 0.1   # at least: measured box AP 0.475 (AP50 0.75), mask AP 0.451 after 60 steps


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_max_size_sets_the_input_and_the_prior_scales():
    """max_size is a create_model option; the prior scales follow it as the original's im700 config derives them
    (int(s / 550 * 700) = 30, 61, 122, 244, 488), and at 550 they are yolact_base's."""
    assert minseg.create_model("yolact_resnet50", max_size=64).cfg.scales == (2, 5, 11, 22, 44)
    assert minseg.registry.model_config("yolact_im700").scales == (30, 61, 122, 244, 488)
    assert minseg.registry.model_config("yolact_resnet101").scales == (24, 48, 96, 192, 384)
    with pytest.raises(ValueError, match="max_size must be an integer in 64..4096"):
        minseg.create_model("yolact_resnet50", max_size=32)


def test_small_boxes_survive_the_resize():
    """The original's Resize compares pixel sides with discard_box_width = 4 / 550 (meant as a fraction): a lone
    3 x 3 object of a 128 x 128 image, 1.5 pixels wide at 64 x 64 unless a crop enlarges it, is always kept (a crop
    keeps the box whose centre it holds, and SSD's crop needs one)."""
    image = torch.zeros(3, 128, 128, dtype=torch.uint8)
    masks = torch.zeros(1, 128, 128, dtype=torch.uint8)
    masks[0, 60:63, 60:63] = 1
    target = {"boxes": torch.tensor([[60.0, 60.0, 63.0, 63.0]]), "masks": masks, "category_ids": torch.tensor([1]),
              "iscrowd": torch.tensor([False])}
    for seed in range(8):
        _, t = T.yolact_train(image, target, torch.Generator().manual_seed(seed), size=64)
        assert len(t["boxes"]) == 1 and t["masks"].shape == (1, 64, 64)


@pytest.fixture
def flush_denormal():
    """Subnormal floats as zero, on one thread (the flag is per thread, and torch's worker threads may predate it),
    for one test. A randomly initialised ResNet under frozen BatchNorm shrinks its activations stage by stage, and
    up to half the steps of the runs below then meet subnormal numbers: 6-7 s a step on 2 threads instead of 0.1 s
    (measured; with the flag, on one thread, 0.15-0.25 s a step, the same box AP and mask AP, the final loss equal
    to 4 digits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)  # torch's default
    torch.set_num_threads(threads)


def test_yolact_overfits_from_random_init(tmp_path, flush_denormal):
    """yolact_resnet50 at max_size 64 (--image-size 64) from random init, BatchNorm frozen as train.py sets it below
    6 images, the original's SGD and schedule at a higher lr, on one 48x64 image (two shapes and a crowd): in 60
    steps the loss falls from 24.08 to 8.06 and the box loss from 8.25 to 2.85 (measured), and `minseg eval` of the
    saved run (rebuilt at max_size 64 from the file's overrides) reaches box AP 0.475 (AP50 0.75), mask AP 0.451
    (measured). Runs this short from random init are sensitive to the lr: the mask loss spikes above 0.005 (0.01:
    box AP 0.35, mask AP 0; 0.015: the loss ends at 610)."""
    pytest.importorskip("pycocotools")  # minseg eval's COCO AP
    data = write_coco_instances(tmp_path / "ins", n=1, size=(48, 64))
    out = tmp_path / "run"
    assert main(["train", "--model", "yolact_resnet50", "--data", str(data), "--out", str(out), "--steps", str(STEPS),
                 "--batch-size", "1", "--lr", str(LR), "--image-size", "64", "--no-augment", "--log-every", "1"]) == 0
    log = log_of(out)
    assert {"box", "class", "mask", "semantic"} < set(log[0])
    assert log[-1]["loss"] < 0.5 * log[0]["loss"] and log[-1]["box"] < 0.5 * log[0]["box"]
    model = minseg.create_model("yolact_resnet50", weights=out / "last.safetensors")
    assert model.cfg.max_size == 64 and model.cfg.freeze_bn
    assert main(["eval", "--model", "yolact_resnet50", "--weights", str(out / "last.safetensors"), "--data", str(data),
                 "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] > BOX_AP and metrics["segm"]["AP"] > MASK_AP


def test_yolact_resume_is_bitwise(tmp_path, flush_denormal):
    """3 steps with the SSD augmentation at max_size 64, against 1 step then --resume: the same weights bit for bit
    (optimiser state, the schedule's milestones, the per-sample augmentation seeds and the global RNG restored)."""
    data = write_coco_instances(tmp_path / "ins", n=2, size=(48, 64))
    settings = dict(model="yolact_resnet50", data=str(data), steps=3, batch_size=2, lr=0.01, image_size=64,
                    log_every=1)
    train(Settings(out=str(tmp_path / "a"), **settings))
    train(Settings(out=str(tmp_path / "b"), **settings), stop_after=1)
    assert log_of(tmp_path / "b")[-1]["step"] == 1
    assert main(["train", "--model", "yolact_resnet50", "--data", str(data), "--out", str(tmp_path / "b"),
                 "--resume", "--log-every", "1"]) == 0
    a, b = load_file(str(tmp_path / "a" / "last.safetensors")), load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [line["step"] for line in log_of(tmp_path / "b")] == [1, 2, 3]


@pytest.mark.parametrize("name", ["yolact_resnet50", "yolact_darknet53"])
def test_training_input_is_the_models_preprocessing(name):
    """The adapter normalises as SSDAugmentation's BackboneTransform, which is the model's preprocess:
    mean/std for ResNet, / 255 for DarkNet (an image already S x S, so preprocess's resize is the identity)."""
    from minseg.data.labels import label_map
    from minseg.training.adapters import Recipe, yolact_loss

    model = minseg.create_model(name, max_size=64)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 64, 64),
              "category_ids": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=torch.bool)}
    seen = {}

    class Recorder:
        cfg = model.cfg

        def __call__(self, x):
            seen["x"] = x
            return {}

        def loss(self, outputs, targets):
            return {}

    recipe = Recipe("yolact", label_map(name, [{"id": 1, "name": "a"}]), 2, False, 64)
    yolact_loss(Recorder(), recipe, [(image.float(), target)], torch.device("cpu"))
    assert torch.equal(seen["x"], model.preprocess(image.permute(1, 2, 0).numpy()))


def test_warmup_starts_at_the_originals_lr_warmup_init():
    """train.py scales cfg.lr to the batch (autoscale) but not lr_warmup_init: at batch 2 the lr rises from 1e-4 to
    2.5e-4 over 500 iterations, set_lr((lr - 1e-4) * it / 500 + 1e-4)."""
    from minseg.training import optim

    model = torch.nn.Linear(2, 2)
    lr = optim.default_lr("yolact", 2)
    sgd = optim.build_optimizer("yolact", model, lr)
    assert lr == 2.5e-4 and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 5e-4
    for step, expected in [(0, 1e-4), (250, 1.75e-4), (500, 2.5e-4), (279_999 * 4, 2.5e-4), (280_000 * 4, 2.5e-5)]:
        assert optim.set_lr(sgd, "yolact", lr, step, 800_000 * 4) == pytest.approx(expected, rel=1e-12)
