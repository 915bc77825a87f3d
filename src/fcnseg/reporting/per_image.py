"""A checkpoint on the images of a split, one at a time: each image's own IoU, and their sum.

The report shows where a model fails, image by image, so each image is predicted alone (by
`Segmenter`, whole-image, as ``fcnseg predict`` and ``fcnseg eval`` predict) and scored with its own
confusion matrix; the matrices add up to the one of all the evaluated images, from which the
report's confusion matrix and per-class IoU come (void pixels excluded, as everywhere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from fcnseg.data.base import SegmentationDataset
from fcnseg.inference.segmenter import Segmenter
from fcnseg.metrics import ConfusionMatrix, SegmentationMetrics


@dataclass
class ImageResult:
    """One evaluated image.

    Attributes:
        index: its position in the split.
        name: its file name.
        metrics: the metrics of this image alone (``miou`` over the classes in its truth or prediction).
        panels: whatever ``keep`` made of ``(image, pred, target)`` (the report keeps small pictures).
    """

    index: int
    name: str
    metrics: SegmentationMetrics
    panels: object

    @property
    def sort_key(self) -> tuple[bool, float]:
        """Worst first; images without a labelled pixel (no IoU) last."""
        miou = self.metrics.miou
        return (math.isnan(miou), miou if not math.isnan(miou) else 0.0)


def evaluate_images(
    segmenter: Segmenter,
    dataset: SegmentationDataset,
    indices: Sequence[int],
    keep: Callable[[np.ndarray, np.ndarray, np.ndarray], object],
    progress: Callable[[Sequence[int]], Sequence[int]] = lambda items: items,
) -> tuple[list[ImageResult], ConfusionMatrix]:
    """Predicts and scores each image of ``dataset`` at ``indices``.

    Args:
        segmenter: the model (its mode, flip and precision as set).
        dataset: raw pairs (no transforms): `SegmentationDataset.read_pair` is read.
        indices: the images to evaluate, in order.
        keep: ``keep(image (H,W,3) uint8, pred (H,W) int64, target (H,W) int64 with void 255)``; its
            result is stored in `ImageResult.panels` (so full-size images need not stay in memory).
        progress: wraps the indices (e.g. a progress bar).

    Returns:
        The results in dataset order, and the confusion matrix of all of them.

    Raises:
        DataError: an image or mask cannot be read.
    """
    total = ConfusionMatrix(segmenter.num_classes, segmenter.ignore_index)
    results = []
    for index in progress(indices):
        image, target = dataset.read_pair(index)
        pred = segmenter.predict(image)
        own = ConfusionMatrix(segmenter.num_classes, segmenter.ignore_index)
        own.update(torch.from_numpy(pred), target)
        total.matrix += own.matrix
        rgb = image.permute(1, 2, 0).numpy()
        results.append(ImageResult(index, dataset.image_paths[index].name, own.compute(),
                                   keep(rgb, pred, target.numpy())))
    return results, total
