"""The loss of a training run: class weights, and the FCN's loss with its last upsampling fused."""
from __future__ import annotations

import torch

from fcnseg.constants import IGNORE_INDEX
from fcnseg.models.fcn import FCN, OUTPUT_STRIDE, pad_to_multiple
from fcnseg.ops.fused_loss import upsample_cross_entropy
from fcnseg.ops.loss import segmentation_loss
from fcnseg.ops.losses import dice_loss, training_loss


def median_frequency_weights(dataset, num_classes: int) -> torch.Tensor:
    """Median frequency balancing (Eigen & Fergus): ``median(freq) / freq_c``.

    ``freq_c`` is the pixel count of class c over the pixel count of the images containing c.
    Reads every mask of ``dataset`` once (``read_pair`` when available, else ``dataset[i]``).
    """
    class_pixels = torch.zeros(num_classes, dtype=torch.float64)
    image_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(dataset)):
        target = dataset.read_pair(i)[1] if hasattr(dataset, "read_pair") else dataset[i][1]
        target = torch.as_tensor(target).long().flatten()
        target = target[target != IGNORE_INDEX]
        counts = torch.bincount(target, minlength=num_classes)[:num_classes].double()
        class_pixels += counts
        image_pixels += (counts > 0).double() * target.numel()
    freq = class_pixels / image_pixels.clamp(min=1)
    present = freq > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = freq[present].median() / freq[present]
    return weights.float()


def fcn_cross_entropy(
    model: FCN,
    image: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    dice: bool = False,
) -> torch.Tensor:
    """``segmentation_loss(model(image), target)`` with the model's last upsampling fused into the loss.

    The whole model trains as it would through ``model(image)`` (same modules, same BatchNorm
    behaviour); only the final upsampler and the cross-entropy are computed by
    `upsample_cross_entropy`. A fixed final upsampler runs unfused.

    Args:
        model: an `FCN`, not wrapped (DistributedDataParallel synchronises gradients through the
            wrapper's forward call, which this bypasses).
        image: ``(N, 3, H, W)`` normalised.
        target: ``(N, H, W)`` int64.
        dice: add the soft Dice loss (the "ce+dice" loss of `fcnseg.ops.losses`).
    """
    if not model.upsample_final.learnable:
        logits = model(image)
        loss = segmentation_loss(logits, target, class_weights=class_weights, reduction=reduction,
                                 ignore_index=ignore_index)
        return loss + dice_loss(logits, target, ignore_index=ignore_index) if dice else loss
    features = model.backbone(pad_to_multiple(image, OUTPUT_STRIDE))
    return upsample_cross_entropy(model.scores(*features), model.upsample_final, target, class_weights=class_weights,
                                  reduction=reduction, ignore_index=ignore_index, dice=dice)


def logits_loss(net: torch.nn.Module, name: str, image: torch.Tensor, target: torch.Tensor, *,
                class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``training_loss(net(image), target, name)``: a loss of `fcnseg.ops.losses` on the full logits
    (the losses for thin classes read every pixel's probabilities, so the upsampling is not fused)."""
    return training_loss(net(image), target, name, class_weights=class_weights)
