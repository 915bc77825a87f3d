"""Losses for thin classes: Lovasz-softmax and Dice against segmentation_models_pytorch, OHEM by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.ops.losses import LOSSES, dice_loss, lovasz_softmax, ohem_cross_entropy, training_loss

smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")


def batch(seed: int, classes: int = 5, void_rows: int = 3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 12, 17, generator=generator) * 3
    target = torch.randint(0, classes - 1, (2, 12, 17), generator=generator)  # the last class absent
    target[0, :void_rows] = 255
    return logits.requires_grad_(), target


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("ours", "theirs"), [
    (lovasz_softmax, lambda: smp_losses.LovaszLoss("multiclass", ignore_index=255)),
    (dice_loss, lambda: smp_losses.DiceLoss("multiclass", ignore_index=255)),
])
def test_lovasz_and_dice_equal_smp_values_and_gradients(seed, ours, theirs):
    logits, target = batch(seed)
    mine = ours(logits, target)
    (grad_mine,) = torch.autograd.grad(mine, logits)
    reference = theirs()(logits, target)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(mine, reference.to(mine.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_mine, grad_reference.to(grad_mine.dtype), rtol=1e-4, atol=1e-7)


def ohem_by_hand(logits, target, threshold, min_kept):
    """Per labelled pixel: true-class probability and loss; keep p < threshold, or the k least certain."""
    flat_logits = logits.detach().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat_target = target.reshape(-1)
    rows = [(i, int(t)) for i, t in enumerate(flat_target.tolist()) if t != 255]
    probs = {i: float(flat_logits[i].softmax(0)[t]) for i, t in rows}
    keep_count = max(1, int(len(rows) * min_kept))
    hard = [i for i, _ in rows if probs[i] < threshold]
    if len(hard) < keep_count:
        cutoff = sorted(probs.values())[keep_count - 1]
        hard = [i for i, _ in rows if probs[i] <= cutoff]
    losses = [float(-flat_logits[i].log_softmax(0)[flat_target[i]]) for i in hard]
    return sum(losses) / len(losses), len(hard)


@pytest.mark.parametrize(("threshold", "min_kept"), [(0.7, 1 / 16), (0.05, 0.5), (1.1, 0.01)])
def test_ohem_averages_the_hard_pixels(threshold, min_kept):
    logits, target = batch(7)
    expected, kept = ohem_by_hand(logits, target, threshold, min_kept)
    value = ohem_cross_entropy(logits, target, threshold=threshold, min_kept=min_kept)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    labelled = int((target != 255).sum())
    assert kept >= int(labelled * min_kept) and (threshold < 1 or kept == labelled)


def test_training_loss_combines_cross_entropy_with_the_region_losses():
    logits, target = batch(3)
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert training_loss(logits, target, "ce").item() == pytest.approx(ce.item())
    assert training_loss(logits, target, "ce+dice").item() == pytest.approx((ce + dice_loss(logits, target)).item())
    assert training_loss(logits, target, "ce+lovasz").item() == pytest.approx(
        (ce + lovasz_softmax(logits, target)).item())
    assert set(LOSSES) == {"ce", "ohem", "lovasz", "ce+dice", "ce+lovasz"}
    with pytest.raises(ValueError, match="unknown loss"):
        training_loss(logits, target, "focal")


def test_a_batch_of_void_only_gives_zero_lovasz_and_dice_with_a_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for loss in (lovasz_softmax(logits, target), dice_loss(logits, target)):
        assert loss.item() == 0.0
        loss.backward()  # no error: a step on such a batch is a no-op, not a crash
