"""Train mode of FCN, DeepLabV3 and U-Net against torchvision and smp: same seeded weights, batch of 2 at an odd
size with ignored pixels, three SGD steps (momentum, weight decay). Loss, every gradient, weights and BatchNorm
running statistics are compared bit for bit (minseg_ref/parity_train.py runs the recipe)."""
import pytest
import torch

from minseg_ref.parity_train import compare_training

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50", "unet_resnet34"])
def test_training_steps_equal_original(name):
    """FCN R50 and DeepLabV3 R50 with aux under torchvision's criterion; U-Net R34 under smp's Dice + Focal."""
    if name == "unet_resnet34":
        pytest.importorskip("segmentation_models_pytorch")
    r = compare_training(name, num_classes=5, steps=3, size=(37, 53))
    assert r.bitwise, (f"not bitwise: loss {r.loss.max_abs:.3g}, grads {r.grads.max_abs:.3g} "
                       f"(rel {r.grads.max_rel:.3g}), state {r.state.max_abs:.3g}; first: {r.mismatched[:5]}")


def copy_in_order(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load src's state into dst entry by entry (the two heads list the same tensors in the same order)."""
    src_values = list(src.state_dict().values())
    dst_state = dst.state_dict()
    assert [v.shape for v in src_values] == [v.shape for v in dst_state.values()]
    dst.load_state_dict(dict(zip(dst_state, src_values)), strict=True)


@pytest.mark.parametrize("head", ["fcn", "deeplab"])
def test_head_dropout_draws_the_originals_mask(head):
    """Train-mode heads (dropout p=0.1 in FCN's head, p=0.5 after ASPP): the same seed gives the original's output
    and mask, another seed a different one, so the training test above holds with dropout in play."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead as TVDeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead as TVFCNHead

    from minseg.models.deeplabv3 import DeepLabHead
    from minseg.models.fcn import FCNHead

    torch.manual_seed(0)
    ref = TVFCNHead(64, 3) if head == "fcn" else TVDeepLabHead(64, 3)
    ours = FCNHead(64, 3) if head == "fcn" else DeepLabHead(64, 3)
    copy_in_order(ref, ours)
    ref.train(), ours.train()
    x = torch.randn(2, 64, 9, 11, generator=torch.Generator().manual_seed(1))
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        a = ref(x)
        torch.manual_seed(seed)
        outputs.append(ours(x))
        assert torch.equal(outputs[-1], a)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
