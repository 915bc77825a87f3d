"""The rules about which files fcnseg reads: the pixel cap, and folder listings without broken links.

`fcnseg.data.io` applies both (and re-exports `max_image_pixels` and `set_max_image_pixels`).

The pixel cap refuses images whose header declares more pixels than `max_image_pixels`, before
anything is decoded: a PNG of 200 bytes can declare 144 megapixels, or 10^10, and decoding it
would take minutes of CPU and gigabytes of memory before the model ever saw it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from fcnseg.constants import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV
from fcnseg.errors import OptionError


def folder_entries(folder: str | os.PathLike) -> list[Path]:
    """The entries of a folder, sorted by name, without broken or looping symbolic links.

    Such links cannot be read, so they are skipped, but never silently: one warning names them
    all (hidden names, starting with ".", are skipped without a word, as the listings skip them).
    """
    folder = Path(folder)
    entries, broken = [], []
    for path in sorted(folder.iterdir()):
        # exists() follows the link: False for a missing target, and for a loop (ELOOP).
        if path.is_symlink() and not path.exists():
            if not path.name.startswith("."):
                broken.append(path.name)
            continue
        entries.append(path)
    if broken:
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        noun = "link" if len(broken) == 1 else "links"
        warnings.warn(f"{len(broken)} broken or looping symbolic {noun} in {folder} skipped: {shown}", stacklevel=3)
    return entries


def max_image_pixels() -> int | None:
    """The pixel cap (width x height) above which image files are refused; None when there is none.

    Read from the environment variable ``FCNSEG_MAX_IMAGE_PIXELS`` when it is set and not empty, else
    `fcnseg.constants.MAX_IMAGE_PIXELS`.

    Raises:
        OptionError: the environment variable is set to something other than a whole number or "none".
    """
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    if value.lower() in ("none", "0"):
        return None
    try:
        cap = int(value.replace("_", ""))
    except ValueError:
        cap = -1
    if cap < 0:
        raise OptionError(f"{MAX_IMAGE_PIXELS_ENV}={value!r}: expected a number of pixels, or 0 or none for no cap")
    return cap


def set_max_image_pixels(pixels: int | None) -> None:
    """Sets the pixel cap of `open_image` and `image_size`: a positive number, or None (or 0) for none.

    The cap is kept in the environment variable ``FCNSEG_MAX_IMAGE_PIXELS``, not in a module
    global: DataLoader workers are separate processes, and spawned ones (the default on macOS and
    Windows) import fcnseg afresh, so only the environment, which every child process inherits,
    carries the setting to them. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) is raised to
    the cap too, so that its decompression-bomb check never refuses an image the cap admits.

    Raises:
        OptionError: a negative number, or something other than a whole number.
    """
    if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0):
        raise OptionError(f"the pixel cap must be a positive whole number, or 0 or None for no cap; got {pixels!r}")
    os.environ[MAX_IMAGE_PIXELS_ENV] = str(pixels or "none")
    raise_pillow_limit(max_image_pixels())


def raise_pillow_limit(cap: int | None) -> None:
    """Raises Pillow's decompression-bomb limit to the cap (never lowers it), in this process.

    Pillow warns above its limit and refuses above twice it in ``Image.open``; without this, a
    worker process (which starts with Pillow's default) would refuse images the raised cap admits.
    """
    if Image.MAX_IMAGE_PIXELS is not None and (cap is None or Image.MAX_IMAGE_PIXELS < cap):
        Image.MAX_IMAGE_PIXELS = cap


def above_cap_message(path: Path, size: str, cap: int | None) -> str:
    """The refusal of an image above the cap: the file, its size, the cap, and how to raise it."""
    limit = f"{cap:,} pixels ({cap / 1e6:.1f} megapixels)" if cap is not None else "Pillow's limit"
    return (f"{path}: the image is {size}, above the cap of {limit}; "
            "refused before decoding. If it is a genuine photo, raise the cap with --max-pixels N "
            f"(set_max_image_pixels(N) in Python, or {MAX_IMAGE_PIXELS_ENV}=N; 0 for no cap), or downscale it")
