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

pytest.importorskip("pycocotools")


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
