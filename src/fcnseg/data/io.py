"""The one reader of images and label masks, for training, evaluation and prediction alike.

Datasets keep only paths and call `read_image` and `read_mask` in ``__getitem__``, so a corrupt
file is found (and named) when it is read, not when the dataset is built. `Segmenter`, ``fcnseg
predict`` and `fcnseg.visualize` take photos in whatever form users have them (`ImageLike`: a
path, a PIL image in any mode, an array or a tensor) through `to_rgb_array` and `image_to_tensor`.
Every path goes through `open_image` and every PIL image through one decoding to 8-bit RGB, so
a photo reads the same whichever part of fcnseg reads it. Every problem is a `DataError` naming
the file.

EXIF orientation is applied to every file read, photos and masks alike, as a viewer shows them:
a phone photo is segmented upright, and a mask drawn on the upright photo fits it. `image_size`
reports the same upright size from the header alone. The orientation is taken from the metadata
before the pixel data (where JPEG, TIFF and WebP keep it, and where PNG's eXIf chunk belongs), so
the reader and `image_size` always agree. PIL images passed in memory are taken as they are.

Files with more pixels than a cap (`max_image_pixels`, 89.5 megapixels by default) are refused
from their header, before any pixel is decoded: a PNG of a few hundred bytes can declare 10^10
pixels. `set_max_image_pixels` raises the cap for this process and the DataLoader workers it
starts. Broken or looping symbolic links in a folder are skipped with one summary warning.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from fcnseg.constants import IGNORE_INDEX, IMAGE_EXTENSIONS
from fcnseg.data import fast_png
from fcnseg.data.files import (
    above_cap_message,
    folder_entries,
    max_image_pixels,
    raise_pillow_limit,
    set_max_image_pixels,
)
from fcnseg.errors import DataError

__all__ = ["ImageLike", "check_same_size", "folder_entries", "image_size", "image_to_tensor", "list_images",
           "max_image_pixels", "open_image", "read_image", "read_mask", "set_max_image_pixels", "to_rgb_array"]

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
"""Anything `to_rgb_array` accepts: a path, a PIL image, an HxWx3 array or a CHW tensor."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the picture by 90 degrees


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside a folder (by extension, case-insensitive), sorted by name.

    Broken or looping symbolic links are left out and named in one warning (`folder_entries`).
    """
    return [p for p in folder_entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (the header only) with the pixel cap checked before any decoding.

    Raises:
        DataError: the image is above the cap (also when Pillow's own check refused it first).
        FileNotFoundError, OSError, SyntaxError, ValueError: as ``Image.open``.
    """
    cap = max_image_pixels()
    raise_pillow_limit(cap)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:  # above twice Pillow's limit: its size is in the message
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise DataError(above_cap_message(path, f"{int(found[1]):,} pixels" if found else "too many pixels", cap)) from None
    width, height = image.size
    if cap is not None and width * height > cap:
        image.close()
        raise DataError(above_cap_message(path, f"{width}x{height} (WxH) = {width * height:,} pixels", cap))
    return image


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file, upright by its EXIF orientation.

    Decoding here (not lazily) makes truncation show up here and not later. The size is checked
    against `max_image_pixels` from the header, before the pixels are decoded.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable, or
            above the pixel cap.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    try:
        image = _open_header(path)
        orientation = _orientation(image)
        image.load()
        if orientation in range(2, 9):
            ImageOps.exif_transpose(image, in_place=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow signals truncated and corrupt files with OSError or SyntaxError, depending on format.
        raise DataError(f"{path}: cannot decode image ({err.__class__.__name__}: {err}); the file is corrupt or truncated") from None
    return image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Returns the upright (height, width) from the file header only, without decoding the pixels.

    The size is the one `read_image` returns: sides swapped when the EXIF orientation turns the
    picture (orientations 5 to 8).

    Raises:
        DataError: the file is missing, not an image, or above the pixel cap (`max_image_pixels`).
    """
    path = Path(path)
    try:
        with _open_header(path) as image:
            width, height = image.size
            orientation = _orientation(image)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    return (width, height) if orientation in _SWAPS_SIDES else (height, width)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8) in the metadata read with the header; 1 when absent or unreadable."""
    try:
        # The generic `Image.getexif` reads only what `Image.open` parsed; PNG's override would
        # decode the pixels first to look for metadata after them.
        value = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF (Pillow raises several kinds): the pixels are still good
        return 1
    return value if isinstance(value, int) else 1


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Reads an image file as RGB, upright, decoded as `to_rgb_array` describes.

    Returns:
        uint8 tensor (3, H, W).

    Raises:
        DataError: unreadable file or a pixel format with no RGB meaning.
    """
    return torch.from_numpy(to_rgb_array(path)).permute(2, 0, 1).contiguous()


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Turns an image-like value into an ``(H, W, 3)`` uint8 array: the one decoding of fcnseg.

    PIL images (and files, read with `open_image`): grayscale is replicated to three channels,
    alpha is dropped (not blended: LA, PA, RGBA), palettes are expanded to their colours, 16-bit
    images (modes I;16 and I, e.g. 16-bit PNG and TIFF) are scaled from 0..65535, floating-point
    images (mode F) are taken as 0..1 when their maximum is at most 1 and as 0..255 otherwise,
    and CMYK, YCbCr and the like use Pillow's conversion.

    Args:
        image: a path; a PIL image (any mode); a numpy array ``(H, W, 3)``, ``(H, W, 4)`` (alpha
            dropped) or ``(H, W)``, uint8 or float in 0..1; or a tensor ``(3, H, W)`` or
            ``(1, H, W)``, uint8 or float in 0..1.

    Raises:
        DataError: an unreadable file, or one whose pixel format has no RGB meaning.
        ValueError: an array or tensor of another shape, an unsupported type, or a PIL image of a
            mode with no RGB meaning.
    """
    if isinstance(image, (str, os.PathLike)):
        fast = _fast_rgb(Path(image))
        if fast is not None:
            return fast
        decoded = open_image(image)  # its DataError names the file already
        try:
            return _pil_to_rgb(decoded)
        except ValueError as err:
            raise DataError(f"{image}: {err}") from None
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        return _array_to_uint8(image.detach().cpu().permute(1, 2, 0).numpy())
    if isinstance(image, np.ndarray):
        return _array_to_uint8(_hwc_view(image))
    raise ValueError(f"expected an image path, PIL image, numpy array or tensor, got {type(image).__name__}")


def _fast_rgb(path: Path) -> np.ndarray | None:
    """An upright 8-bit RGB PNG decoded by libspng (`fcnseg.data.fast_png`); None for any other
    file, and for any problem, which `open_image` then reports."""
    if not fast_png.available() or path.suffix.lower() != ".png":
        return None
    try:
        with _open_header(path) as header:
            if not fast_png.is_plain_rgb8(header) or _orientation(header) != 1:
                return None
    except (DataError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return fast_png.decode_rgb8(path)


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """An image-like value as a float32 ``(3, H, W)`` tensor in 0..1 (not yet normalised).

    Float tensors and arrays are used as given (no rounding to 8 bits); everything else goes
    through `to_rgb_array`.
    """
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        return image.detach().float().expand(3, -1, -1)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        array = _hwc_view(image)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1).expand(3, -1, -1)
    return torch.from_numpy(to_rgb_array(image)).permute(2, 0, 1).float().div_(255)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit grayscale (PNG, TIFF; Pillow gives some of them mode I): 0..65535 -> 0..255, rounded.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return _gray_to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8))
    if mode in ("P", "PA"):
        # Through RGBA, so that palettes with transparency convert without Pillow's warning.
        return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[..., :3])
    if mode in ("L", "LA", "1"):
        return _gray_to_rgb(np.asarray(image.convert("L")))
    if mode == "RGB":
        return np.array(image)  # a copy: Pillow's buffer is read-only, and torch must not share it
    try:  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV...: Pillow's own conversion (alpha dropped, not blended)
        return np.array(image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert an image of mode {mode} to RGB ({err})") from None


def _hwc_view(array: np.ndarray) -> np.ndarray:
    """An image array as (H, W, 1 or 3): alpha dropped, grayscale given a channel axis."""
    original = array.shape
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an image array (H, W, 3) or (H, W), got shape {original}")
    return array


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
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


def read_mask(
    path: str | os.PathLike,
    *,
    num_classes: int,
    void_id: int = IGNORE_INDEX,
    colors: Sequence[Sequence[int]] | None = None,
    void_colors: Iterable[Sequence[int]] = (),
) -> torch.Tensor:
    """Reads a label mask as class ids, with the dataset's void id mapped to 255.

    The one mask reader of training, ``fcnseg eval`` and ``fcnseg predict --masks``, with one
    policy: a value or colour that is neither a class nor void is an error naming the file, the
    value or colour and where it is, never silently read as void.

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
    elif mode in ("P", "L", "1", "I") or mode in _SIXTEEN_BIT_MODES:
        ids = np.asarray(image, dtype=np.int64)
    elif mode in ("LA", "PA"):
        ids = np.asarray(image, dtype=np.int64)[..., 0]
    else:
        raise DataError(f"{path}: mask has pixel mode {mode}; expected an index mask (8/16-bit grayscale or palette) or an RGB colour mask")
    return torch.from_numpy(_check_ids(ids, num_classes, void_id, path))


def _ids_from_colors(rgb: np.ndarray, colors: Sequence[Sequence[int]], void_colors: Iterable[Sequence[int]],
                     void_id: int, path: Path) -> np.ndarray:
    table = {_pack(c): i for i, c in enumerate(colors)}
    void_colors = list(void_colors)
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
            known = f"{len(colors)} class colours" + (f" and void {', '.join(map(str, void_colors))}" if void_colors else "")
            raise DataError(f"{path}: colour {colour} at row {where[0]}, column {where[1]} is not a class colour "
                            f"(known: {known}); repaint those pixels with a class colour or the void colour, "
                            "or add the colour to the class list")
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
    """Raises `DataError` naming both files when an image and its mask differ in size.

    Both are upright by their own EXIF orientation; a mask whose size is the image's turned by 90
    degrees was most likely drawn on the photo's stored pixels, not on the picture as shown.
    """
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        (ih, iw), (mh, mw) = image.shape[-2:], mask.shape[-2:]
        hint = ("; the image is turned upright by its EXIF orientation, so its mask must be drawn on "
                "the upright picture" if (mh, mw) == (iw, ih) else "")
        raise DataError(f"{mask_path}: mask is {mh}x{mw} (HxW) but its image {image_path} is {ih}x{iw}{hint}")
