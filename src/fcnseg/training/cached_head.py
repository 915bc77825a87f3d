"""Packed body features and the FCN head that trains on them, for frozen-backbone training on a cache.

The head reads ``c32`` (FCN-32s), plus ``c16`` (16s), plus ``c8`` (8s), plus ``c4`` (4s) of the
body's features; `pack_features` keeps only those, in one tensor on the stride-32 grid (``c16``,
``c8`` and ``c4`` by space-to-depth, an exact rearrangement), so that a cached sample is an ordinary 4-D "image" the
training step handles like any other, and `CachedFeatureHead` takes the place of the model.
`fcnseg.training.feature_cache` builds and stores the cache.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.models.fcn import FCN

# Which taps each variant's head reads, counted from the end of the body's features (-1 is c32,
# -5 is c2), and the space-to-depth factor of each tap.
_HEAD_TAPS: dict[str, tuple[int, ...]] = {"32s": (-1,), "16s": (-2, -1), "8s": (-3, -2, -1), "4s": (-4, -3, -2, -1),
                                         "2s": (-5, -4, -3, -2, -1)}
_TAP_FACTORS = {-1: 1, -2: 2, -3: 4, -4: 8, -5: 16}


def packed_channels(channels: Sequence[int], variant: str) -> int:
    """Channels of the packed features of a body with ``channels`` (at strides (2, 4,) 8, 16, 32)."""
    return sum(channels[k] * _TAP_FACTORS[k] ** 2 for k in _HEAD_TAPS[variant])


def pack_features(features: Sequence[torch.Tensor], variant: str) -> torch.Tensor:
    """The body features a variant's head reads, as one tensor on the stride-32 grid.

    Args:
        features: ``(c2, c4, c8, c16, c32)`` (or ``(c8, c16, c32)``) at the padded input size
            (multiples of 32).
        variant: "32s", "16s", "8s", "4s" or "2s".

    Returns:
        ``(N, packed_channels, H/32, W/32)``: ``c32``, preceded by ``c16``, ``c8``, ``c4`` and ``c2``
        rearranged by ``F.pixel_unshuffle`` when the head reads them.
    """
    parts = [F.pixel_unshuffle(features[k], _TAP_FACTORS[k]) if _TAP_FACTORS[k] > 1 else features[k]
             for k in _HEAD_TAPS[variant]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def unpack_features(packed: torch.Tensor, channels: Sequence[int], variant: str) -> tuple[torch.Tensor | None, ...]:
    """Inverse of `pack_features`: one map per entry of ``channels`` (``(c2, c4, c8, c16, c32)`` for
    fcnseg's bodies), None for taps the head does not read."""
    taps = _HEAD_TAPS[variant]
    parts = packed.split([channels[k] * _TAP_FACTORS[k] ** 2 for k in taps], 1)
    out: list[torch.Tensor | None] = [None] * len(channels)
    for k, part in zip(taps, parts):
        out[k] = F.pixel_shuffle(part, _TAP_FACTORS[k]) if _TAP_FACTORS[k] > 1 else part
    return tuple(out)


class CachedFeatureHead(nn.Module):
    """An FCN's head on packed cached features: ``forward(packed) -> logits`` of the view's size.

    It holds the model, so training it trains the model's score layers and upsamplers in place, and
    the model is what checkpoints save.

    Args:
        model: the FCN whose body produced the features.
        size: ``(H, W)`` of the views; the head's logits (at the padded size) are cropped to it,
            as ``FCN.forward`` crops.
    """

    def __init__(self, model: FCN, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = (int(size[0]), int(size[1]))

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """Args: packed ``(N, C_packed, H/32, W/32)``, any float dtype. Returns: ``(N, C, H, W)``."""
        features = unpack_features(packed.float(), self.model.backbone.channels, self.model.variant)
        h, w = self.size
        return self.model.head(*features)[..., :h, :w]

    def loss(self, packed: torch.Tensor, target: torch.Tensor, *, class_weights: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """``segmentation_loss(self(packed), target)``, with the final upsampling and the loss fused.

        Once the body is cached, the full-resolution logits are most of a step's memory traffic;
        `fcnseg.ops.fused_loss.upsample_cross_entropy` never materialises them, and adds the
        upsampler's bias when it has one (a fixed bilinear upsampler, which is cheap, runs unfused).
        """
        from fcnseg.ops.fused_loss import upsample_cross_entropy
        from fcnseg.ops.loss import segmentation_loss

        if not self.model.upsample_final.learnable:
            return segmentation_loss(self(packed), target, class_weights=class_weights, reduction=reduction)
        features = unpack_features(packed.float(), self.model.backbone.channels, self.model.variant)
        return upsample_cross_entropy(self.model.scores(*features), self.model.upsample_final, target,
                                      class_weights=class_weights, reduction=reduction)


__all__ = ["CachedFeatureHead", "pack_features", "packed_channels", "unpack_features"]
