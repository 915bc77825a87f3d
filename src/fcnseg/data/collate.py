"""Batching whole images of different sizes."""
from __future__ import annotations

from typing import Sequence

import torch

from fcnseg.constants import IGNORE_INDEX


def pad_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (image, target) pairs of different sizes by padding at the bottom and right.

    Images are padded with 0 (the mean colour once normalised) and targets with 255, so padded
    pixels are ignored by the loss and the metrics, and every original pixel keeps its coordinates.

    Args:
        batch: pairs of image (C, H_i, W_i) and target (H_i, W_i).

    Returns:
        image (N, C, H, W) and target (N, H, W), where H, W are the largest in the batch.
    """
    if not batch:
        raise ValueError("pad_collate got an empty batch")
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    first_image, first_target = batch[0]
    images = first_image.new_zeros((len(batch), first_image.shape[0], height, width))
    targets = first_target.new_full((len(batch), height, width), IGNORE_INDEX)
    for k, (image, target) in enumerate(batch):
        h, w = image.shape[-2:]
        images[k, :, :h, :w] = image
        targets[k, :h, :w] = target
    return images, targets
