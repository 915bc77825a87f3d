"""Datasets, paired transforms and collation for semantic segmentation.

Every dataset is a ``torch.utils.data.Dataset`` of (image, target) pairs with ``classes``,
``colors``, ``ignore_index`` (always 255), ``image_paths``, ``mask_paths`` and ``read_pair(i)``;
`build_dataset` picks one by name.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.base import PairTransform, SegmentationDataset
from fcnseg.data.camvid import CAMVID_CLASSES, CAMVID_COLORS, CamVid
from fcnseg.data.classes import default_palette, read_class_file
from fcnseg.data.collate import pad_collate
from fcnseg.data.folder import FolderDataset
from fcnseg.data.io import read_image, read_mask
from fcnseg.data.synthetic import make_synthetic
from fcnseg.data.transforms import d2l_transforms, eval_transforms, train_transforms
from fcnseg.data.voc import VOC_CLASSES, VOC_COLORMAP, VOCSegmentation
from fcnseg.errors import DataError

_BUILDERS: dict[str, type[SegmentationDataset]] = {
    "voc2012": VOCSegmentation,
    "camvid": CamVid,
    "folder": FolderDataset,  # also what `make_synthetic` writes
}
DATASETS = list(_BUILDERS)


def build_dataset(name: str, root: str | os.PathLike, split: str, transforms: PairTransform | None = None,
                  **options: Any) -> SegmentationDataset:
    """Builds a dataset by name.

    Args:
        name: one of `DATASETS`: "voc2012", "camvid", "folder".
        root: the dataset's folder (see each class).
        split: "train", "val", ... as the dataset defines them.
        transforms: paired callable ``transforms(image, mask) -> (image, mask)``; None gives the raw
            uint8 image (3, H, W) and int64 target (H, W).
        **options: dataset-specific keywords, e.g. ``download``, ``border_as_background``,
            ``drop_smaller_than`` for "voc2012".

    Raises:
        DataError: unknown name or option, or the dataset's own checks fail.
    """
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    cls = _BUILDERS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split", "transforms")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
                        f"it accepts {', '.join(accepted) if accepted else 'none'}")
    return cls(root, split=split, transforms=transforms, **options)


__all__ = [
    "DATASETS", "build_dataset", "SegmentationDataset", "VOCSegmentation", "CamVid", "FolderDataset",
    "VOC_CLASSES", "VOC_COLORMAP", "CAMVID_CLASSES", "CAMVID_COLORS", "IGNORE_INDEX", "pad_collate",
    "train_transforms", "eval_transforms", "d2l_transforms", "make_synthetic", "read_image", "read_mask",
    "read_class_file", "default_palette",
]
