"""How far a score map's stride alone limits each class's IoU: the oracle bound of an FCN's last upsampling.

A diagnostic for CamVid's Pole, outside every recipe's choice. For each mask of a split it builds the
best score map a stride-s head could hold without knowing more than each s x s cell's contents (each
class's share of the cell's labelled pixels, an area average), upsamples it bilinearly to the
image (as the FCN's bilinear-initialised last layer does), takes the argmax and scores it against
the mask. Whatever a model learns, a linear score map at stride s followed by a bilinear
upsampling cannot beat this by much; a class far below 1 here is limited by resolution.

    python experiments/score_resolution.py --split train --strides 1 2 4 8
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from repo_paths import shared_data_dir

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data import build_dataset
from fcnseg.metrics import ConfusionMatrix


def oracle_prediction(mask: torch.Tensor, num_classes: int, stride: int) -> torch.Tensor:
    """The argmax of the bilinearly upsampled per-cell class shares of ``mask`` (H, W) at ``stride``."""
    labelled = mask != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(labelled, mask, 0), num_classes).permute(2, 0, 1).float() * labelled
    height, width = mask.shape
    pad = (0, -width % stride, 0, -height % stride)
    cells = F.avg_pool2d(F.pad(one_hot, pad)[None], stride)
    scores = F.interpolate(cells, scale_factor=stride, mode="bilinear", align_corners=False)
    return scores[0, :, :height, :width].argmax(0)


def bound(dataset: torch.utils.data.Dataset, strides: list[int]) -> dict[int, ConfusionMatrix]:
    """One confusion matrix per stride over every mask of ``dataset``."""
    num_classes = len(dataset.classes)
    matrices = {stride: ConfusionMatrix(num_classes) for stride in strides}
    for index in range(len(dataset)):
        mask = dataset[index][1]
        for stride, matrix in matrices.items():
            matrix.update(oracle_prediction(mask, num_classes, stride), mask)
    return matrices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="train", help="CamVid split whose masks are read (default: train)")
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    dataset = build_dataset("camvid", shared_data_dir() / "camvid", args.split)
    matrices = bound(dataset, args.strides)
    print("| stride | mIoU | " + " | ".join(dataset.classes) + " |")
    print("|---:|---:|" + "---:|" * len(dataset.classes))
    for stride, matrix in matrices.items():
        metrics = matrix.compute()
        cells = " | ".join("-" if value is None else f"{100 * value:.1f}" for value in metrics.per_class_iou)
        print(f"| {stride} | {100 * metrics.miou:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
