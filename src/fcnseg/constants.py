"""The values every part of fcnseg agrees on, in one place (like timm's ``data/constants.py``)."""
from __future__ import annotations

IGNORE_INDEX = 255
"""The one void label: every dataset returns it for unlabelled pixels, whatever its own void id on
disk; losses and metrics skip it."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet input statistics (on 0..1 values), the normalisation of every pretrained body."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
"""Files read as photos (lower case; matched case-insensitively)."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".gif")
"""Files read as label masks: lossless formats only (a JPEG mask's edges hold invented colours)."""
