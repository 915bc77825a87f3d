"""Strided depthwise convolutions whose input gradient avoids oneDNN's slow bf16 kernel on CPU.

For a stride-2 depthwise 3x3 convolution in bf16, oneDNN (torch 2.14) picks a "brgconv_strided"
backward-data kernel that runs each channel as its own tiny GEMM: 127 ms for MobileNetV2's
96-channel 192x240 layer at batch 8, against 10 ms for the forward. The same gradient is a
stride-1 depthwise convolution, with the flipped kernel, of the output gradient spread onto the
input grid (zeros between): 15 ms. MobileNetV2's four strided depthwise layers took 0.32 s of a
1.15 s FCN-4s training step (docs/BENCHMARKS.md). Everything else (forward, weight gradient,
other dtypes, other devices, tracing, export, compile) stays on torch's own operations.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _SpreadGradConv(torch.autograd.Function):
    """``conv2d(x, weight, bias, stride, padding, groups=channels)`` with the input gradient above."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        # Autocast's cast of conv2d, done here so that the backward sees the same dtype.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(xc, wc, bc, stride, padding, 1, x.shape[1])
        ctx.save_for_backward(xc, wc)
        ctx.conf = (stride, padding, x.dtype, weight.dtype, bias is not None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, wc = ctx.saved_tensors
        stride, padding, x_dtype, w_dtype, has_bias = ctx.conf
        grad = grad.to(xc.dtype)
        spread = xc.dtype == torch.bfloat16 and ctx.needs_input_grad[0]  # fp32's own kernel is fine (56 ms)
        mask = [ctx.needs_input_grad[0] and not spread, ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        grad_x = grad_w = grad_b = None
        if any(mask):
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, xc, wc, [wc.shape[0]] if has_bias else None, list(stride), list(padding), [1, 1], False,
                [0, 0], xc.shape[1], mask)
        if spread:
            grad_x = spread_input_grad(grad, wc, xc.shape, stride, padding)
        return (None if grad_x is None else grad_x.to(x_dtype), None if grad_w is None else grad_w.to(w_dtype),
                None if grad_b is None else grad_b.to(w_dtype), None, None)


def spread_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size,
                      stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """The input gradient of a depthwise convolution with odd kernel, "same" padding and dilation 1.

    Output (i, j) reads input (s*i + a - p, s*j + b - p) with weight (a, b); so the gradient at input
    (u, v) is the stride-1 correlation, padding p, of the flipped kernel with the output gradient
    placed at (s*i, s*j) of an input-sized grid of zeros.
    """
    spread = torch.zeros(input_shape, dtype=grad.dtype, device=grad.device)
    if grad.is_contiguous(memory_format=torch.channels_last):
        spread = spread.contiguous(memory_format=torch.channels_last)
    spread[:, :, ::stride[0], ::stride[1]] = grad
    return F.conv2d(spread, weight.flip(2, 3), None, 1, padding, 1, input_shape[1])


def spread_gradient_applies(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain Conv2d, strided and depthwise, that `StridedDepthwiseConv2d` can run."""
    if type(conv) is not nn.Conv2d:
        return False
    channels = conv.in_channels
    kernel, padding = conv.kernel_size, conv.padding
    return (conv.groups == channels == conv.out_channels and max(conv.stride) > 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(padding, str)
            and all(k % 2 == 1 and p == k // 2 for k, p in zip(kernel, padding)))


class StridedDepthwiseConv2d(nn.Conv2d):
    """A strided depthwise Conv2d (same parameters and state dict) whose CPU backward avoids the slow kernel."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            return super().forward(x)
        return _SpreadGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)


def use_spread_gradients(model: nn.Module) -> int:
    """Replaces, in place, each strided depthwise Conv2d of ``model`` by a `StridedDepthwiseConv2d`.

    The parameters are the same objects, so state dicts, optimisers and checkpoints do not change.
    Returns how many were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if spread_gradient_applies(child):
                setattr(parent, name, StridedDepthwiseConv2d(child))
                replaced += 1
    return replaced
