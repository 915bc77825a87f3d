"""What a bulk prediction reads and writes: inputs expanded from files, folders and globs, and the
output names of each input, none shared by two inputs.

Pure bookkeeping on paths: nothing here decodes an image, so a list of a million files costs a
list of a million paths, not their pixels.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from fcnseg.constants import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from fcnseg.data.io import folder_entries

OUTPUT_SUFFIXES = ("", "_overlay", "_grid")  # <name>.png, <name>_overlay.png (or .jpg), <name>_grid.png


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a video (its suffix is one of `fcnseg.constants.VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_inputs(folder: str | os.PathLike) -> list[Path]:
    """The images and videos directly inside a folder (by extension, case-insensitive), sorted by name."""
    readable = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    return [p for p in folder_entries(folder) if p.is_file() and p.suffix.lower() in readable]


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expands files, folders (their images and videos, not recursive) and glob patterns, in the
    order given, without duplicates (a file named twice is predicted once).

    Returns:
        The input files, and ``(input, reason)`` for inputs that name nothing.
    """
    files: list[Path] = []
    failures: list[tuple[str, str]] = []
    for given in inputs:
        text = str(given)
        path = Path(text)
        if path.is_dir():
            found = list_inputs(path)
            if not found:
                failures.append((text, "folder holds no image or video files"))
        elif path.exists():
            found = [path]
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            found = [m for m in matches if m.is_file()]
            for folder in (m for m in matches if m.is_dir()):
                found.extend(list_inputs(folder))
            if not found:
                failures.append((text, "no files match this pattern"))
        else:
            failures.append((text, "no such file or folder"))
            continue
        files.extend(found)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), failures


def output_files(name: str, grid: bool, overlay: bool = True, overlay_format: str = "png") -> list[str]:
    """The files written for an image whose output name is ``name``: label map, overlay (a PNG, or a JPEG
    with ``overlay_format="jpg"``), grid (each of the last two only when asked for)."""
    wanted = (True, overlay, grid)
    extensions = ("png", overlay_format, "png")
    return [f"{name}{suffix}.{ext}" for suffix, want, ext in zip(OUTPUT_SUFFIXES, wanted, extensions) if want]


def output_names(files: list[Path], grid: bool = False, overlay: bool = True,
                 overlay_format: str = "png") -> dict[Path, list[str]]:
    """The output files of each input (`output_files`), none shared by two inputs.

    An input keeps its stem unless one of its files would be another input's (a/x.jpg and b/x.jpg;
    x.jpg and x_overlay.jpg), in which case it gets the first free ``<stem>-2``, ``<stem>-3``...
    Names are compared case-insensitively, as macOS and Windows file systems compare them. A video's
    list holds its name alone (``[name]``): the video writer decides its files from it.
    """
    taken: set[str] = set()
    names: dict[Path, list[str]] = {}
    for f in files:
        name, k = f.stem, 1
        while any(candidate.casefold() in taken for candidate in output_files(name, True, True, overlay_format)):
            k += 1
            name = f"{f.stem}-{k}"
        taken.update(candidate.casefold() for candidate in output_files(name, True, True, overlay_format))
        names[f] = [name] if is_video(f) else output_files(name, grid, overlay, overlay_format)
    return names


def describe(where: str, reason: str) -> str:
    """``where: reason``, unless the reason already names the file (fcnseg.data.io's messages start with it)."""
    return reason if where in reason else f"{where}: {reason}"
