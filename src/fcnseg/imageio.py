"""Reading user images for prediction, and turning any image-like value into an 8-bit RGB array.

`Segmenter.predict` and ``fcnseg predict`` accept photos in whatever form users have them: a path,
a PIL image in any mode, a numpy array or a tensor. This module reduces them all to one thing, an
``(H, W, 3)`` uint8 array, and reports unreadable files as a `DataError` naming the file.

EXIF orientation is not applied, as in `fcnseg.data.io`: ground-truth masks carry no EXIF, and
rotating only the photo would misalign the prediction with its mask.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from fcnseg.constants import IGNORE_INDEX, IMAGE_EXTENSIONS
from fcnseg.data.io import open_image  # noqa: F401  (re-exported)
from fcnseg.errors import DataError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
"""Anything `to_rgb_array` accepts: a path, a PIL image, an HxWx3 array or a CHW tensor."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as 8-bit RGB.

    Returns:
        uint8 array ``(H, W, 3)``.

    Raises:
        DataError: unreadable file (see `open_image`).
    """
    image = open_image(path)
    try:
        return pil_to_rgb_array(image)
    except ValueError as err:
        raise DataError(f"{path}: {err}") from None


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """Converts a PIL image of any mode to an ``(H, W, 3)`` uint8 array.

    Grayscale is replicated to three channels, alpha is dropped (not blended), palettes are
    expanded to their colours, 16- and 32-bit integer images are scaled from 0..65535, and float
    images are taken as 0..1 when their maximum is at most 1, else as 0..255.

    Raises:
        ValueError: a mode Pillow cannot convert to RGB.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        # Mode "I" holds 8-bit data in some files and 16-bit data in others; only values above
        # 255 tell them apart.
        if mode != "I" or values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return _gray_to_rgb(np.clip(values, 0, 255).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        # Through RGBA so that palettes with transparency convert without Pillow's warning.
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[..., :3])
    if mode == "RGB":
        return np.array(image)  # a copy: Pillow's buffer is read-only
    try:
        return np.array(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert an image of mode {mode} to RGB ({err})") from None


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Turns an image-like value into an ``(H, W, 3)`` uint8 array.

    Args:
        image: a path; a PIL image (any mode); a numpy array ``(H, W, 3)``, ``(H, W, 4)`` (alpha
            dropped) or ``(H, W)``, uint8 or float in 0..1; or a tensor ``(3, H, W)`` or
            ``(1, H, W)``, uint8 or float in 0..1.

    Raises:
        DataError: an unreadable file.
        ValueError: an array or tensor of another shape, or an unsupported type.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb_array(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        return _array_to_uint8(image.detach().cpu().permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
            raise ValueError(f"expected an image array (H, W, 3) or (H, W), got shape {image.shape}")
        return _array_to_uint8(image)
    raise ValueError(f"expected an image path, PIL image, numpy array or tensor, got {type(image).__name__}")


def load_mask(path: str | os.PathLike, colors: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Reads a ground-truth mask as class indices.

    Palette and grayscale masks give their indices directly. RGB masks are colour masks: a pixel
    whose colour is ``colors[i]`` gets index ``i``; any other colour gets the ignore index 255.

    Returns:
        int64 array ``(H, W)``.

    Raises:
        DataError: unreadable file, or an RGB mask without ``colors``.
    """
    image = open_image(path)
    if image.mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(image)[..., :3]
        if colors is None:
            raise DataError(f"{path}: an RGB colour mask, but no class colours were given to decode it")
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        ids = np.full(packed.shape, IGNORE_INDEX, dtype=np.int64)
        for index, (r, g, b) in enumerate(colors):
            ids[packed == ((int(r) << 16) | (int(g) << 8) | int(b))] = index
        return ids
    if image.mode in ("LA", "PA"):
        return np.asarray(image, dtype=np.int64)[..., 0].copy()
    return np.asarray(image, dtype=np.int64).copy()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside a folder (by extension, case-insensitive), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array.astype(np.uint8) * 255)
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(np.clip(np.nan_to_num(array) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        # Integer arrays other than uint8 are taken as 0..255 values, as an uint8 array would be.
        return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))
    raise ValueError(f"unsupported image dtype {array.dtype}")
