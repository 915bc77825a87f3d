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
stem) are warnings: those files are skipped and one summary warning names them. Broken or looping
symbolic links in images/ or masks/ are skipped with one warning per folder naming them. Problems only
seen when reading a file (corrupt, wrong size, bad ids) raise `DataError` naming the file then.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fcnseg.constants import IMAGE_EXTENSIONS, MASK_EXTENSIONS
from fcnseg.data.base import PairTransform, SegmentationDataset, filter_small_images
from fcnseg.data.classes import default_palette, read_class_file
from fcnseg.data.io import folder_entries, read_mask
from fcnseg.data.splits import read_split_file
from fcnseg.errors import DataError

# Split lists whose presence turns the automatic train/val split off.
_SPLIT_NAMES = ("train", "val", "test", "trainval")


def _list_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """Files of a folder by stem; broken or looping symbolic links are named in one warning."""
    by_stem: dict[str, list[Path]] = {}
    for path in folder_entries(folder):
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
