"""Paired (image, mask) transforms on torchvision.transforms.v2, and the train/eval/d2l presets.

The image travels as ``tv_tensors.Image`` and the mask as ``tv_tensors.Mask``, so every geometric
step moves them together and the mask is only ever resampled with nearest neighbour: class ids
are never blended into ids that are not in the mask.

Every preset takes a uint8 image (3, H, W) and an int64 mask (H, W) and returns a float32 image
(3, h, w), normalised with ``mean``/``std``, and an int64 target (h, w) as plain tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fcnseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from fcnseg.errors import DataError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "PairedTransform", "RandomScale", "PadToSize", "StrictRandomCrop",
    "train_transforms", "eval_transforms", "d2l_transforms",
]


class PairedTransform:
    """Applies a v2 pipeline to an (image, mask) pair: ``transforms(image, mask) -> (image, mask)``.

    Args:
        steps: v2 transforms applied in order.
    """

    def __init__(self, *steps: v2.Transform) -> None:
        self.pipeline = v2.Compose(list(steps))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        # Plain tensors downstream: tv_tensor subclasses would otherwise leak into collate and the model.
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"PairedTransform({self.pipeline})"


class RandomScale(v2.Transform):
    """Resizes by a factor drawn uniformly from ``scale_range`` (images bilinear, masks nearest).

    Unlike ``v2.RandomResize`` the factor is relative to each image's own size, so small and large
    images keep their proportions to each other.
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, not {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + float(torch.rand(())) * (high - low)
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] == [1, 1] and isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8:
            # torch's uint8 antialiased resize fails an internal assert for a 1x1 output (torch 2.14):
            # the same resize in float32, rounded back.
            pixel = F.resize(inpt.as_subclass(torch.Tensor).float(), size=[1, 1], antialias=True)
            return tv_tensors.wrap(pixel.round().clamp(0, 255).to(torch.uint8), like=inpt)
        # For Mask inputs torchvision's resize kernel always uses nearest, whatever is asked here.
        return self._call_kernel(F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class PadToSize(v2.Transform):
    """Pads images smaller than ``size`` up to it; larger sides are left alone.

    The padding is split at random between the two sides of each axis, so a small image does not
    always sit in the corner of the crop. Images are padded with ``image_fill``, masks with 255 so
    the padding is ignored by the loss and the metrics.
    """

    def __init__(self, size: tuple[int, int], image_fill: Sequence[int] | int = 0) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = image_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        pad_h, pad_w = max(0, self.size[0] - height), max(0, self.size[1] - width)
        top = int(torch.randint(0, pad_h + 1, ())) if pad_h else 0
        left = int(torch.randint(0, pad_w + 1, ())) if pad_w else 0
        return {"padding": [left, top, pad_w - left, pad_h - top]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        fill = list(fill) if isinstance(fill, (tuple, list)) else fill
        return self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)


class StrictRandomCrop(v2.RandomCrop):
    """``v2.RandomCrop`` without padding, whose error for a too-small image says what to do."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        if height < self.size[0] or width < self.size[1]:
            raise DataError(
                f"image of {height}x{width} is smaller than the {self.size[0]}x{self.size[1]} crop; the d2l preset "
                "does not pad: drop small images with the dataset option drop_smaller_than=crop_size, "
                "or use train_transforms, which pads"
            )
        return super().make_params(flat_inputs)


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def train_transforms(
    crop_size: tuple[int, int] = (320, 480),
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
    hue_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> PairedTransform:
    """Training augmentation: random scale, pad to the crop if needed, random crop, flip, jitter.

    Images smaller than the crop (after scaling) are padded with the mean colour, which becomes 0
    after normalisation, and their masks with 255, so no image is dropped and padding is ignored.

    Args:
        crop_size: (height, width) of every output, so batches stack without padding.
        scale_range: (low, high) resize factors drawn uniformly; None keeps the original size.
        hflip: flip left-right with probability 0.5.
        color_jitter: strength of brightness, contrast and saturation jitter; 0 disables it.
        hue_jitter: hue shift drawn from [-hue_jitter, hue_jitter] turns of the colour wheel (at most
            0.5); 0 disables it.
        mean, std: normalisation (ImageNet statistics by default, as the pretrained backbones expect).

    Returns:
        a paired callable giving float32 (3, *crop_size) and int64 (*crop_size).
    """
    mean_colour = [round(255 * m) for m in mean]
    steps: list[v2.Transform] = []
    if scale_range is not None and tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(scale_range))
    steps += [PadToSize(crop_size, image_fill=mean_colour), v2.RandomCrop(crop_size)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if color_jitter or hue_jitter:
        # After the crop: jitter costs per pixel, and only the cropped pixels are kept.
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=hue_jitter))
    return PairedTransform(*steps, *_to_normalized(mean, std))


def eval_transforms(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> PairedTransform:
    """Evaluation: the whole image, converted to float and normalised; the mask is unchanged.

    Batches of different sizes need `fcnseg.data.pad_collate`.
    """
    return PairedTransform(*_to_normalized(mean, std))


def d2l_transforms(
    crop_size: tuple[int, int] = (320, 480),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> PairedTransform:
    """The d2l chapter's pipeline: one random crop of ``crop_size``, then normalisation.

    No padding: images smaller than the crop raise `DataError`, so build the dataset with
    ``drop_smaller_than=crop_size`` as the chapter filters its data.
    """
    return PairedTransform(StrictRandomCrop(crop_size), *_to_normalized(mean, std))
