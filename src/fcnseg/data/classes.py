"""Class lists: names and colours of a dataset's classes, and the class files that hold them.

A folder dataset names its classes in ``classes.yaml`` (names, optional colours, void id and void
colour) or ``classes.txt`` (one ``name`` or ``name R G B`` per line); see `fcnseg.data.folder`
and docs/DATASETS.md for the format. Classes without colours get `default_palette`, the VOC colour
map extended to any number of classes, which is also what export and synthetic scenes draw with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcnseg.constants import IGNORE_INDEX
from fcnseg.errors import DataError

CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt")
"""The class-list file names a folder dataset may hold (exactly one of them)."""
_YAML_KEYS = {"classes", "colors", "ignore_index", "ignore_color", "description"}


@dataclass
class ClassSpec:
    """What a class file says: names, colours (None if not given), void id and void colour."""

    classes: list[str]
    colors: list[tuple[int, int, int]] | None
    ignore_index: int = IGNORE_INDEX
    ignore_color: tuple[int, int, int] | None = None


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """The VOC colour map generalised to any number of classes (bits of the id spread over R, G, B)."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def read_class_file(root: str | os.PathLike) -> ClassSpec:
    """Reads ``classes.yaml``, ``classes.yml`` or ``classes.txt`` from a folder dataset.

    Raises:
        DataError: no class file, two of them, or one that breaks the format.
    """
    root = Path(root)
    found = [root / name for name in CLASS_FILES if (root / name).is_file()]
    if not found:
        raise DataError(f"{root}: no class list; write classes.yaml or classes.txt (class names in id order)")
    if len(found) > 1:
        raise DataError(f"{root}: both {found[0].name} and {found[1].name}; keep one class list")
    path = found[0]
    spec = _read_yaml(path) if path.suffix in (".yaml", ".yml") else _read_txt(path)
    _check_spec(spec, path)
    return spec


def _read_yaml(path: Path) -> ClassSpec:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or "classes" not in data:
        raise DataError(f"{path}: expected a mapping with a 'classes' list, e.g. 'classes: [background, cat]'")
    unknown = set(data) - _YAML_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: {', '.join(sorted(_YAML_KEYS))}")
    classes = data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes):
        raise DataError(f"{path}: 'classes' must be a list of non-empty names")
    colors = data.get("colors")
    if colors is not None:
        colors = [_rgb(c, path, f"colour of class {i}") for i, c in enumerate(_as_list(colors, path, "colors"))]
    ignore_index = data.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or not 0 <= ignore_index <= 65535:
        raise DataError(f"{path}: 'ignore_index' must be an integer in 0..65535, not {ignore_index!r}")
    ignore_color = data.get("ignore_color")
    if ignore_color is not None:
        ignore_color = _rgb(ignore_color, path, "ignore_color")
    return ClassSpec([c.strip() for c in classes], colors, ignore_index, ignore_color)


def _read_txt(path: Path) -> ClassSpec:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    names, colors = [], []
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) >= 4 and all(f.isdigit() for f in fields[-3:]):
            names.append(" ".join(fields[:-3]))
            colors.append(_rgb([int(f) for f in fields[-3:]], path, f"line {number}"))
        else:
            names.append(line)
            colors.append(None)
    if any(c is None for c in colors) and any(c is not None for c in colors):
        raise DataError(f"{path}: give 'name R G B' on every line or on none (some lines have a colour, some not)")
    return ClassSpec(names, None if not colors or colors[0] is None else colors)


def _as_list(value: Any, path: Path, key: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{path}: '{key}' must be a list")
    return value


def _rgb(value: Any, path: Path, what: str) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise DataError(f"{path}: {what} must be three integers 0..255 (R, G, B), not {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_spec(spec: ClassSpec, path: Path) -> None:
    n = len(spec.classes)
    if n == 0:
        raise DataError(f"{path}: the class list is empty")
    if n > IGNORE_INDEX:
        raise DataError(f"{path}: {n} classes; at most {IGNORE_INDEX} fit, since {IGNORE_INDEX} is the void label")
    duplicates = sorted({c for c in spec.classes if spec.classes.count(c) > 1})
    if duplicates:
        raise DataError(f"{path}: class name(s) listed twice: {', '.join(duplicates)}")
    if spec.colors is not None:
        if len(spec.colors) != n:
            raise DataError(f"{path}: {n} classes but {len(spec.colors)} colours")
        if len(set(spec.colors)) != n:
            raise DataError(f"{path}: two classes share a colour, so colour masks would be ambiguous")
        if spec.ignore_color is not None and spec.ignore_color in spec.colors:
            raise DataError(f"{path}: ignore_color {spec.ignore_color} is also a class colour")
    if spec.ignore_index < n:
        raise DataError(f"{path}: ignore_index {spec.ignore_index} is a class id (there are {n} classes); use {IGNORE_INDEX}")
