"""The FCN's upsamplers in the form ONNX runtimes compute fast: a convolution and a depth-to-space.

fcnseg computes each transposed-convolution upsampler (kernel 2s, stride s, padding s/2) in PyTorch
as a 2x2 convolution with ``C * s * s`` outputs followed by a pixel shuffle
(`fcnseg.models.upsample.subpixel_conv`), but exports it as an ONNX ``ConvTranspose``, the operator
exporters know. onnxruntime's CPU ``ConvTranspose`` is a GEMM and a scatter-add: measured here on
MobileNetV2 FCN-8s at 360x480 it took 34% of the float32 model's time and, since onnxruntime has
no int8 kernel for it, 50% of the INT8 model's. `subpixel_form` swaps each upsampler of a copy of
the model for `SubpixelUpsampler`, which exports as ``Conv`` + ``DepthToSpace`` + ``Slice``: the
same multiply-adds in a dense convolution that both runtimes run with their fastest kernels, and
that static quantisation turns into an int8 convolution. The logits are the same up to float
rounding (~1e-6).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.models.upsample import TransposedConvUpsampler, transposed_conv_as_conv_weight


class SubpixelUpsampler(nn.Module):
    """``ConvTranspose2d(C, C, 2s, stride=s, padding=s/2)`` as a 2x2 convolution and a pixel shuffle.

    Args:
        upsampler: the layer to compute; its weight and bias are copied (rearranged), not shared.
    """

    def __init__(self, upsampler: TransposedConvUpsampler) -> None:
        super().__init__()
        s, c = upsampler.stride, upsampler.channels
        with torch.no_grad():
            matrix = transposed_conv_as_conv_weight(upsampler.weight.detach().float(), s)  # (C*4, (r_y, r_x, o))
            # pixel_shuffle reads channel o*s*s + r_y*s + r_x: reorder the columns to (o, r_y, r_x).
            columns = matrix.view(-1, s, s, c).permute(0, 3, 1, 2).reshape(matrix.shape[0], -1)
            weight = columns.t().reshape(c * s * s, c, 2, 2).contiguous()
            bias = None if upsampler.bias is None else upsampler.bias.detach().float().repeat_interleave(s * s)
        self.stride = s
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.stride // 2
        cells = F.conv2d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), padding=1)
        canvas = F.pixel_shuffle(cells, self.stride)  # (N, C, (H+1)*s, (W+1)*s), half a stride early
        return canvas[..., half:-half, half:-half]


def subpixel_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose `TransposedConvUpsampler` layers are `SubpixelUpsampler`s.

    A model without such layers comes back as an unchanged copy.
    """
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, TransposedConvUpsampler):
                setattr(module, child_name, SubpixelUpsampler(child))
    return model


__all__ = ["SubpixelUpsampler", "subpixel_form"]
