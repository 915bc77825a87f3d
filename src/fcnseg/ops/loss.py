"""Per-pixel cross-entropy over the void label: the reference loss the fused loss must equal."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fcnseg.constants import IGNORE_INDEX


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel cross-entropy ignoring the void label.

    Args:
        logits: ``(N, C, H, W)``.
        target: ``(N, H, W)`` int64.
        class_weights: optional ``(C,)`` weights (e.g. median frequency balancing).
        reduction: "mean" over labelled pixels, or "d2l": the chapter's sum over images of each
            image's mean pixel loss (its ``l.sum().backward()`` on per-image means), which scales
            the gradient with the batch size.
    """
    logits = logits.float()
    if reduction == "mean":
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    labelled = (target != ignore_index).flatten(1).sum(1).clamp(min=1)
    return (per_pixel.flatten(1).sum(1) / labelled).sum()
