"""`train_step`: one SGD step equals a hand-derived one; accumulation equals one big batch; a NaN or
infinite loss raises `TrainingDiverged` before any weight moves; a custom ``compute_loss`` is used."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.ops.loss import segmentation_loss
from fcnseg.training.loss import fcn_cross_entropy
from fcnseg.training.step import StepResult, TrainingDiverged, ensure_finite_state, loss_diverged, train_step
from tests.conftest import tiny_fcn

CPU = torch.device("cpu")
VOID = 255


def _pixel_classifier(seed: int = 0) -> nn.Conv2d:
    """A 1x1 convolution: per-pixel logits ``W x + b``, whose gradient is easy to write by hand."""
    torch.manual_seed(seed)
    return nn.Conv2d(4, 3, 1)


def _batch(n: int, seed: int, void_per_image: int = 5, h: int = 4, w: int = 5):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 4, h, w, generator=gen)
    target = torch.randint(0, 3, (n, h, w), generator=gen)
    for k in range(n):  # the same number of void pixels in every image, at different places
        flat = target[k].view(-1)
        flat[torch.randperm(h * w, generator=gen)[:void_per_image]] = VOID
    return image, target


def _hand_step(weight: np.ndarray, bias: np.ndarray, image: np.ndarray, target: np.ndarray, lr: float):
    """Cross-entropy over labelled pixels and its gradient for per-pixel logits W x + b, in float64."""
    x = image.transpose(0, 2, 3, 1).reshape(-1, image.shape[1]).astype(np.float64)  # (P, 4)
    t = target.reshape(-1)
    keep = t != VOID
    x, t = x[keep], t[keep]
    logits = x @ weight.T + bias  # (P, 3)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(t)), t]).mean()
    d_logits = p.copy()
    d_logits[np.arange(len(t)), t] -= 1
    d_logits /= len(t)
    grad_w, grad_b = d_logits.T @ x, d_logits.sum(0)
    return loss, weight - lr * grad_w, bias - lr * grad_b


def _weights(model: nn.Conv2d) -> tuple[np.ndarray, np.ndarray]:
    return model.weight.detach()[:, :, 0, 0].double().numpy(), model.bias.detach().double().numpy()


def test_one_step_equals_a_hand_written_sgd_step():
    model = _pixel_classifier()
    image, target = _batch(2, seed=1)
    weight, bias = _weights(model)
    loss, new_weight, new_bias = _hand_step(weight, bias, image.numpy(), target.numpy(), lr=0.5)

    result = train_step(model, [(image, target)], torch.optim.SGD(model.parameters(), lr=0.5), device=CPU)
    assert isinstance(result, StepResult) and result.images == 2
    assert result.loss == pytest.approx(loss, rel=1e-5)
    got_weight, got_bias = _weights(model)
    np.testing.assert_allclose(got_weight, new_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_bias, new_bias, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got_weight, weight)  # the step moved the weights


def test_accumulating_two_micro_batches_equals_one_batch_of_both():
    first, second = _batch(2, seed=1), _batch(2, seed=2)  # equal labelled counts per micro-batch
    both = (torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    split_model, whole_model = _pixel_classifier(), _pixel_classifier()
    split = train_step(split_model, [first, second], torch.optim.SGD(split_model.parameters(), lr=0.5), device=CPU)
    whole = train_step(whole_model, [both], torch.optim.SGD(whole_model.parameters(), lr=0.5), device=CPU)

    assert split.images == whole.images == 4
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    for a, b in zip(split_model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loss, new_weight, _ = _hand_step(*_weights(_pixel_classifier()), both[0].numpy(), both[1].numpy(), lr=0.5)
    assert whole.loss == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(_weights(split_model)[0], new_weight, rtol=1e-5, atol=1e-6)


def test_stale_gradients_do_not_leak_into_the_step():
    # Stale gradients from an earlier backward must not leak into the step (zero_grad runs first).
    model = _pixel_classifier()
    image, target = _batch(2, seed=1)
    segmentation_loss(model(image * 10), target).backward()  # leaves large .grad values behind
    weight, bias = _weights(model)
    loss, new_weight, _ = _hand_step(weight, bias, image.numpy(), target.numpy(), lr=0.5)
    train_step(model, [(image, target)], torch.optim.SGD(model.parameters(), lr=0.5), device=CPU)
    np.testing.assert_allclose(_weights(model)[0], new_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, 1])
def test_a_non_finite_loss_raises_and_does_not_step(bad, where):
    model = _pixel_classifier()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [_batch(2, seed=1), _batch(2, seed=2)]
    batches[where][0][0, :, 0, 0] = bad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with pytest.raises(TrainingDiverged, match="loss is (nan|inf)"):
        train_step(model, batches, optimizer, device=CPU)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert optimizer.state_dict()["state"] == {}  # no momentum buffer: the step was never taken


def test_the_diverged_loss_message_says_what_to_try_for_the_precision_used():
    plain = str(loss_diverged(float("nan")))
    mixed = str(loss_diverged(float("inf"), torch.bfloat16))
    assert plain.startswith("loss is nan") and "--resume" in plain and "--lr" in plain and "--amp" not in plain
    assert mixed.startswith("loss is inf") and "bfloat16 mixed precision (--amp none)" in mixed


def test_non_finite_weights_or_batchnorm_statistics_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    ensure_finite_state(model)  # a fresh model passes
    model[1].running_var[2] = float("nan")
    with pytest.raises(TrainingDiverged, match="BatchNorm statistics"):
        ensure_finite_state(model)
    model[1].running_var.fill_(1.0)
    model[1].num_batches_tracked.fill_(3)  # an integer buffer is not a statistic to check
    ensure_finite_state(model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        ensure_finite_state(model)


def test_compute_loss_replaces_the_default_loss():
    model, reference = _pixel_classifier(), _pixel_classifier()
    image, target = _batch(2, seed=1)
    calls = []

    def doubled(x, y):
        calls.append(x.shape)
        return 2 * F.cross_entropy(model(x), y, ignore_index=VOID)

    result = train_step(model, [(image, target)], torch.optim.SGD(model.parameters(), lr=0.25), device=CPU,
                        compute_loss=doubled)
    train_step(reference, [(image, target)], torch.optim.SGD(reference.parameters(), lr=0.5), device=CPU)
    assert calls == [image.shape]
    loss, _, _ = _hand_step(*_weights(_pixel_classifier()), image.numpy(), target.numpy(), lr=0.5)
    assert result.loss == pytest.approx(2 * loss, rel=1e-5)
    for a, b in zip(model.parameters(), reference.parameters()):  # 2x the gradient at half the rate
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_fused_fcn_loss_steps_like_the_plain_one():
    image = torch.randn(2, 3, 40, 56)
    target = torch.randint(0, 3, (2, 40, 56))
    target[:, :3] = VOID
    fused, plain = tiny_fcn("8s").train(), tiny_fcn("8s").train()
    fused_result = train_step(fused, [(image, target)], torch.optim.SGD(fused.parameters(), lr=0.1), device=CPU,
                              compute_loss=lambda x, y: fcn_cross_entropy(fused, x, y))
    plain_result = train_step(plain, [(image, target)], torch.optim.SGD(plain.parameters(), lr=0.1), device=CPU)
    assert fused_result.loss == pytest.approx(plain_result.loss, rel=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_d2l_reduction_sums_per_image_means():
    model = _pixel_classifier()
    image, target = _batch(3, seed=4)
    per_image = [_hand_step(*_weights(model), image[k : k + 1].numpy(), target[k : k + 1].numpy(), lr=0)[0]
                 for k in range(3)]
    result = train_step(model, [(image, target)], torch.optim.SGD(model.parameters(), lr=0.0), device=CPU,
                        loss_reduction="d2l")
    assert result.loss == pytest.approx(sum(per_image), rel=1e-5)


def test_no_sync_wraps_every_micro_batch_but_the_last():
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    model = _pixel_classifier()
    batches = [_batch(1, seed=s) for s in range(3)]
    result = train_step(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU, no_sync=no_sync)
    assert len(entered) == 2 and result.images == 3
