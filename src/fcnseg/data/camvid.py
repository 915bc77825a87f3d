"""CamVid road scenes in the SegNet tutorial layout (11 classes, 360x480)."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from fcnseg.data.base import PairTransform, SegmentationDataset, filter_small_images
from fcnseg.data.io import read_mask
from fcnseg.data.splits import read_split_file
from fcnseg.errors import DataError

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]
# The SegNet tutorial's palette (Scripts/test_segmentation_camvid.py), without its Unlabelled (0, 0, 0).
CAMVID_COLORS = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
CAMVID_VOID_ID = 11  # "Unlabelled" in the SegNet masks; read as 255
CAMVID_SPLITS = ("train", "val", "test")


class CamVid(SegmentationDataset):
    """CamVid as distributed with SegNet: ``{split}.txt`` lists of ``image_path mask_path`` pairs.

    The lists in the original distribution hold absolute paths such as
    ``/SegNet/CamVid/train/0001TP_006690.png``; each path is resolved under ``root`` by its last two
    components (``train/0001TP_006690.png``), so both those and relative lists work.

    Args:
        root: the folder holding ``train.txt``, ``train/``, ``trainannot/``... (or its parent, if
            the folder is named ``CamVid``).
        split: "train" (367 images), "val" (101) or "test" (233).
        transforms: paired callable ``transforms(image, mask) -> (image, mask)``.
        drop_smaller_than: (height, width); leave out smaller images (all CamVid images are 360x480).

    Masks are 8-bit index images with ids 0-10 and 11 = Unlabelled, which is read as 255.

    Raises:
        DataError: the split file is missing, empty, malformed or names a missing file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: PairTransform | None = None,
        drop_smaller_than: tuple[int, int] | None = None,
    ) -> None:
        if split not in CAMVID_SPLITS:
            raise DataError(f"CamVid split must be one of {', '.join(CAMVID_SPLITS)}, not {split!r}")
        root = Path(root)
        if not (root / f"{split}.txt").is_file() and (root / "CamVid" / f"{split}.txt").is_file():
            root = root / "CamVid"
        split_file = root / f"{split}.txt"
        image_paths, mask_paths = [], []
        for number, line in enumerate(read_split_file(split_file), start=1):
            fields = line.split()
            if len(fields) != 2:
                raise DataError(f"{split_file}, entry {number}: expected 'image_path mask_path', got {line!r}")
            image_paths.append(_under_root(root, fields[0]))
            mask_paths.append(_under_root(root, fields[1]))
        for paths in (image_paths, mask_paths):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"{split_file} names {len(missing)} file(s) that do not exist, first {missing[0]}")
        self.dropped: list[str] = []
        if drop_smaller_than is not None:
            image_paths, mask_paths, self.dropped = filter_small_images(image_paths, mask_paths, drop_smaller_than, split_file)
        super().__init__(image_paths, mask_paths, CAMVID_CLASSES, CAMVID_COLORS, transforms)
        self.root = root
        self.split = split

    def read_mask(self, index: int) -> torch.Tensor:
        return read_mask(self.mask_paths[index], num_classes=len(CAMVID_CLASSES), void_id=CAMVID_VOID_ID)


def _under_root(root: Path, listed: str) -> Path:
    # Lists written on Windows use backslashes; the last two components are folder/file either way.
    parts = (PureWindowsPath(listed) if "\\" in listed else PurePosixPath(listed)).parts
    return root.joinpath(*parts[-2:])
