"""Strided depthwise convolutions with the spread input gradient, against torch's own convolution."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcnseg import build_model
from fcnseg.models import depthwise_conv
from fcnseg.models.depthwise_conv import (
    StridedDepthwiseConv2d,
    spread_gradient_applies,
    spread_input_grad,
    use_spread_gradients,
)


@pytest.mark.parametrize("size,kernel,stride", [((17, 22), 3, 2), ((16, 16), 3, 2), ((15, 15), 5, 3), ((7, 9), 7, 2),
                                                ((12, 13), 3, (2, 1))])
def test_spread_input_grad_is_the_convolutions_input_gradient(size, kernel, stride):
    stride = stride if isinstance(stride, tuple) else (stride, stride)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *size, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(5, 1, kernel, kernel, dtype=torch.float64, generator=g)
    out = F.conv2d(x, weight, stride=stride, padding=kernel // 2, groups=5)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    expected, = torch.autograd.grad(out, x, grad)
    got = spread_input_grad(grad, weight, x.shape, stride, (kernel // 2, kernel // 2))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def run_both(conv: nn.Conv2d, x: torch.Tensor, amp: bool) -> list[tuple[torch.Tensor | None, ...]]:
    results = []
    for module in (conv, StridedDepthwiseConv2d(copy.deepcopy(conv))):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = module(xx)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss whose gradient differs per pixel
        (out.float() * weights).sum().backward()
        results.append((out, xx.grad, module.weight.grad, module.bias.grad if module.bias is not None else None))
    return results


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_module_matches_torch_conv2d_forward_and_gradients(amp, channels_last, bias, monkeypatch):
    spread_calls = []
    real = depthwise_conv.spread_input_grad
    monkeypatch.setattr(depthwise_conv, "spread_input_grad", lambda *a: spread_calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=bias)
    x = torch.randn(2, 16, 19, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (out, *grads), (fast_out, *fast_grads) = run_both(conv, x, amp)
    assert fast_out.dtype == out.dtype == (torch.bfloat16 if amp else torch.float32)
    torch.testing.assert_close(fast_out, out)
    tol = {"rtol": 2e-2, "atol": 2e-2} if amp else {}
    for got, expected in zip(fast_grads, grads):
        if expected is None:
            assert got is None
        else:
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, **tol)
    assert len(spread_calls) == (1 if amp else 0)  # bf16 takes the spread gradient, fp32 torch's own


def test_without_gradients_or_under_tracing_it_is_torchs_conv2d():
    fast = StridedDepthwiseConv2d(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4))
    x = torch.randn(1, 4, 8, 8)
    graph = str(torch.jit.trace(fast, x).graph)
    assert "PythonOp" not in graph and "_convolution" in graph
    with torch.no_grad():
        assert fast(x).grad_fn is None


def test_only_strided_depthwise_layers_qualify():
    assert spread_gradient_applies(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8))
    assert not spread_gradient_applies(nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8))  # stride 1 is fast
    assert not spread_gradient_applies(nn.Conv2d(8, 8, 3, stride=2, padding=1))  # dense
    assert not spread_gradient_applies(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8))  # channel multiplier
    assert not spread_gradient_applies(nn.Conv2d(8, 8, 3, stride=2, padding=0, groups=8))  # not "same" padding
    assert not spread_gradient_applies(nn.Conv2d(8, 8, 4, stride=2, padding=2, groups=8))  # even kernel
    assert not spread_gradient_applies(nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=8))


def test_mobilenet_v2_gets_its_four_strided_depthwise_layers_replaced_keeping_the_state_dict():
    model = build_model("fcn_mobilenet_v2", variant="8s", num_classes=3, weights_backbone=None)
    fast = [m for m in model.modules() if isinstance(m, StridedDepthwiseConv2d)]
    assert len(fast) == 4 and all(m.stride == (2, 2) and m.groups == m.in_channels for m in fast)
    plain = nn.Sequential(*[nn.Conv2d(m.in_channels, m.out_channels, 3, 2, 1, groups=m.groups, bias=False)
                            for m in fast])
    assert use_spread_gradients(plain) == 4 and use_spread_gradients(plain) == 0
    keys = set(model.state_dict())
    assert {k for k in keys if k.startswith("backbone.stage8.2.conv.1.0")} == {"backbone.stage8.2.conv.1.0.weight"}
    resnet = build_model("fcn_resnet18", variant="8s", num_classes=3, weights_backbone=None)
    assert not any(isinstance(m, StridedDepthwiseConv2d) for m in resnet.modules())
