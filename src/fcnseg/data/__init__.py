"""Datasets, paired transforms and collation for semantic segmentation.

Every dataset is a ``torch.utils.data.Dataset`` of (image, target) pairs with ``classes``,
``colors``, ``ignore_index`` (always 255), ``image_paths``, ``mask_paths`` and ``read_pair(i)``;
`build_dataset` picks one by name.
"""
from __future__ import annotations

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.base import SegmentationDataset
from fcnseg.data.camvid import CAMVID_CLASSES, CAMVID_COLORS, CamVid
from fcnseg.data.classes import default_palette, read_class_file
from fcnseg.data.collate import pad_collate
from fcnseg.data.folder import FolderDataset
from fcnseg.data.io import max_image_pixels, read_image, read_mask, set_max_image_pixels
from fcnseg.data.registry import DATASETS, build_dataset, list_datasets
from fcnseg.data.synthetic import make_synthetic
from fcnseg.data.transforms import d2l_transforms, eval_transforms, train_transforms
from fcnseg.data.voc import VOC_CLASSES, VOC_COLORMAP, VOCSegmentation

__all__ = [
    "DATASETS", "build_dataset", "list_datasets", "SegmentationDataset", "VOCSegmentation", "CamVid", "FolderDataset",
    "VOC_CLASSES", "VOC_COLORMAP", "CAMVID_CLASSES", "CAMVID_COLORS", "IGNORE_INDEX", "pad_collate",
    "train_transforms", "eval_transforms", "d2l_transforms", "make_synthetic", "read_image", "read_mask",
    "read_class_file", "default_palette", "max_image_pixels", "set_max_image_pixels",
]
