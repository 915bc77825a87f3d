"""A probe for CamVid's Pole: MobileNetV2's deepest stage run at stride 16 (dilated), scored on a holdout.

Outside the library: it trains `fcnseg train`'s run with the body's last stage (features[14:19],
stride 32) made to keep stride 16, as DeepLab does: its strided depthwise convolution runs at
stride 1 and the depthwise convolutions after it at dilation 2, so the ImageNet weights see the
same neighbourhoods on a twice finer grid. The FCN's stride-32 -> 16 upsampler becomes an identity
(both score maps are then at stride 16). The question is whether deep features at a finer grid
find poles that the 1x1 scores on the early, shallow stride-4 and stride-8 maps do not. Its
checkpoints hold a changed body that `fcnseg` does not rebuild: they are for this comparison only,
read through the run's own final validation.

    python experiments/dilated_probe.py -- --model fcn_mobilenet_v2 --variant 4s ... --holdout 0.2 --out DIR
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import fcnseg.training.trainer as trainer_module
from fcnseg.cli import main as fcnseg_main


class DilatedDepthwiseConv2d(nn.Conv2d):
    """A dilated depthwise Conv2d (same parameters) run on contiguous (NCHW) tensors.

    torch 2.14.1's CPU kernel for a dilated depthwise convolution in bf16 on channels-last tensors
    returns a wrong weight gradient (relative error above 1, sometimes 1e33: the NaN losses of the
    first full-budget run); the contiguous layout's is right (runs/session24/dw_check.py).
    """

    def __init__(self, conv: nn.Conv2d, rate: int) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, rate, rate,
                         conv.groups, conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        y = super().forward(x.contiguous())
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def dilate_stage(stage: nn.Module, rate: int = 2) -> int:
    """Makes ``stage`` keep its input's stride: strided depthwise 3x3 convs -> stride 1, the rest -> ``rate``.

    Returns how many convolutions changed. The parameters are the same objects, so weights loaded
    before (ImageNet) are kept.
    """
    changed = 0
    for parent in list(stage.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Conv2d) and child.groups > 1 and child.kernel_size == (3, 3)):
                continue
            if max(child.stride) > 1:
                # A plain Conv2d: the library's StridedDepthwiseConv2d is for strided layers only.
                conv = nn.Conv2d(child.in_channels, child.out_channels, 3, 1, 1, groups=child.groups,
                                 bias=child.bias is not None)
                conv.weight, conv.bias = child.weight, child.bias
                setattr(parent, name, conv)
            else:
                setattr(parent, name, DilatedDepthwiseConv2d(child, rate))
            changed += 1
    return changed


def with_stride16(build_model):
    """``build_model`` whose MobileNetV2 FCNs keep their deepest stage at stride 16."""
    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        if getattr(model.backbone, "name", "") != "mobilenet_v2":
            raise SystemExit("dilated_probe.py: --model fcn_mobilenet_v2 only")
        if dilate_stage(model.backbone.stage32) == 0:
            raise SystemExit("dilated_probe.py: found no depthwise convolution to dilate")
        model.upsample32to16 = nn.Identity()
        return model
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_options", nargs="+", help="fcnseg train options, after --")
    args = parser.parse_args(argv)
    trainer_module.build_model = with_stride16(trainer_module.build_model)
    return fcnseg_main(["train", *args.train_options])


if __name__ == "__main__":
    sys.exit(main())
