"""The benchmark's baseline: the d2l chapter's FCN and its training step, built inline as the chapter
writes them, and fcnseg's FCN-32s holding the same weights.

The chapter's model is ResNet-18's children up to layer4, a 1x1 ``final_conv`` and
``nn.ConvTranspose2d(21, 21, 64, padding=16, stride=32)`` with the bilinear initialisation, float32,
NCHW, eager; its training step is SGD (lr 1e-3, weight decay 1e-3) on
``F.cross_entropy(reduction='none').mean(1).mean(1)`` summed, plus the chapter's accuracy count.
Its transposed convolution's bias (which the chapter leaves at its random initialisation, and which
fcnseg's upsampler, like the FCN paper's, does not have) is set to zero, so that both models compute
the same function from the same weights; this does not change its speed.

torch is imported inside the functions: the runner imports this module (through the cases) in the
parent process, which must not pay for torch before it has to.
"""
from __future__ import annotations

from typing import Any

from configurations import NUM_CLASSES


def build_baseline(seed: int = 0) -> tuple[Any, Any]:
    """The chapter's FCN exactly as d2l builds it (random body weights: nothing is downloaded), and
    the torchvision ResNet-18 its body was taken from (they share the body's modules)."""
    import torch
    import torchvision
    from torch import nn

    from fcnseg.models.upsample import bilinear_kernel

    torch.manual_seed(seed)
    pretrained_net = torchvision.models.resnet18()
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module("final_conv", nn.Conv2d(512, NUM_CLASSES, kernel_size=1))
    net.add_module("transpose_conv", nn.ConvTranspose2d(NUM_CLASSES, NUM_CLASSES, kernel_size=64, padding=16, stride=32))
    net.transpose_conv.weight.data.copy_(bilinear_kernel(NUM_CLASSES, NUM_CLASSES, 64))
    nn.init.zeros_(net.transpose_conv.bias)  # see the module docstring
    return net, pretrained_net


def fcnseg_from_baseline(net: Any, pretrained_net: Any, **kwargs: Any) -> Any:
    """fcnseg's FCN-32s holding the baseline's weights (copies: the baseline may be dropped after)."""
    import fcnseg

    model = fcnseg.fcn_resnet18(variant="32s", num_classes=NUM_CLASSES, weights_backbone=None, **kwargs)
    model.backbone.load_torchvision_state_dict(pretrained_net.state_dict())
    model.score32.load_state_dict(net.final_conv.state_dict())
    model.upsample_final.weight.data.copy_(net.transpose_conv.weight.data)
    return model


def d2l_loss(inputs: Any, targets: Any) -> Any:
    """The chapter's loss: per-pixel cross-entropy averaged over each image (one value per image)."""
    import torch.nn.functional as F

    return F.cross_entropy(inputs, targets, reduction="none").mean(1).mean(1)


def d2l_accuracy(y_hat: Any, y: Any) -> float:
    """The chapter's accuracy count (correct pixels), which its training loop computes every step."""
    y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


def chapter_step(net: Any, trainer: Any, x: Any, y: Any, *, count_accuracy: bool = True) -> Any:
    """One step of the chapter's training loop on a batch: the summed d2l loss backward, an SGD step,
    and (as the chapter's loop does; the loss-curve fit skips it) the accuracy count.

    Returns:
        the per-image losses.
    """
    trainer.zero_grad()
    pred = net(x)
    loss = d2l_loss(pred, y)
    loss.sum().backward()
    trainer.step()
    if count_accuracy:
        d2l_accuracy(pred, y)
    return loss


class VoidAsBackground:
    """The d2l crop, with the scenes' void boundary (255) read as background.

    The chapter's loss has no ignore index (its VOC reader maps the void border to class 0), so
    both sides of the epoch comparison train on the same labels without void.
    """

    def __init__(self, crop: tuple[int, int]) -> None:
        from fcnseg.data.transforms import d2l_transforms

        self.crop = d2l_transforms(crop_size=crop)

    def __call__(self, image: Any, mask: Any) -> tuple[Any, Any]:
        image, mask = self.crop(image, mask)
        return image, mask.masked_fill(mask == 255, 0)

    def __repr__(self) -> str:
        return f"VoidAsBackground({self.crop})"
