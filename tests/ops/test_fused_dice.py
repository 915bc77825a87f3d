"""The fused loss with the Dice term against torch's ConvTranspose2d, cross-entropy and fcnseg's unfused
Dice loss (itself checked against segmentation_models_pytorch's in test_losses)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import upsample as upsample_module
from fcnseg.models.upsample import TransposedConvUpsampler
from fcnseg.ops import fused_loss
from fcnseg.ops.fused_loss import upsample_cross_entropy
from fcnseg.ops.losses import dice_loss


def reference_loss(score, up, target, class_weights=None):
    """Cross-entropy plus Dice on the full-size logits, as the unfused "ce+dice" loss computes it."""
    logits = F.conv_transpose2d(score, up.weight, up.bias, stride=up.stride, padding=up.stride // 2)
    logits = logits[..., : target.shape[1], : target.shape[2]]
    return F.cross_entropy(logits, target, weight=class_weights, ignore_index=255) + dice_loss(logits, target)


@pytest.mark.parametrize("stride,grid,size", [(2, (3, 4), (6, 7)), (4, (4, 5), (14, 19)), (8, (2, 3), (13, 24))])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_dice_loss_and_gradients_equal_the_unfused_ones(monkeypatch, stride, grid, size, biased, weighted):
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 7)  # several chunks, the last one partial
    torch.manual_seed(0)
    up = TransposedConvUpsampler(4, stride, "xavier", bias=biased)
    if biased:
        up.bias.data.copy_(torch.tensor([1.0, -1.5, 0.5, 2.0]))
    score = (torch.randn(2, 4, *grid) * 3).requires_grad_()  # confident logits: Dice's gradient is not small
    target = torch.randint(0, 3, (2, *size))  # class 3 absent: it must add nothing
    target[0, :2] = 255
    class_weights = torch.tensor([0.5, 1.0, 2.0, 1.5]) if weighted else None
    learned = (score, up.weight) + ((up.bias,) if biased else ())

    loss = upsample_cross_entropy(score, up, target, class_weights=class_weights, dice=True)
    grads = torch.autograd.grad(loss * 2.0, learned)
    expected = reference_loss(score, up, target, class_weights)
    expected_grads = torch.autograd.grad(expected * 2.0, learned)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_dice_term_changes_the_loss_and_its_gradients():
    # The check above would pass for a Dice term left out only if Dice were zero: it is not.
    torch.manual_seed(1)
    up = TransposedConvUpsampler(3, 4, "xavier")
    score = torch.randn(1, 3, 3, 3, requires_grad=True)
    target = torch.randint(0, 3, (1, 10, 12))
    with_dice = upsample_cross_entropy(score, up, target, dice=True)
    without = upsample_cross_entropy(score, up, target)
    assert with_dice.item() - without.item() == pytest.approx(dice_loss(
        F.conv_transpose2d(score, up.weight, stride=4, padding=2)[..., :10, :12], target).item(), rel=1e-5)
    assert with_dice.item() - without.item() > 0.1
    grad_with = torch.autograd.grad(with_dice, score)[0]
    grad_without = torch.autograd.grad(without, score)[0]
    assert (grad_with - grad_without).abs().max() > 0.1 * grad_without.abs().max()


def test_fused_dice_loss_of_an_all_void_batch_is_zero():
    up = TransposedConvUpsampler(3, 4, "xavier")
    score = torch.randn(2, 3, 2, 2, requires_grad=True)
    target = torch.full((2, 8, 8), 255)
    loss = upsample_cross_entropy(score, up, target, dice=True)
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, score)[0]) == 0


def test_fused_dice_loss_under_native_bf16_autocast_stays_close(monkeypatch):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(fused_loss, "PIXELS_PER_CHUNK", 16)  # GEMM chunks split into softmax chunks
    monkeypatch.setattr(fused_loss, "PIXELS_PER_GEMM", 56)
    torch.manual_seed(2)
    up = TransposedConvUpsampler(5, 8, "xavier", bias=True)
    up.bias.data.copy_(torch.tensor([1.0, -1.5, 0.5, 2.0, -0.5]))
    score = (torch.randn(2, 5, 3, 4) * 2).requires_grad_()
    target = torch.randint(0, 5, (2, 24, 30))
    target[0, 3:9] = 255
    learned = (score, up.weight, up.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = upsample_cross_entropy(score, up, target, dice=True)
    grads = torch.autograd.grad(loss, learned)
    expected = reference_loss(score, up, target)
    expected_grads = torch.autograd.grad(expected, learned)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    for got, want in zip(grads, expected_grads):
        assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("variant", ["8s", "4s", "2s"])
def test_fcn_cross_entropy_with_dice_trains_the_model_as_its_forward_and_loss_do(variant):
    from fcnseg import fcn_resnet18
    from fcnseg.ops.losses import training_loss
    from fcnseg.training.loss import fcn_cross_entropy

    torch.manual_seed(0)
    model = fcn_resnet18(variant=variant, num_classes=3, weights_backbone=None, upsampler="xavier").eval()
    for name in ("score16", "score8", "score4", "score2"):  # the skip score layers start at zero; make them count
        if hasattr(model, name):
            torch.nn.init.normal_(getattr(model, name).weight, std=0.1)
    image = torch.randn(2, 3, 45, 61)
    target = torch.randint(0, 3, (2, 45, 61))
    target[:, :4] = 255
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fcn_cross_entropy(model, image, target, dice=True)
    plain = training_loss(model(image), target, "ce+dice")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
