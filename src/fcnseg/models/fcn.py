"""The Fully Convolutional Network (Long, Shelhamer, Darrell 2015) as in Dive into Deep Learning.

FCN-32s: body -> 1x1 conv to class scores -> transposed conv (kernel 64, stride 32, padding 16,
bilinear init). FCN-16s and FCN-8s add score maps of the stride-16 and stride-8 stages through 2x
transposed convs (the paper's skip architecture); their score layers start at zero so a fresh
16s/8s predicts what the 32s it extends predicts. FCN-4s (not in the paper) takes one more skip,
from the stride-4 stage (ResNet's layer1), for thin classes; a fresh 4s predicts what its 8s does
up to the difference between one bilinear x8 upsampling and two (x2 then x4). FCN-2s goes one
stage further, to the stride-2 stem.

The body's features are ``(c2, c4, c8, c16, c32)`` (`fcnseg.models.backbones.Backbone`); the head
reads them from the end, so a body of three taps ``(c8, c16, c32)`` serves 32s, 16s and 8s.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.models.backbones import BACKBONES, WeightsArg, build_backbone
from fcnseg.models.upsample import UPSAMPLER_CHOICES, TransposedConvUpsampler, UpsamplerInit

Variant = Literal["32s", "16s", "8s", "4s", "2s"]
VARIANTS: tuple[str, ...] = ("32s", "16s", "8s", "4s", "2s")  # coarse to fine: each adds one skip
# The stride of the scores that enter each variant's final upsampler.
VARIANT_STRIDES: Mapping[str, int] = MappingProxyType({"32s": 32, "16s": 16, "8s": 8, "4s": 4, "2s": 2})
OUTPUT_STRIDE = 32
# Each skip's score layer and x2 upsampler, coarse to fine: the first k of them make the k-th variant
# after 32s. The n-th reads the body's (n + 2)-th feature map from the end.
_SKIPS = (("score16", "upsample32to16"), ("score8", "upsample16to8"), ("score4", "upsample8to4"),
          ("score2", "upsample4to2"))


class FCN(nn.Module):
    """FCN-32s/16s/8s/4s/2s on a `Backbone`; ``forward`` returns logits of the input's exact size.

    Inputs of any size are padded (bottom and right, with zeros: the mean colour after ImageNet
    normalisation) to a multiple of 32 so that every stage aligns exactly, and the logits are
    cropped back. Build through `fcn_resnet18` and siblings or `build_model`.

    ``upsampler_bias`` gives the final upsampler (the one that makes the output) a per-class bias,
    as the chapter's ``nn.ConvTranspose2d`` has; the x2 upsamplers of the skips stay without, as
    in the paper.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        variant: Variant = "32s",
        upsampler: UpsamplerInit = "bilinear",
        freeze_backbone: bool = False,
        upsampler_bias: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if upsampler not in UPSAMPLER_CHOICES:
            raise ValueError(f"unknown upsampler {upsampler!r}; choose one of {', '.join(UPSAMPLER_CHOICES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.variant = variant
        channels = tuple(backbone.channels)
        self.skips = VARIANTS.index(variant)
        if len(channels) < self.skips + 1:
            strides = ", ".join(str(OUTPUT_STRIDE >> k) for k in reversed(range(len(channels))))
            raise ValueError(f"FCN-{variant} needs a body with a stride-{VARIANT_STRIDES[variant]} tap: "
                             f"channels {channels} has only strides {strides}")
        self.score32 = nn.Conv2d(channels[-1], num_classes, kernel_size=1)
        for k, (score_name, upsampler_name) in enumerate(_SKIPS[:self.skips]):
            setattr(self, score_name, _zero_conv1x1(channels[-2 - k], num_classes))
            setattr(self, upsampler_name, TransposedConvUpsampler(num_classes, 2, upsampler))
        self.upsample_final = TransposedConvUpsampler(num_classes, VARIANT_STRIDES[variant], upsampler,
                                                      bias=upsampler_bias)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "FCN":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BatchNorm statistics too, not only frozen weights
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Args: image ``(N, 3, H, W)`` normalised. Returns: logits ``(N, num_classes, H, W)``."""
        h, w = image.shape[-2:]
        padded = pad_to_multiple(image, OUTPUT_STRIDE)
        return self.head(*self.backbone(padded))[..., :h, :w]

    def head(self, *features: torch.Tensor | None) -> torch.Tensor:
        """Scores and upsamplers on body features (padded size); used alone with cached features.

        Args:
            *features: the body's ``(c2, c4, c8, c16, c32)`` (or ``(c8, c16, c32)``); maps the
                variant does not read may be None.
        """
        return self.upsample_final(self.scores(*features))

    def scores(self, *features: torch.Tensor | None) -> torch.Tensor:
        """The class scores that enter the final upsampler: stride 32, 16, 8, 4 or 2 by variant.

        Args:
            *features: as `head`, read from the end (``features[-1]`` is ``c32``).
        """
        score = self.score32(features[-1])
        for k, (score_name, upsampler_name) in enumerate(_SKIPS[:self.skips]):
            score = getattr(self, upsampler_name)(score) + getattr(self, score_name)(features[-2 - k])
        return score


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pads ``(N, C, H, W)`` at the bottom and right so H and W are multiples of ``multiple``."""
    h, w = image.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if isinstance(pad_h, int) and pad_h == 0 and pad_w == 0:
        return image
    return F.pad(image, (0, pad_w, 0, pad_h))


def _zero_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _fcn(
    backbone_name: str,
    *,
    variant: Variant,
    num_classes: int,
    weights_backbone: WeightsArg,
    upsampler: UpsamplerInit,
    freeze_backbone: bool,
    upsampler_bias: bool,
) -> FCN:
    backbone = build_backbone(backbone_name, weights_backbone)
    model = FCN(backbone, num_classes, variant=variant, upsampler=upsampler, freeze_backbone=freeze_backbone,
                upsampler_bias=upsampler_bias)
    model.model_name = f"fcn_{backbone_name}"
    model.model_kwargs = {
        "variant": variant,
        "num_classes": num_classes,
        "upsampler": upsampler,
        "freeze_backbone": freeze_backbone,
        "upsampler_bias": upsampler_bias,
    }
    return model


def fcn_resnet18(
    *,
    variant: Variant = "32s",
    num_classes: int = 21,
    weights_backbone: WeightsArg = "DEFAULT",
    upsampler: UpsamplerInit = "bilinear",
    freeze_backbone: bool = False,
    upsampler_bias: bool = False,
) -> FCN:
    """FCN on ResNet-18: the chapter's model (with ``variant="32s"``).

    Args:
        variant: "32s", "16s", "8s", "4s" (a stride-4 skip from layer1, for thin classes) or "2s"
            (one more, from the stride-2 stem).
        num_classes: classes including background (21 for VOC).
        weights_backbone: "DEFAULT" for torchvision's ImageNet weights, a path to a local
            state-dict file, or None for random initialisation.
        upsampler: "bilinear" (learned, bilinear init), "xavier" or "fixed" (bilinear, frozen).
        freeze_backbone: keep the body in eval mode without gradients.
        upsampler_bias: a per-class bias on the final upsampler, as the chapter's
            ``nn.ConvTranspose2d`` has (12,993,642 parameters for VOC's 21 classes, against
            12,993,621 without); the paper's FCN, and the default, have none.
    """
    return _fcn("resnet18", variant=variant, num_classes=num_classes, weights_backbone=weights_backbone,
                upsampler=upsampler, freeze_backbone=freeze_backbone,
                upsampler_bias=upsampler_bias)


def fcn_resnet34(
    *,
    variant: Variant = "32s",
    num_classes: int = 21,
    weights_backbone: WeightsArg = "DEFAULT",
    upsampler: UpsamplerInit = "bilinear",
    freeze_backbone: bool = False,
    upsampler_bias: bool = False,
) -> FCN:
    """FCN on ResNet-34; arguments as in `fcn_resnet18`."""
    return _fcn("resnet34", variant=variant, num_classes=num_classes, weights_backbone=weights_backbone,
                upsampler=upsampler, freeze_backbone=freeze_backbone,
                upsampler_bias=upsampler_bias)


def fcn_resnet50(
    *,
    variant: Variant = "32s",
    num_classes: int = 21,
    weights_backbone: WeightsArg = "DEFAULT",
    upsampler: UpsamplerInit = "bilinear",
    freeze_backbone: bool = False,
    upsampler_bias: bool = False,
) -> FCN:
    """FCN on ResNet-50 (2048 channels at stride 32); arguments as in `fcn_resnet18`."""
    return _fcn("resnet50", variant=variant, num_classes=num_classes, weights_backbone=weights_backbone,
                upsampler=upsampler, freeze_backbone=freeze_backbone,
                upsampler_bias=upsampler_bias)


def fcn_mobilenet_v2(
    *,
    variant: Variant = "32s",
    num_classes: int = 21,
    weights_backbone: WeightsArg = "DEFAULT",
    upsampler: UpsamplerInit = "bilinear",
    freeze_backbone: bool = False,
    upsampler_bias: bool = False,
) -> FCN:
    """FCN on MobileNetV2 ``features`` (1280 channels at stride 32); arguments as in `fcn_resnet18`."""
    return _fcn("mobilenet_v2", variant=variant, num_classes=num_classes, weights_backbone=weights_backbone,
                upsampler=upsampler, freeze_backbone=freeze_backbone,
                upsampler_bias=upsampler_bias)


# Read-only: the names are what checkpoints store, so code outside this module cannot rebind them.
MODEL_BUILDERS: Mapping[str, Callable[..., FCN]] = MappingProxyType({
    "fcn_resnet18": fcn_resnet18,
    "fcn_resnet34": fcn_resnet34,
    "fcn_resnet50": fcn_resnet50,
    "fcn_mobilenet_v2": fcn_mobilenet_v2,
})
assert {name[len("fcn_"):] for name in MODEL_BUILDERS} == set(BACKBONES)


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return list(MODEL_BUILDERS)


def build_model(name: str, **kwargs: Any) -> FCN:
    """Builds a model by name (as stored in checkpoints and given to the CLI).

    Args:
        name: one of `list_models()`, e.g. "fcn_resnet18".
        **kwargs: keyword arguments of that builder.
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name](**kwargs)
