"""The Flax FCN against the PyTorch one: the transposed convolution, initialisation, forward parity."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fcnseg.jax_backend.convert import from_torch_model
from fcnseg.jax_backend.models import Upsampler, transposed_conv
from fcnseg.models.inference_form import inference_form
from fcnseg.models.upsample import bilinear_kernel
from tests.jax_backend.conftest import assert_logits_match, random_fcn, to_nhwc


@pytest.mark.parametrize("stride", [2, 4, 8, 32])
def test_transposed_conv_is_torch_conv_transpose2d(stride):
    x = torch.randn(2, 3, 5, 7)
    weight = torch.randn(3, 4, 2 * stride, 2 * stride)
    expected = F.conv_transpose2d(x, weight, stride=stride, padding=stride // 2).numpy()
    got = np.asarray(transposed_conv(jnp.asarray(to_nhwc(x)), jnp.asarray(weight.numpy()), stride))
    assert got.shape == (2, 5 * stride, 7 * stride, 4)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)


def test_upsampler_initialisations():
    x = jnp.ones((1, 3, 4, 3))
    bilinear = Upsampler(3, 8, "bilinear").init(jax.random.key(0), x)["params"]["weight"]
    np.testing.assert_array_equal(np.asarray(bilinear), bilinear_kernel(3, 3, 16).numpy())
    xavier = np.asarray(Upsampler(3, 8, "xavier").init(jax.random.key(0), x)["params"]["weight"])
    bound = np.sqrt(6 / (2 * 3 * 16 * 16))  # torch's xavier_uniform_ on (3, 3, 16, 16)
    assert np.abs(xavier).max() <= bound and np.abs(xavier).max() > 0.9 * bound
    assert abs(xavier.std() - bound / np.sqrt(3)) < 0.1 * bound


@pytest.mark.parametrize("init", ["bilinear", "fixed"])
def test_fixed_upsampler_gets_no_gradient(init):
    module = Upsampler(3, 2, init, use_bias=True)
    x = jax.random.normal(jax.random.key(1), (1, 3, 3, 3))
    params = module.init(jax.random.key(0), x)
    grads = jax.grad(lambda p: module.apply(p, x).sum())(params)["params"]
    assert bool(jnp.any(grads["weight"] != 0)) == (init != "fixed")
    assert bool(jnp.all(grads["bias"] != 0))  # the bias is learned even with "fixed", as in PyTorch


def _parity(model, image):
    module, variables = from_torch_model(model)
    with torch.no_grad():
        expected = model(image).float().numpy()
    got = np.asarray(jax.jit(lambda v, x: module.apply(v, x))(variables, to_nhwc(image))).transpose(0, 3, 1, 2)
    assert_logits_match(got, expected)
    return module


@pytest.mark.parametrize("name", ["fcn_resnet18", "fcn_mobilenet_v2"])
@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s"])
def test_forward_parity_as_built(name, variant):
    """BatchNorm in inference mode with (random) running statistics; an odd size, padded and cropped."""
    module = _parity(random_fcn(name, variant), torch.randn(1, 3, 70, 100))
    assert not module.folded


@pytest.mark.parametrize("name", ["fcn_resnet18", "fcn_mobilenet_v2"])
@pytest.mark.parametrize("variant", ["8s", "4s"])
def test_forward_parity_inference_form(name, variant):
    """BatchNorm folded into the convolutions, channels-last: what `Segmenter` hands the engine."""
    module = _parity(inference_form(random_fcn(name, variant, seed=1)), torch.randn(2, 3, 64, 96))
    assert module.folded


def test_forward_parity_bottleneck_resnet():
    """ResNet-50's Bottleneck blocks (ResNet-34 is ResNet-18's BasicBlock, more of them)."""
    _parity(random_fcn("fcn_resnet50", "8s", upsampler_bias=False), torch.randn(1, 3, 33, 40))


def test_forward_parity_fixed_upsampler():
    """The frozen bilinear upsamplers (PyTorch computes them separably) against the Flax transposed conv."""
    _parity(random_fcn("fcn_mobilenet_v2", "16s", upsampler="fixed"), torch.randn(1, 3, 40, 50))
