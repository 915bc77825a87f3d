"""One training step in JAX against PyTorch's: loss, gradients, BatchNorm statistics, optimiser updates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcnseg.jax_backend.convert import flax_to_torch, from_torch_model
from fcnseg.jax_backend.step import TrainStep, apply_update, cross_entropy, optimizer
from fcnseg.ops.loss import segmentation_loss
from tests.jax_backend.conftest import random_fcn


def _batch(seed: int = 0, size=(2, 64, 64), classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(size[0], 3, *size[1:], generator=generator)
    target = torch.randint(0, classes, size, generator=generator)
    target[:, :5] = 255  # void rows: ignored by both losses
    return image, target


def _relative(jax_tensor: torch.Tensor, torch_tensor: torch.Tensor) -> float:
    scale = torch_tensor.abs().max().clamp(min=1e-12)
    return float((jax_tensor - torch_tensor).abs().max() / scale)


@pytest.mark.parametrize("reduction", ["mean", "d2l"])
def test_cross_entropy_is_segmentation_loss(reduction):
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    expected = segmentation_loss(logits, target, class_weights=weights, reduction=reduction)
    got = cross_entropy(jnp.asarray(logits.permute(0, 2, 3, 1).numpy()), jnp.asarray(target.numpy()),
                        class_weights=jnp.asarray(weights.numpy()), reduction=reduction)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def _jax_step(model, image, target, dtype=jnp.float32):
    module, variables = from_torch_model(model)  # before torch's forward moves the running statistics
    variables = jax.tree_util.tree_map(lambda v: v.astype(dtype) if v.dtype == jnp.float32 else v, variables)
    step = TrainStep(module, "sgd", momentum=0.9, weight_decay=0.0)
    return step.gradients(variables["params"], variables["batch_stats"], image.numpy(), target.numpy().astype(np.int32))


@pytest.mark.parametrize("variant", ["8s", "4s"])
def test_gradients_and_batchnorm_statistics_match_torch(variant):
    """The chapter's JAX body (ResNet-18 FCN-8s, and 4s) in float32: every gradient within 2e-3 of PyTorch's."""
    model = random_fcn("fcn_resnet18", variant, seed=4).train()
    image, target = _batch()
    out = _jax_step(model, image, target)
    loss = segmentation_loss(model(image), target)
    loss.backward()
    assert float(out.loss) == pytest.approx(loss.item(), rel=1e-5)
    grads = flax_to_torch({"params": out.grads})
    torch_grads = {k: p.grad for k, p in model.named_parameters()}
    assert set(grads) == set(torch_grads)
    errors = {k: _relative(grads[k], torch_grads[k]) for k in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 2e-3, f"{worst}: relative gradient error {errors[worst]:.2e}"
    stats = flax_to_torch({"batch_stats": out.batch_stats})
    buffers = dict(model.named_buffers())
    assert set(stats) == set(buffers)
    for key, value in stats.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(buffers[key]) == 1
        else:  # momentum 0.1, unbiased variance
            assert _relative(value, buffers[key]) < 1e-5, key


def test_mobilenet_gradients_match_torch_in_float64():
    """MobileNetV2's blocks in train mode (stem, the expansion-1 block, an expanding block with its
    residual, ReLU6, depthwise convolutions, BatchNorm on batch statistics): output, every gradient and
    the running statistics equal to torchvision's in float64, where rounding cannot hide a wrong formula.

    In float32 the whole MobileNetV2 FCN at random init is too ill-conditioned to compare (BatchNorm
    over 2x2 maps at stride 32): PyTorch's own float32 gradients differ from its float64 ones by up to
    2% there, as JAX's do.
    """
    import torchvision

    from fcnseg.jax_backend.models import MobileNetStage

    features = torchvision.models.mobilenet_v2(weights=None).features[:4].double().train()
    stage = MobileNetStage(0, 4)
    image = torch.randn(2, 3, 24, 20, dtype=torch.float64)
    probe = torch.randn(2, 24, 6, 5, dtype=torch.float64)  # the loss: <output, probe>
    with jax.enable_x64(True):
        variables = jax.jit(stage.init)(jax.random.key(0), jnp.zeros((1, 24, 20, 3), jnp.float64))
        variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64) if v.dtype == jnp.float32 else v, variables)
        features.load_state_dict({k: v.double() if v.is_floating_point() else v
                                  for k, v in flax_to_torch(variables).items()}, strict=True)

        def loss(params):
            out, updates = stage.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                       jnp.asarray(image.permute(0, 2, 3, 1).numpy()), train=True, mutable=["batch_stats"])
            return jnp.sum(out * jnp.asarray(probe.permute(0, 2, 3, 1).numpy())), updates

        (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        grads = flax_to_torch({"params": grads})
        stats = flax_to_torch(updates)
    expected = (features(image) * probe).sum()
    expected.backward()
    assert float(value) == pytest.approx(expected.item(), rel=1e-10)
    # A gradient that is zero in exact arithmetic (the bias of a BatchNorm that another BatchNorm
    # follows) is rounding in both: errors are relative to each tensor's scale, at least 1e-3 of the largest.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in features.parameters())
    for key, param in features.named_parameters():
        error = float((grads[key] - param.grad).abs().max()) / max(float(param.grad.abs().max()), floor)
        assert error < 1e-9, f"{key}: {error:.1e}"
    for key, buffer in features.named_buffers():  # momentum 0.1, unbiased variance, the step counted
        torch.testing.assert_close(stats[key].to(buffer.dtype), buffer, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name,options", [("sgd", {"momentum": 0.9, "weight_decay": 1e-2}),
                                          ("adamw", {"momentum": 0.0, "weight_decay": 1e-2})])
def test_optimiser_steps_match_torch(name, options):
    """Two steps with fixed gradients: torch's SGD (momentum, weight decay) or AdamW, and a frozen tensor."""
    generator = torch.Generator().manual_seed(5)
    weights = {"a": torch.randn(4, 3, generator=generator), "frozen": torch.randn(3, generator=generator)}
    grads = [{k: torch.randn(v.shape, generator=generator) for k, v in weights.items()} for _ in range(2)]
    params = {k: torch.nn.Parameter(v.clone()) for k, v in weights.items() if k != "frozen"}
    torch_opt = (torch.optim.AdamW if name == "adamw" else torch.optim.SGD)(
        params.values(), lr=0.1, weight_decay=options["weight_decay"],
        **({"momentum": options["momentum"]} if name == "sgd" else {}))
    tx = optimizer(name, **options)
    jax_params = {k: jnp.asarray(v.numpy()) for k, v in weights.items()}
    mask = {"a": True, "frozen": False}
    state = tx.init(jax_params)
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].clone()
        torch_opt.step()
        jax_params, state = apply_update(tx, mask, jax_params, state, {k: jnp.asarray(v.numpy()) for k, v in g.items()}, 0.1)
    np.testing.assert_allclose(np.asarray(jax_params["a"]), params["a"].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax_params["frozen"]), weights["frozen"].numpy())
