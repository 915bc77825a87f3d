"""Losses for thin and rare classes, beside the per-pixel cross-entropy of `fcnseg.ops.loss`.

A pole or a sign covers a fraction of a percent of CamVid's pixels, so cross-entropy, an average over
pixels, hardly sees it. These losses weigh errors differently: OHEM trains on the hardest pixels
only (Shrivastava et al. 2016, as mmsegmentation's ``OHEMPixelSampler``), the Lovasz-softmax loss
(Berman et al. 2018) optimises a surrogate of each class's IoU, and the Dice loss each class's
overlap, so that every class present counts the same whatever its size.

Written here rather than taken from segmentation_models_pytorch, whose losses are the ones users
know: that package would bring timm and the Hub client into every install for three functions. The
tests check these against smp's implementations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fcnseg.constants import IGNORE_INDEX
from fcnseg.ops.loss import segmentation_loss

LOSSES: tuple[str, ...] = ("ce", "ohem", "lovasz", "ce+dice", "ce+lovasz")
OHEM_THRESHOLD = 0.7  # mmsegmentation's default: pixels whose true class has probability below it are hard
OHEM_MIN_KEPT = 1 / 16  # at least this share of the labelled pixels is kept, the hardest first


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, class_weights: torch.Tensor | None = None,
                       threshold: float = OHEM_THRESHOLD, min_kept: float = OHEM_MIN_KEPT,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over the hard pixels: true-class probability below ``threshold``, and at least the
    ``min_kept`` share of labelled pixels with the lowest probabilities.

    Args:
        logits: ``(N, C, H, W)``; target: ``(N, H, W)`` int64 with ``ignore_index`` for void.
        class_weights: optional ``(C,)`` weights of the pixels kept.

    Returns:
        the mean loss of the kept pixels (weighted mean with ``class_weights``), a scalar.
    """
    logits = logits.float()
    labelled = target != ignore_index
    with torch.no_grad():
        safe = target.masked_fill(~labelled, 0)
        prob = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1).masked_fill(~labelled, 2.0)
        count = int(labelled.sum())
        keep = max(1, int(count * min_kept)) if count else 0
        hard = prob < threshold
        if int(hard.sum()) < keep:  # too few under the threshold: the `keep` least certain pixels
            cutoff = prob.flatten().kthvalue(keep).values
            hard = prob <= cutoff
        hard &= labelled
    return segmentation_loss(logits, target.masked_fill(~hard, ignore_index), class_weights=class_weights,
                             ignore_index=ignore_index)


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The Lovasz-softmax loss over the batch's labelled pixels, averaged over the classes present.

    Args:
        logits: ``(N, C, H, W)``; target: ``(N, H, W)`` int64.

    Returns:
        a scalar; 0 when no pixel is labelled.
    """
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    labelled = labels != ignore_index
    probs, labels = probs[labelled], labels[labelled]
    losses = []
    for c in labels.unique():
        truth = (labels == c).float()
        errors = (truth - probs[:, c]).abs()
        errors, order = errors.sort(descending=True)
        losses.append(errors @ lovasz_grad(truth[order]))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def lovasz_grad(sorted_truth: torch.Tensor) -> torch.Tensor:
    """The gradient of the Lovasz extension of the Jaccard loss at the errors sorted (Berman et al., Alg. 1)."""
    total = sorted_truth.sum()
    intersection = total - sorted_truth.cumsum(0)
    union = total + (1 - sorted_truth).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-7,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``1 - soft Dice`` per class over the batch's labelled pixels, averaged over all classes, the
    classes absent from ``target`` counting 0 (as segmentation_models_pytorch's ``DiceLoss``)."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(1)
    labelled = (target != ignore_index).unsqueeze(1)
    one_hot = F.one_hot(target.masked_fill(~labelled.squeeze(1), 0), num_classes).permute(0, 3, 1, 2).float()
    probs, one_hot = probs * labelled, one_hot * labelled
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    cardinality = (probs + one_hot).sum(dims)
    dice = 2.0 * intersection / cardinality.clamp_min(eps)
    present = (one_hot.sum(dims) > 0).float()
    return ((1.0 - dice) * present).mean()


def training_loss(logits: torch.Tensor, target: torch.Tensor, name: str, *,
                  class_weights: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss ``name`` (one of `LOSSES`): "ce", "ohem", "lovasz", or cross-entropy plus Dice or Lovasz."""
    if name == "ohem":
        return ohem_cross_entropy(logits, target, class_weights=class_weights, ignore_index=ignore_index)
    if name == "lovasz":
        return lovasz_softmax(logits, target, ignore_index=ignore_index)
    loss = segmentation_loss(logits, target, class_weights=class_weights, ignore_index=ignore_index)
    if name == "ce+dice":
        return loss + dice_loss(logits, target, ignore_index=ignore_index)
    if name == "ce+lovasz":
        return loss + lovasz_softmax(logits, target, ignore_index=ignore_index)
    if name != "ce":
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return loss
