"""The upsampler: bilinear kernel against interpolate, fast path against nn.ConvTranspose2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcnseg.models import upsample as upsample_module
from fcnseg.models.upsample import (
    TransposedConvUpsampler,
    bilinear_kernel,
    reference_transposed_conv,
)


@pytest.mark.parametrize("stride", [2, 32])
def test_bilinear_transposed_conv_matches_interpolate_away_from_borders(stride):
    x = torch.rand(1, 3, 12, 9)
    conv = reference_transposed_conv(3, stride)
    conv.weight.data.copy_(bilinear_kernel(3, 3, 2 * stride))
    with torch.no_grad():
        ours = conv(x)
        expected = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert ours.shape == expected.shape == (1, 3, 12 * stride, 9 * stride)
    # The transposed conv zero-pads; interpolate clamps: they differ only within half a cell of
    # the border.
    m = stride
    inner = (..., slice(m, -m), slice(m, -m))
    torch.testing.assert_close(ours[inner], expected[inner], rtol=0, atol=1e-5)
    assert not torch.allclose(ours, expected, atol=1e-3), "borders should differ (zero padding)"


def test_bilinear_kernel_is_diagonal_over_channels_and_chapter_shaped():
    w = bilinear_kernel(3, 4, 4)
    assert w.shape == (3, 4, 4, 4)
    assert torch.count_nonzero(w[0, 1]) == 0 and torch.count_nonzero(w[:, 3]) == 0
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[1, 1], torch.outer(row, row))


@pytest.mark.parametrize("stride", [2, 8, 16, 32])
@pytest.mark.parametrize("init", ["bilinear", "xavier", "fixed"])
def test_fast_upsampler_equals_conv_transpose2d(stride, init):
    up = TransposedConvUpsampler(5, stride, init)
    if init != "fixed":
        up.weight.data.add_(0.05 * torch.randn_like(up.weight))  # a trained, dense weight
    ref = reference_transposed_conv(5, stride)
    ref.weight.data.copy_(up.weight.data)
    x = torch.randn(2, 5, 7, 4, requires_grad=True)
    out, expected = up(x), ref(x)
    assert out.shape == expected.shape == (2, 5, 7 * stride, 4 * stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(expected)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    (gx_ref,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    if init != "fixed":
        (gw,) = torch.autograd.grad(up(x), up.weight, grad_out)
        (gw_ref,) = torch.autograd.grad(ref(x), ref.weight, grad_out)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("stride", [8, 32])
def test_fast_upsampler_in_inference_follows_weight_updates(stride):
    # Without autograd the GEMM matrices are cached; an in-place weight update must reach the output.
    up = TransposedConvUpsampler(3, stride, "xavier")
    ref = reference_transposed_conv(3, stride)
    x = torch.randn(1, 3, 3, 5)
    for _ in range(2):
        ref.weight.data.copy_(up.weight.data)
        with torch.inference_mode():
            torch.testing.assert_close(up(x), ref(x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            up.weight.mul_(-0.5)


@pytest.mark.parametrize("stride", [8, 32])
def test_fast_upsampler_made_under_inference_mode_runs_and_follows_updates(stride):
    # A model built (or loaded) inside torch.inference_mode has inference-tensor weights, which carry no
    # version counter: the layer must still run there, and in-place updates must reach the output.
    with torch.inference_mode():
        up = TransposedConvUpsampler(3, stride, "xavier")
        ref = reference_transposed_conv(3, stride)
        x = torch.randn(1, 3, 3, 5)
        for _ in range(2):
            ref.weight.copy_(up.weight)
            torch.testing.assert_close(up(x), ref(x), rtol=1e-5, atol=1e-5)
            up.weight.mul_(-0.5)


def test_fast_upsampler_under_bf16_autocast_stays_float32_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: False)
    up = TransposedConvUpsampler(3, 32)
    x = torch.randn(1, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x.bfloat16())
    assert out.dtype == torch.float32
    expected = F.conv_transpose2d(x.bfloat16().float(), up.weight, stride=32, padding=16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_fast_upsampler_under_bf16_autocast_computes_in_bf16_where_native(monkeypatch):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    up = TransposedConvUpsampler(3, 32, "xavier")
    x = torch.randn(2, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv_transpose2d(x, up.weight.detach(), stride=32, padding=16)
    # bf16 keeps 8 significant bits: inputs, weights and outputs each round once.
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    (gw,) = torch.autograd.grad(out.float().square().sum(), up.weight)
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_fixed_upsampler_is_not_learned_and_refuses_other_weights():
    up = TransposedConvUpsampler(3, 2, "fixed")
    assert not up.weight.requires_grad
    state = {"weight": torch.randn_like(up.weight)}
    with pytest.raises(ValueError, match="bilinear"):
        up.load_state_dict(state)


def test_xavier_init_is_not_bilinear():
    up = TransposedConvUpsampler(4, 2, "xavier")
    assert not torch.allclose(up.weight, bilinear_kernel(4, 4, 4))
    assert up.weight.requires_grad


def test_upsampler_has_no_bias_by_default():
    up = TransposedConvUpsampler(3, 8)
    assert up.bias is None and list(up.state_dict()) == ["weight"]


@pytest.mark.parametrize("stride", [2, 8, 16, 32])
@pytest.mark.parametrize("init", ["bilinear", "xavier", "fixed"])
def test_upsampler_with_bias_equals_conv_transpose2d_with_bias(stride, init):
    torch.manual_seed(stride)
    up = TransposedConvUpsampler(5, stride, init, bias=True)
    assert up.bias.shape == (5,) and up.bias.requires_grad  # learned even when the weight is fixed
    with torch.no_grad():
        if init != "fixed":
            up.weight.add_(0.05 * torch.randn_like(up.weight))
        up.bias.copy_(torch.randn(5))  # larger than its start, so that a missing bias shows
    # The chapter's layer, as torch defines it.
    ref = torch.nn.ConvTranspose2d(5, 5, 2 * stride, stride=stride, padding=stride // 2, bias=True)
    ref.weight.data.copy_(up.weight.data)
    ref.bias.data.copy_(up.bias.data)
    x = torch.randn(2, 5, 7, 5, requires_grad=True)  # odd sizes
    out, expected = up(x), ref(x)
    assert out.shape == expected.shape == (2, 5, 7 * stride, 5 * stride)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    crop = (..., slice(0, 7 * stride - stride // 2 - 1), slice(0, 5 * stride - 3))  # as FCN.forward crops
    grad_out = torch.randn_like(expected[crop])
    learned = [x, up.bias] + ([up.weight] if init != "fixed" else [])
    ref_learned = [x, ref.bias] + ([ref.weight] if init != "fixed" else [])
    grads = torch.autograd.grad(up(x)[crop], learned, grad_out)
    ref_grads = torch.autograd.grad(ref(x)[crop], ref_learned, grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    with torch.inference_mode():  # the cached matrices of inference, and the bias with them
        torch.testing.assert_close(up(x.detach()), ref(x.detach()), rtol=1e-5, atol=1e-5)


def test_bias_starts_as_torch_starts_conv_transpose2d_bias():
    # torch's _ConvNd.reset_parameters: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in from the weight.
    ref = reference_transposed_conv(21, 32, bias=True)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(ref.weight)
    bound = 1 / fan_in**0.5
    torch.manual_seed(3)
    up = TransposedConvUpsampler(21, 32, bias=True)
    torch.manual_seed(3)
    expected = torch.empty(21).uniform_(-bound, bound)  # the bilinear weight draws no random numbers
    torch.testing.assert_close(up.bias.detach(), expected, rtol=0, atol=0)
    assert ref.bias.abs().max() <= bound and up.bias.abs().max() > bound / 2


def test_upsampler_with_bias_under_native_bf16_autocast(monkeypatch):
    monkeypatch.setattr(upsample_module, "native_cpu_bf16", lambda: True)
    up = TransposedConvUpsampler(3, 32, "xavier", bias=True)
    with torch.no_grad():
        up.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x = torch.randn(2, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv_transpose2d(x, up.weight.detach(), up.bias.detach(), stride=32, padding=16)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())
    (gb,) = torch.autograd.grad(out.float().sum(), up.bias)
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb, torch.full((3,), 2.0 * 128 * 160))  # d sum / d bias: the pixel count
