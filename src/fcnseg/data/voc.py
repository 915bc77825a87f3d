"""PASCAL VOC2012 segmentation: class names, colour map and the dataset reader."""
from __future__ import annotations

import os

import torch

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.base import PairTransform, SegmentationDataset, filter_small_images
from fcnseg.data.download import download_voc2012, find_voc2012
from fcnseg.data.io import read_mask
from fcnseg.data.splits import read_split_file
from fcnseg.errors import DataError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
# The colour map of the VOC palette PNGs (and of d2l's `VOC_COLORMAP`), index = class id.
VOC_COLORMAP = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
]
# Palette entry 255 of the VOC PNGs: the void border around objects, seen in RGB copies of the masks.
VOC_VOID_COLOR = (224, 224, 192)
VOC_SPLITS = ("train", "val", "trainval")


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC2012 semantic segmentation (21 classes, void border = 255).

    Args:
        root: the folder containing ``VOCdevkit/`` (or ``VOCdevkit/`` or ``VOCdevkit/VOC2012/`` itself).
        split: "train" (1464 images), "val" (1449) or "trainval".
        transforms: paired callable ``transforms(image, mask) -> (image, mask)``.
        download: fetch and extract the official archive into ``root`` when it is not there.
        border_as_background: map the void border to background (0), as the d2l chapter does by
            reading colour masks; by default it stays 255 and is ignored by the loss and metrics.
        drop_smaller_than: (height, width); leave out images smaller than this in either side, the
            chapter's filter for random crops without padding (keeps 1114 of 1464 train images at 320x480).
            Reads every image header once, at construction.

    Masks may be the official palette PNGs (read as indices) or RGB images in `VOC_COLORMAP`,
    with `VOC_VOID_COLOR` as void.

    Raises:
        DataError: the dataset is missing, the split file is empty or names a missing file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: PairTransform | None = None,
        download: bool = False,
        border_as_background: bool = False,
        drop_smaller_than: tuple[int, int] | None = None,
    ) -> None:
        if split not in VOC_SPLITS:
            raise DataError(f"VOC2012 split must be one of {', '.join(VOC_SPLITS)}, not {split!r}")
        base = find_voc2012(root)
        if base is None and download:
            base = download_voc2012(root)
        if base is None:
            raise DataError(f"no VOC2012 dataset under {root} (looked for VOCdevkit/VOC2012/ImageSets/Segmentation); "
                            f"run `fcnseg download voc2012 --root {root}` or pass download=True")
        split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = read_split_file(split_file)
        image_paths = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        mask_paths = [base / "SegmentationClass" / f"{i}.png" for i in ids]
        for kind, paths in (("image", image_paths), ("mask", mask_paths)):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"{split_file} names {len(missing)} {kind}(s) that do not exist, first {missing[0]}")
        self.dropped: list[str] = []
        if drop_smaller_than is not None:
            image_paths, mask_paths, self.dropped = filter_small_images(image_paths, mask_paths, drop_smaller_than, split_file)
        super().__init__(image_paths, mask_paths, VOC_CLASSES, VOC_COLORMAP, transforms)
        self.root = base
        self.split = split
        self.border_as_background = border_as_background

    def read_mask(self, index: int) -> torch.Tensor:
        mask = read_mask(self.mask_paths[index], num_classes=len(VOC_CLASSES), colors=VOC_COLORMAP,
                         void_colors=[VOC_VOID_COLOR])
        if self.border_as_background:
            mask[mask == IGNORE_INDEX] = 0
        return mask
