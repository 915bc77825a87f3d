"""Datasets by name: the read-only registry behind `build_dataset` and ``fcnseg train --dataset``."""
from __future__ import annotations

import inspect
import os
from types import MappingProxyType
from typing import Any, Mapping

from fcnseg.data.base import PairTransform, SegmentationDataset
from fcnseg.data.camvid import CamVid
from fcnseg.data.folder import FolderDataset
from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import DataError

# Read-only: names are what configs and checkpoints store, so code outside cannot rebind them.
DATASET_CLASSES: Mapping[str, type[SegmentationDataset]] = MappingProxyType({
    "voc2012": VOCSegmentation,
    "camvid": CamVid,
    "folder": FolderDataset,  # also what `make_synthetic` writes
})
DATASETS: tuple[str, ...] = tuple(DATASET_CLASSES)


def list_datasets() -> list[str]:
    """Names accepted by `build_dataset`."""
    return list(DATASETS)


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
    if name not in DATASET_CLASSES:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    cls = DATASET_CLASSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root", "split", "transforms")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
                        f"it accepts {', '.join(accepted) if accepted else 'none'}")
    return cls(root, split=split, transforms=transforms, **options)
