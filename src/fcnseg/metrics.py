"""The FCN paper's four metrics from one confusion matrix, ignoring the void label.

pixel accuracy = sum_i n_ii / sum_i t_i
mean accuracy  = mean_i n_ii / t_i
mean IoU       = mean_i n_ii / (t_i + sum_j n_ji - n_ii)
fw IoU         = sum_i t_i * IoU_i / sum_i t_i
where n_ij counts pixels of true class i predicted as j and t_i = sum_j n_ij. Classes absent from
both the truth and the prediction have no defined IoU: they are left out of the means (and reported
as None), not counted as 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fcnseg.constants import IGNORE_INDEX


@dataclass
class SegmentationMetrics:
    """Metrics of one confusion matrix; per-class values are None for absent classes."""

    pixel_acc: float
    mean_acc: float
    miou: float
    fwiou: float
    per_class_iou: list[float | None]
    per_class_acc: list[float | None]
    num_pixels: int
    absent_classes: list[int]

    def as_dict(self, classes: list[str] | None = None) -> dict:
        names = classes or [str(i) for i in range(len(self.per_class_iou))]
        return {
            "pixel_acc": self.pixel_acc,
            "mean_acc": self.mean_acc,
            "miou": self.miou,
            "fwiou": self.fwiou,
            "per_class_iou": dict(zip(names, self.per_class_iou)),
            "per_class_acc": dict(zip(names, self.per_class_acc)),
            "num_pixels": self.num_pixels,
            "absent_classes": [names[i] for i in self.absent_classes],
        }


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix (rows: truth, columns: prediction) on any device.

    Args:
        num_classes: C.
        ignore_index: truth value to skip (VOC's border, CamVid's void).
        device: where the matrix lives; defaults to the first update's device.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch: ``pred`` and ``target`` are integer tensors of the same shape.

        Raises:
            ValueError: shapes differ, or a target outside [0, C) other than ``ignore_index``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if self.matrix.device != target.device:
            self.matrix = self.matrix.to(target.device)
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target values must be in [0, {self.num_classes}) or {self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted values must be in [0, {self.num_classes})")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> None:
        """Sums the matrix over torch.distributed ranks (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> SegmentationMetrics:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: torch.Tensor) -> SegmentationMetrics:
    """The four FCN metrics and per-class IoU/accuracy of a (C, C) confusion matrix."""
    m = matrix.detach().double().cpu()
    diag = m.diagonal()
    truth = m.sum(1)
    predicted = m.sum(0)
    union = truth + predicted - diag
    total = truth.sum()
    present = union > 0
    iou = torch.where(present, diag / union.clamp(min=1), torch.zeros_like(diag))
    has_truth = truth > 0
    acc = torch.where(has_truth, diag / truth.clamp(min=1), torch.zeros_like(diag))
    mean = lambda values, mask: float(values[mask].mean()) if mask.any() else float("nan")  # noqa: E731
    return SegmentationMetrics(
        pixel_acc=float(diag.sum() / total) if total > 0 else float("nan"),
        mean_acc=mean(acc, has_truth),
        miou=mean(iou, present),
        fwiou=float((truth * iou).sum() / total) if total > 0 else float("nan"),
        per_class_iou=[float(v) if p else None for v, p in zip(iou, present)],
        per_class_acc=[float(v) if p else None for v, p in zip(acc, has_truth)],
        num_pixels=int(total),
        absent_classes=[i for i, p in enumerate(present.tolist()) if not p],
    )


def format_metrics_table(metrics: SegmentationMetrics, classes: list[str]) -> str:
    """A plain-text table of the summary metrics and per-class IoU, for the terminal."""
    lines = [
        f"pixel acc {metrics.pixel_acc:.4f}   mean acc {metrics.mean_acc:.4f}   "
        f"mIoU {metrics.miou:.4f}   fwIoU {metrics.fwiou:.4f}   ({metrics.num_pixels} pixels, void excluded)",
        f"{'class':<20s} {'IoU':>8s} {'acc':>8s}",
    ]
    for name, iou, acc in zip(classes, metrics.per_class_iou, metrics.per_class_acc):
        lines.append(f"{name:<20s} {'-' if iou is None else f'{iou:.4f}':>8s} {'-' if acc is None else f'{acc:.4f}':>8s}")
    if metrics.absent_classes:
        names = ", ".join(classes[i] for i in metrics.absent_classes)
        lines.append(f"absent from truth and prediction (excluded from means): {names}")
    return "\n".join(lines)
