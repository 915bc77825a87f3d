"""The behaviour every fcnseg dataset shares: lazy (image, mask) pairs and the class metadata."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.io import check_same_size, image_size, read_image, read_mask
from fcnseg.errors import DataError

PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(Dataset):
    """Image/mask pairs read from disk on demand.

    Construction only lists paths, so a dataset is cheap to build and to pickle into DataLoader
    workers; pixels are decoded in ``__getitem__``.

    Attributes:
        classes: class names, index = class id.
        colors: one RGB triple per class (for drawing predictions).
        ignore_index: always 255; each dataset maps its own void id to it when reading.
        image_paths, mask_paths: the pairs, in dataset order.
        transforms: paired callable ``transforms(image, mask) -> (image, mask)``, or None.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        image_paths: Sequence[Path],
        mask_paths: Sequence[Path],
        classes: Sequence[str],
        colors: Sequence[Sequence[int]],
        transforms: PairTransform | None = None,
    ) -> None:
        if len(image_paths) != len(mask_paths):
            raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks")
        if len(classes) != len(colors):
            raise ValueError(f"{len(classes)} class names but {len(colors)} colours")
        self.image_paths = [Path(p) for p in image_paths]
        self.mask_paths = [Path(p) for p in mask_paths]
        self.classes = list(classes)
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair, without transforms.

        Returns:
            image uint8 (3, H, W) and target int64 (H, W) with void = 255.

        Raises:
            DataError: either file is unreadable or invalid, or their sizes differ.
        """
        image = read_image(self.image_paths[index])
        mask = self.read_mask(index)
        check_same_size(image, mask, self.image_paths[index], self.mask_paths[index])
        return image, mask

    def read_mask(self, index: int) -> torch.Tensor:
        """The mask of pair ``index`` as int64 (H, W) class ids with void = 255."""
        return read_mask(self.mask_paths[index], num_classes=self.num_classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.read_pair(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} pairs, {self.num_classes} classes)"


def filter_small_images(
    image_paths: Sequence[Path], mask_paths: Sequence[Path], min_size: tuple[int, int], source: object,
) -> tuple[list[Path], list[Path], list[str]]:
    """Leaves out pairs whose image is smaller than ``min_size`` (height, width) in either side.

    This is the d2l chapter's filter for random crops without padding. It reads each image's
    header (not its pixels) once.

    Args:
        image_paths, mask_paths: the pairs.
        min_size: (height, width).
        source: what the pairs came from, for the error message.

    Returns:
        kept image paths, kept mask paths, and the stems of the dropped images.

    Raises:
        DataError: every image is too small.
    """
    min_h, min_w = min_size
    kept_images, kept_masks, dropped = [], [], []
    for image_path, mask_path in zip(image_paths, mask_paths):
        h, w = image_size(image_path)
        if h >= min_h and w >= min_w:
            kept_images.append(Path(image_path))
            kept_masks.append(Path(mask_path))
        else:
            dropped.append(Path(image_path).stem)
    if not kept_images:
        raise DataError(f"all {len(dropped)} images of {source} are smaller than {min_h}x{min_w}; nothing left")
    return kept_images, kept_masks, dropped
