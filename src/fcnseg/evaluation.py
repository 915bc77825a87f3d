"""Evaluating a checkpoint on a dataset split with whole images (not random crops)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fcnseg.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.engine import evaluate, resolve_amp_dtype
from fcnseg.errors import FcnsegError
from fcnseg.loaders import size_grouped_batches
from fcnseg.metrics import ConfusionMatrix, SegmentationMetrics
from fcnseg.models.inference_form import inference_form


@dataclass
class EvaluationReport:
    metrics: SegmentationMetrics
    confusion: ConfusionMatrix
    classes: list[str]
    num_images: int
    val_loss: float
    mode: str
    flip: bool = False
    seconds: float = 0.0  # wall time of the prediction loop (data loading included, model loading not)

    def as_dict(self) -> dict[str, Any]:
        result = self.metrics.as_dict(self.classes)
        result.update({"num_images": self.num_images, "val_loss": self.val_loss, "mode": self.mode, "flip": self.flip,
                       "seconds": round(self.seconds, 2),
                       "note": "void pixels excluded; classes absent from truth and prediction are null "
                               "and left out of the means"})
        return result


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    dataset_name: str,
    root: str | Path,
    split: str = "val",
    *,
    mode: str = "whole",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    flip: bool = False,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: str = "none",
    workers: int = 0,
    max_images: int | None = None,
) -> EvaluationReport:
    """Whole-image metrics of a checkpoint on a split (void excluded), batched by image size.

    Args:
        mode: "whole" (pad to a multiple of 32, one pass, crop back) or "sliding" (windows of
            ``window``, stride ``stride``, logits averaged where they overlap).
        flip: average with the horizontally flipped prediction.
    """
    from fcnseg.data import build_dataset
    from fcnseg.data.transforms import eval_transforms
    from fcnseg.inference import predict_sliding, predict_whole
    from fcnseg.training import image_sizes

    device = torch.device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    model = inference_form(model_from_checkpoint(checkpoint), copy_model=False).to(device)
    dataset = build_dataset(dataset_name, root, split, transforms=eval_transforms(mean=tuple(checkpoint["mean"]), std=tuple(checkpoint["std"])))
    if list(dataset.classes) != list(checkpoint["classes"]):
        raise FcnsegError(
            f"the checkpoint predicts {len(checkpoint['classes'])} classes ({', '.join(checkpoint['classes'][:4])}, ...) "
            f"but {dataset_name} at {root} has {len(dataset.classes)} ({', '.join(dataset.classes[:4])}, ...)"
        )
    if max_images:
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    if mode == "sliding":
        window = window or tuple(checkpoint.get("config", {}).get("crop") or (320, 480))
        predict = lambda m, x: predict_sliding(m, x, window=window, stride=stride, flip=flip)  # noqa: E731
    else:
        predict = lambda m, x: predict_whole(m, x, flip=flip)  # noqa: E731
    batches = size_grouped_batches(image_sizes(dataset), batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    metrics, matrix, loss = evaluate(model, tqdm(loader, desc=f"eval {split}", unit="batch"), len(checkpoint["classes"]),
                                     device=device, predict=predict, amp_dtype=resolve_amp_dtype(amp, device))
    return EvaluationReport(metrics, matrix, list(checkpoint["classes"]), len(dataset), loss, mode,
                            flip=flip, seconds=time.perf_counter() - started)


def write_report(report: EvaluationReport, path: str | Path) -> Path:
    """Writes the JSON report and a confusion-matrix PNG beside it."""
    from fcnseg.visualize import plot_confusion_matrix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2))
    plot_confusion_matrix(report.confusion.matrix.cpu().numpy(), report.classes, path.with_suffix(".confusion.png"))
    return path
