"""Every create_model option is checked for type and range before anything is built or read, from the Python API
(TypeError / ValueError), from a weight file's metadata (CheckpointError naming the file) and on the command line
(exit 2, one line). Bounds keep any option from asking for a huge allocation. Models are built on the meta device."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minseg
from minseg import registry
from minseg.cli import main
from minseg.models._options import MAX_CLASSES, MAX_SIDE

BAD = [  # (model, overrides, exception, words the message holds)
    ("fcn_resnet50", {"num_classes": -1}, ValueError, "num_classes must be an integer in 1..10000, got -1"),
    ("fcn_resnet50", {"num_classes": "3"}, TypeError, "got '3' (str)"),
    ("fcn_resnet50", {"num_classes": 3.0}, TypeError, "num_classes"),
    ("fcn_resnet50", {"num_classes": True}, TypeError, "num_classes"),
    ("fcn_resnet50", {"num_classes": 10**8}, ValueError, "num_classes"),  # was a 200 GB allocation
    ("fcn_resnet50", {"num_classes": 10**5000}, ValueError, "16610-bit integer"),  # past str()'s digit limit
    ("fcn_resnet50", {"num_clases": 3}, TypeError, "unknown option(s) num_clases; accepted: num_classes, aux_loss"),
    ("fcn_resnet101", {"depth": 50}, TypeError, "unknown option(s) depth"),  # the variant fixes it
    ("deeplabv3_resnet50", {"aux_loss": "yes"}, TypeError, "aux_loss must be true or false"),
    ("unet_resnet34", {"in_channels": 0}, ValueError, "in_channels"),
    ("unet_resnet34", {"num_classes": None}, TypeError, "num_classes"),
    ("yolact_resnet50", {"num_classes": 0}, ValueError, "num_classes must be an integer in 2.."),
    ("yolact_resnet50", {"num_classes": 1}, ValueError, "num_classes"),
    ("yolact_resnet101", {"conf_thresh": float("nan")}, ValueError, "conf_thresh"),
    ("yolact_im700", {"top_k": 0}, ValueError, "top_k"),
    ("yolact_darknet53", {"num_classes": 10_000, "top_k": 1000}, ValueError, "Fast NMS"),
    ("yolact_resnet50", {"aspect_ratios": [1, -2]}, ValueError, "aspect_ratios[1]"),
    ("yolact_resnet50", {"backbone": "darknet53"}, TypeError, "unknown option(s) backbone"),
    ("maskrcnn_resnet50_fpn", {"min_size": 30000, "max_size": 30000}, ValueError, "min_size"),  # was 8.1 GB
    ("maskrcnn_resnet50_fpn", {"num_classes": 1}, ValueError, "num_classes must be an integer in 2.."),
    ("maskrcnn_resnet50_fpn", {"box_score_thresh": float("inf")}, ValueError, "box_score_thresh"),
    ("maskrcnn_resnet50_fpn", {"rpn_post_nms_top_n_test": 10**7}, ValueError, "rpn_post_nms_top_n_test"),
    ("maskrcnn_resnet50_fpn", {"image_std": [0.2, 0.2, 0.0]}, ValueError, "image_std[2]"),
    ("maskrcnn_resnet50_fpn", {"image_mean": "abc" * 100}, TypeError, "image_mean must be a list of 3 numbers"),
    ("maskrcnn_resnet50_fpn", {"bbox_reg_weights": [1, 1, 1]}, TypeError, "bbox_reg_weights"),
    ("maskrcnn_resnet50_fpn_v2", {"norm": "gn"}, ValueError, "norm must be one of 'frozen', 'bn'"),
    ("maskrcnn_resnet50_fpn_v2", {"norm_eps": -1e-5}, ValueError, "norm_eps"),
    ("panoptic_fpn_resnet50", {"num_sem_seg_classes": 2.5}, TypeError, "num_sem_seg_classes"),
    ("panoptic_fpn_resnet101", {"fusion": {}}, TypeError, "fusion must be a FusionConfig"),
    ("panoptic_fpn_resnet50", {"min_size_test": 0}, ValueError, "min_size_test"),
]


@pytest.mark.parametrize("name, overrides, error, words", BAD)
def test_a_bad_option_is_refused_in_one_line(name, overrides, error, words):
    with pytest.raises(error) as caught:
        minseg.create_model(name, **overrides)
    message = str(caught.value)
    assert words in message and message.startswith(f"{name}: ")
    assert "\n" not in message and len(message) < 200


def test_every_model_takes_num_classes_and_its_defaults_pass():
    for name in minseg.list_models():
        assert "num_classes" in registry.options(name)
        registry.model_config(name)


@pytest.mark.parametrize("name, overrides", [
    ("fcn_resnet50", {"num_classes": MAX_CLASSES, "aux_loss": True}),
    ("yolact_resnet50", {"num_classes": 2, "conf_thresh": 0, "top_k": 1}),
    ("maskrcnn_resnet50_fpn", {"min_size": MAX_SIDE, "max_size": MAX_SIDE, "image_mean": [0, 0, 0], "norm": "bn"}),
    ("unet_resnet34", {"in_channels": 1024, "num_classes": 1}),
    ("panoptic_fpn_resnet50", {"num_classes": 1, "num_sem_seg_classes": 1}),
])
def test_the_bounds_themselves_build(name, overrides):
    with torch.device("meta"):
        model = registry.build_model(name, **overrides)
    assert isinstance(model, torch.nn.Module)


def weight_file(path, overrides: str, arch: str = "fcn_resnet50"):
    """A minseg .safetensors whose metadata holds `overrides` as written (its one tensor never matters: the
    overrides are refused before the weights are loaded)."""
    meta = {"arch": arch, "source": "torchvision", "minseg_version": "0.1.0", "overrides": overrides}
    save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("arch, overrides, words", [
    ("fcn_resnet50", '{"num_classes": -5}', "num_classes"),
    ("fcn_resnet50", '{"num_classes": 1e8}', "num_classes"),          # a float
    ("fcn_resnet50", '{"num_classes": 100000000}', "num_classes"),    # was 200 GB
    ("fcn_resnet50", '{"num_classes": "x"}', "num_classes"),
    ("fcn_resnet50", '{"weights": "official"}', "unknown option(s) weights"),
    ("fcn_resnet50", '[', "not valid JSON"),
    ("fcn_resnet50", 'null', "must be a JSON object"),
    ("fcn_resnet50", '[' * 3000, "not valid JSON"),                   # nesting past the recursion limit
    ("fcn_resnet50", '{"a": "' + "x" * 5000 + '"}', "at most 4096"),
    ("yolact_resnet50", '{"num_classes": 0}', "num_classes"),
    ("maskrcnn_resnet50_fpn", '{"min_size": 30000, "max_size": 30000}', "min_size"),
])
def test_a_weight_file_with_bad_overrides_is_refused_naming_the_file(tmp_path, arch, overrides, words):
    path = weight_file(tmp_path / "w.safetensors", overrides, arch)
    with pytest.raises(minseg.CheckpointError) as caught:
        minseg.create_model(arch, weights=str(path))
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message
    assert "\n" not in message and len(message) < 300


def test_explicit_overrides_win_and_are_checked_as_the_callers(tmp_path):
    path = weight_file(tmp_path / "w.safetensors", json.dumps({"num_classes": 3}))
    with pytest.raises(ValueError) as caught:  # the caller's value: not the file's fault
        minseg.create_model("fcn_resnet50", weights=str(path), num_classes=-1)
    assert not isinstance(caught.value, minseg.CheckpointError)
    with pytest.raises(minseg.CheckpointError, match="does not fit"):  # a valid value, then the weights' shapes
        minseg.create_model("fcn_resnet50", weights=str(path), num_classes=4)


def test_cli_exits_2_with_one_line_naming_the_file(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    path = weight_file(tmp_path / "w.safetensors", '{"num_classes": 100000000}')
    out = tmp_path / "out"
    assert main(["predict", "--model", "fcn_resnet50", "--weights", str(path), str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "num_classes" in err
    assert not out.exists()


def test_a_converted_checkpoint_with_an_out_of_range_shape_is_a_checkpoint_error():
    """Converters read options off tensor shapes; a shape beyond the bounds is the checkpoint's problem."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    with torch.device("meta"):
        state = smp.Unet("resnet34", encoder_weights=None).state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items() if k != "segmentation_head.0.weight"}
    state["segmentation_head.0.weight"] = torch.zeros(MAX_CLASSES + 1, 16, 3, 3)
    state["segmentation_head.0.bias"] = torch.zeros(MAX_CLASSES + 1)
    with pytest.raises(minseg.CheckpointError, match="num_classes must be an integer in 1..10000"):
        minseg.convert("smp", state, arch="unet_resnet34")
