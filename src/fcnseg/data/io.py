"""Reading images and label masks from disk, with every problem reported as a `DataError`.

Datasets keep only paths and call these functions in ``__getitem__``, so a corrupt file is found
(and named) when it is read, not when the dataset is built. Decoding uses Pillow: it handles every
format the datasets use, and its modes tell an index mask from a colour mask.

EXIF orientation is deliberately not applied: masks carry no EXIF, and rotating only the image
would misalign it with its mask.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from fcnseg.constants import IGNORE_INDEX
from fcnseg.errors import DataError

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file, so truncation shows up here and not later.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow signals truncated and corrupt files with OSError or SyntaxError, depending on format.
        raise DataError(f"{path}: cannot decode image ({err.__class__.__name__}: {err}); the file is corrupt or truncated") from None
    return image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Returns (height, width) from the file header only, without decoding the pixels.

    Raises:
        DataError: the file is missing or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return height, width


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Reads an image as RGB.

    Grayscale is replicated to three channels, alpha is dropped, palette images are expanded to
    their colours and 16-bit images are scaled to 8 bits.

    Returns:
        uint8 tensor (3, H, W).

    Raises:
        DataError: unreadable file or a pixel format with no sensible RGB meaning (floating point).
    """
    path = Path(path)
    image = open_image(path)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PNG, TIFF): 0..65535 -> 0..255 with rounding.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        array = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "F":
        raise DataError(f"{path}: floating-point image (mode F) is not supported; save it as 8- or 16-bit")
    elif mode in ("P", "PA"):
        # Go through RGBA so palettes with transparency convert without Pillow's warning.
        array = np.array(image.convert("RGBA"))[..., :3]
    elif mode in ("L", "LA", "1"):
        gray = np.asarray(image.convert("L"))
        array = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "RGB":
        array = np.array(image)  # a copy: torch warns about (and must not share) Pillow's read-only buffer
    else:  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV...: Pillow's own conversion (alpha is dropped, not blended)
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def read_mask(
    path: str | os.PathLike,
    *,
    num_classes: int,
    void_id: int = IGNORE_INDEX,
    colors: Sequence[Sequence[int]] | None = None,
    void_colors: Iterable[Sequence[int]] = (),
) -> torch.Tensor:
    """Reads a label mask as class ids, with the dataset's void id mapped to 255.

    Index masks (8-bit grayscale, palette PNG read as its indices, 16-bit grayscale) give their
    values directly. RGB(A) masks are colour masks: each colour is looked up in ``colors`` (class id
    = position) or ``void_colors``. Without ``colors``, an RGB mask whose three channels are equal
    everywhere is read as an index mask, since some tools save index masks that way.

    Args:
        path: the mask file.
        num_classes: valid ids are 0 .. num_classes - 1.
        void_id: the id meaning "ignore" in this dataset's files (VOC 255, CamVid 11).
        colors: one RGB triple per class, for colour masks.
        void_colors: RGB triples meaning "ignore" in colour masks.

    Returns:
        int64 tensor (H, W), values in [0, num_classes) or 255.

    Raises:
        DataError: unreadable file, unknown colour, or ids outside [0, num_classes) other than the void id.
    """
    path = Path(path)
    image = open_image(path)
    mode = image.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(image)[..., :3]
        if colors is not None:
            ids = _ids_from_colors(rgb, colors, void_colors, void_id, path)
        elif (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            ids = rgb[..., 0].astype(np.int64)
        else:
            raise DataError(f"{path}: colour (RGB) mask, but this dataset defines no class colours to match; "
                            "save index masks (one class id per pixel) or add colours to the class list")
    elif mode in ("P", "L", "1") or mode in _SIXTEEN_BIT_MODES:
        ids = np.asarray(image, dtype=np.int64)
    elif mode in ("LA", "PA"):
        ids = np.asarray(image, dtype=np.int64)[..., 0]
    else:
        raise DataError(f"{path}: mask has pixel mode {mode}; expected an index mask (8/16-bit grayscale or palette) or an RGB colour mask")
    return torch.from_numpy(_check_ids(ids, num_classes, void_id, path))


def _ids_from_colors(rgb: np.ndarray, colors: Sequence[Sequence[int]], void_colors: Iterable[Sequence[int]],
                     void_id: int, path: Path) -> np.ndarray:
    table = {_pack(c): i for i, c in enumerate(colors)}
    for c in void_colors:
        table[_pack(c)] = void_id
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    # Look up each distinct colour once: a mask has a handful of colours but ~10^5 pixels.
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)
    lut = np.empty(len(unique), dtype=np.int64)
    for j, key in enumerate(unique.tolist()):
        if key not in table:
            where = np.argwhere(packed == key)[0]
            colour = (key >> 16, (key >> 8) & 255, key & 255)
            raise DataError(f"{path}: colour {colour} at row {where[0]}, column {where[1]} is not a class colour "
                            f"(known: {len(colors)} class colours" + (" and void" if void_colors else "") + ")")
        lut[j] = table[key]
    return lut[inverse].reshape(packed.shape)


def _pack(color: Sequence[int]) -> int:
    r, g, b = (int(v) for v in color)
    return (r << 16) | (g << 8) | b


def _check_ids(ids: np.ndarray, num_classes: int, void_id: int, path: Path) -> np.ndarray:
    void = ids == void_id
    bad = ~void & ((ids < 0) | (ids >= num_classes))
    if bad.any():
        values = np.unique(ids[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise DataError(f"{path}: label values {shown} are outside 0..{num_classes - 1} and are not the void id {void_id} "
                        f"({int(bad.sum())} pixels); wrong class list, or an image saved where a mask belongs?")
    ids = ids.astype(np.int64, copy=True)
    ids[void] = IGNORE_INDEX
    return ids


def check_same_size(image: torch.Tensor, mask: torch.Tensor, image_path: Path, mask_path: Path) -> None:
    """Raises `DataError` naming both files when an image and its mask differ in size."""
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        (ih, iw), (mh, mw) = image.shape[-2:], mask.shape[-2:]
        raise DataError(f"{mask_path}: mask is {mh}x{mw} (HxW) but its image {image_path} is {ih}x{iw}")
