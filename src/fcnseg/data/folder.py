"""Your own data as a folder of images, masks and a class list.

Layout::

    DIR/
      images/        photos: .jpg .jpeg .png .bmp .tif .tiff .webp
      masks/         one mask per image, same file stem: .png .bmp .tif .tiff .gif
      classes.yaml   class names in id order (or classes.txt, below)
      train.txt      optional: stems of the training pairs, one per line
      val.txt        optional: stems of the validation pairs (any other NAME.txt is split NAME)

``classes.yaml``::

    classes: [background, cat, dog]       # required: names, id 0 first (at most 255 classes)
    colors: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]   # optional: one RGB per class
    ignore_index: 255                     # optional: void id in index masks (default 255)
    ignore_color: [255, 255, 255]         # optional: void colour in colour masks
    description: free text                # optional, not read

``classes.txt`` is the short form: one class per line, in id order, as ``name`` or ``name R G B``
(names may contain spaces; all lines with a colour or none); ``#`` starts a comment; the void id is 255 and there is no void
colour. Without colours, classes get the VOC colour map (extended bit-wise past 21 classes).

Masks are either index masks (8-bit grayscale or palette PNG, read as indices; 16-bit grayscale
also works) with one class id per pixel and ``ignore_index`` for void, or RGB colour masks whose
colours are the class colours (``ignore_color`` for void); without class colours, an RGB mask
whose three channels are equal is read as an index mask. Ids outside the class list are an
error when that mask is read; void becomes 255 whatever ``ignore_index`` says on disk.

Splits: ``DIR/<split>.txt`` when it exists (stems; a file extension is tolerated). When none of
train.txt, val.txt, test.txt, trainval.txt exists, "train" and "val" are made deterministically
from the sorted stems (every 5th, starting with the first, goes to val). "all" is every pair
unless ``all.txt`` exists. Writing train.txt/val.txt keeps the split fixed when files are added.

Problems seen while listing (an image without a mask, a mask without an image, two images with one
stem) are warnings: those files are skipped and one summary warning names them. Problems only
seen when reading a file (corrupt, wrong size, bad ids) raise `DataError` naming the file then.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fcnseg.constants import IMAGE_EXTENSIONS, MASK_EXTENSIONS
from fcnseg.data.base import PairTransform, SegmentationDataset, filter_small_images
from fcnseg.data.io import read_mask
from fcnseg.data.splits import read_split_file
from fcnseg.errors import DataError

CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt")
# Split lists whose presence turns the automatic train/val split off.
_SPLIT_NAMES = ("train", "val", "test", "trainval")
_YAML_KEYS = {"classes", "colors", "ignore_index", "ignore_color", "description"}


@dataclass
class ClassSpec:
    """What a class file says: names, colours (None if not given), void id and void colour."""

    classes: list[str]
    colors: list[tuple[int, int, int]] | None
    ignore_index: int = 255
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
    ignore_index = data.get("ignore_index", 255)
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
    if n > 255:
        raise DataError(f"{path}: {n} classes; at most 255 fit, since 255 is the void label")
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
        raise DataError(f"{path}: ignore_index {spec.ignore_index} is a class id (there are {n} classes); use 255")


def _list_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions:
            by_stem.setdefault(path.stem, []).append(path)
    return by_stem


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class FolderDataset(SegmentationDataset):
    """A folder dataset: ``images/``, ``masks/``, a class list and optional split lists.

    See the module docstring (and docs/DATASETS.md) for the format.

    Args:
        root: the dataset folder.
        split: "train", "val", "all", or any NAME with a ``NAME.txt`` list in ``root``.
        transforms: paired callable ``transforms(image, mask) -> (image, mask)``.
        drop_smaller_than: (height, width); leave out images smaller than this in either side
            (for the d2l preset, which crops without padding).

    Attributes:
        skipped: files left out while listing, by reason.
        dropped: stems left out by ``drop_smaller_than``.

    Raises:
        DataError: missing folders or class list, no pairs, an empty split, or a split file naming
            a stem without an image or a mask.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: PairTransform | None = None,
        drop_smaller_than: tuple[int, int] | None = None,
    ) -> None:
        root = Path(root)
        for sub in ("images", "masks"):
            if not (root / sub).is_dir():
                raise DataError(f"{root}: no {sub}/ folder; a folder dataset has images/, masks/ and classes.yaml")
        spec = read_class_file(root)
        images = _list_files(root / "images", IMAGE_EXTENSIONS)
        masks = _list_files(root / "masks", MASK_EXTENSIONS)
        self.skipped = {
            "image without mask": sorted(s for s in images if s not in masks),
            "mask without image": sorted(s for s in masks if s not in images),
            "several images with one stem": sorted(s for s in images if len(images[s]) > 1),
            "several masks with one stem": sorted(s for s in masks if len(masks[s]) > 1),
        }
        bad = {s for names in self.skipped.values() for s in names}
        pairs = {s: (images[s][0], masks[s][0]) for s in sorted(images) if s in masks and s not in bad}
        if any(self.skipped.values()):
            summary = "; ".join(f"{len(v)} {k} ({_shown(v)})" for k, v in self.skipped.items() if v)
            warnings.warn(f"folder dataset {root}: skipped {summary}", stacklevel=2)
        if not pairs:
            raise DataError(f"{root}: no image/mask pairs (images/ and masks/ need files with matching stems)")
        stems = self._split_stems(root, split, pairs, images, masks)
        if not stems:
            raise DataError(f"{root}: split {split!r} is empty ({len(pairs)} pairs in all); write {split}.txt to choose its files")
        image_paths, mask_paths = [pairs[s][0] for s in stems], [pairs[s][1] for s in stems]
        self.dropped: list[str] = []
        if drop_smaller_than is not None:
            image_paths, mask_paths, self.dropped = filter_small_images(
                image_paths, mask_paths, drop_smaller_than, f"split {split!r} of {root}")
        super().__init__(image_paths, mask_paths, spec.classes, spec.colors or default_palette(len(spec.classes)),
                         transforms)
        self.root = root
        self.split = split
        self.mask_colors = spec.colors
        self.void_id = spec.ignore_index
        self.void_color = spec.ignore_color

    @staticmethod
    def _split_stems(root: Path, split: str, pairs: dict, images: dict, masks: dict) -> list[str]:
        split_file = root / f"{split}.txt"
        if split_file.is_file():
            stems = []
            for entry in read_split_file(split_file):
                stem = Path(entry).stem if Path(entry).suffix.lower() in IMAGE_EXTENSIONS + MASK_EXTENSIONS else entry
                if stem not in pairs:
                    problem = ("has no image in images/" if stem not in images else "has no mask in masks/"
                               if stem not in masks else "has more than one image or mask with that stem")
                    raise DataError(f"{split_file} names {entry!r}, which {problem}")
                stems.append(stem)
            return stems
        ordered = sorted(pairs)
        if split == "all":
            return ordered
        listed = [f"{name}.txt" for name in _SPLIT_NAMES if (root / f"{name}.txt").is_file()]
        if listed:
            raise DataError(f"{root}: no {split}.txt, but split files exist ({', '.join(listed)}); "
                            "write the missing one or remove them all for an automatic split")
        if split in ("train", "val"):
            return [s for i, s in enumerate(ordered) if (i % 5 == 0) == (split == "val")]
        raise DataError(f"{root}: no {split}.txt; without split files only 'train', 'val' and 'all' exist")

    def read_mask(self, index: int) -> torch.Tensor:
        return read_mask(self.mask_paths[index], num_classes=self.num_classes, void_id=self.void_id,
                         colors=self.mask_colors, void_colors=[self.void_color] if self.void_color else [])
