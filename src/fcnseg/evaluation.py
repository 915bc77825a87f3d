"""Whole-image evaluation: the metrics loop over a model, and a checkpoint on a dataset split."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fcnseg.constants import IGNORE_INDEX
from fcnseg.data.samplers import image_sizes, size_grouped_batches
from fcnseg.errors import UsageError
from fcnseg.metrics import ConfusionMatrix, SegmentationMetrics
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.models.inference_form import inference_form
from fcnseg.ops.argmax import class_map
from fcnseg.runtime import autocast_context, resolve_amp_dtype


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device,
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    reduce_across_ranks: bool = False,
) -> tuple[SegmentationMetrics, ConfusionMatrix, float]:
    """Metrics over whole images, from one confusion matrix (void excluded).

    Args:
        batches: ``(image (N,3,H,W), target (N,H,W))`` of whole images, equal sizes per batch.
        predict: ``predict(model, image) -> logits``; defaults to one forward pass.

    Returns:
        (metrics, confusion matrix, mean validation loss).
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for image, target in batches:
        image, target = image.to(device), target.to(device)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            logits = predict(model, image) if predict is not None else model(image)
        logits = logits.float()
        matrix.update(class_map(logits), target)
        labelled = (target != IGNORE_INDEX).sum()
        if labelled > 0:
            loss_sum += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            count += labelled
    if reduce_across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        matrix.all_reduce()
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(count)
    model.train(was_training)
    return matrix.compute(), matrix, float(loss_sum / count.clamp(min=1))


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
    border: str | None = None  # how VOC's void border was read (`border_policy`); None for other datasets
    scales: tuple[float, ...] = (1.0,)  # multi-scale test-time augmentation
    holdout: float = 0.0  # the images a run trained with this holdout held out of the split; 0: the whole split
    holdout_groups: str = ""  # with holdout: the regex that named the groups held out whole

    def as_dict(self) -> dict[str, Any]:
        result = self.metrics.as_dict(self.classes)
        result.update({"num_images": self.num_images, "val_loss": self.val_loss, "mode": self.mode, "flip": self.flip,
                       "scales": list(self.scales), "seconds": round(self.seconds, 2), **({"border": self.border} if self.border else {}),
                       **({"holdout": self.holdout} if self.holdout else {}),
                       **({"holdout_groups": self.holdout_groups} if self.holdout_groups else {}),
                       "note": "void pixels excluded; classes absent from truth and prediction are null "
                               "and left out of the means"})
        return result


BORDER_AS_TRAINED = {True: "border read as background, as in training",
                     False: "border void (ignored), as in training"}
BORDER_GIVEN = {True: "border read as background", False: "border void (ignored)"}


def border_policy(checkpoint: dict[str, Any], dataset_name: str, given: bool | None) -> tuple[bool, str | None]:
    """How to read VOC's void border for this checkpoint: as given, else as its training run read it.

    One checkpoint, one number: a run trained (and validated) with ``border_as_background`` (the d2l
    recipes, as the chapter) is evaluated the same way unless told otherwise.

    Returns:
        (read the border as background?, the sentence the report carries; None for datasets without
        a border class).
    """
    if dataset_name != "voc2012":
        return False, None
    if given is not None:
        return given, BORDER_GIVEN[given]
    config = checkpoint.get("config")
    trained = bool(config.get("border_as_background", False)) if isinstance(config, dict) else False
    return trained, BORDER_AS_TRAINED[trained]


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
    scales: tuple[float, ...] = (1.0,),
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    workers: int = 0,
    max_images: int | None = None,
    progress: bool = True,
    border_as_background: bool | None = None,
    holdout: float = 0.0,
    holdout_groups: str = "",
) -> EvaluationReport:
    """Whole-image metrics of a checkpoint on a split (void excluded), batched by image size.

    Args:
        mode: "whole" (pad to a multiple of 32, one pass, crop back) or "sliding" (windows of
            ``window``, stride ``stride``, logits averaged where they overlap).
        flip: average with the horizontally flipped prediction.
        scales: multi-scale test-time augmentation (`fcnseg.inference.windows.predict_scales`).
        progress: show progress (a bar on a terminal, plain lines in a log; `fcnseg.progress`).
        amp: mixed precision as ``--amp`` (`fcnseg.runtime.resolve_amp_dtype`): "auto" (the
            default, as for `Segmenter`) is bf16 where the hardware computes it natively, else
            float32; "none" for float32 everywhere.
        border_as_background: VOC's void border read as background (True) or ignored (False); None:
            as the checkpoint's training run read it (`border_policy`), said in the report's ``border``.
        holdout: evaluate only the images that ``fcnseg train --holdout F`` holds out of this split
            (`fcnseg.data.splits.holdout_split`), to score a run without reading the split it is
            reported on; 0: the whole split. ``max_images`` then takes the first of those. The split
            is listed as the run listed it (without the images smaller than its crop, if it dropped them).
        holdout_groups: with ``holdout``, the regular expression of ``fcnseg train --holdout-groups``:
            the held-out images are then whole groups (`fcnseg.data.splits.group_holdout_split`).
    """
    from fcnseg.data import build_dataset
    from fcnseg.data.splits import training_listing
    from fcnseg.data.transforms import eval_transforms
    from fcnseg.inference.windows import predict_scales, predict_sliding, predict_whole

    device = torch.device(device)
    checkpoint = load_checkpoint(checkpoint_path)
    model = inference_form(model_from_checkpoint(checkpoint), copy_model=False).to(device)
    as_background, border = border_policy(checkpoint, dataset_name, border_as_background)
    options = {"border_as_background": True} if as_background else {}
    if holdout:  # the holdout is taken from the split as the training run listed it
        config = checkpoint.get("config") or {}
        options.update(training_listing(bool(config.get("drop_small")), config.get("crop")))
    dataset = build_dataset(dataset_name, root, split, transforms=eval_transforms(mean=tuple(checkpoint["mean"]),
                            std=tuple(checkpoint["std"])), **options)
    if list(dataset.classes) != list(checkpoint["classes"]):
        raise UsageError(
            f"the checkpoint predicts {len(checkpoint['classes'])} classes ({', '.join(checkpoint['classes'][:4])}, ...) "
            f"but {dataset_name} at {root} has {len(dataset.classes)} ({', '.join(dataset.classes[:4])}, ...)"
        )
    dataset = _selected(dataset, holdout, max_images, holdout_groups)
    if mode == "sliding":
        window = window or tuple(checkpoint.get("config", {}).get("crop") or (320, 480))
        predict = lambda m, x: predict_sliding(m, x, window=window, stride=stride, flip=flip)  # noqa: E731
    else:
        predict = lambda m, x: predict_whole(m, x, flip=flip)  # noqa: E731
    if tuple(scales) != (1.0,):
        one_scale = predict
        predict = lambda m, x: predict_scales(lambda y: one_scale(m, y), x, scales)  # noqa: E731
    batches = size_grouped_batches(image_sizes(dataset), batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    from fcnseg.progress import progress_bar

    started = time.perf_counter()
    counted = progress_bar(loader, desc=f"eval {split}", unit="batch", disable=not progress)
    metrics, matrix, loss = evaluate(model, counted, len(checkpoint["classes"]),
                                     device=device, predict=predict, amp_dtype=resolve_amp_dtype(amp, device))
    return EvaluationReport(metrics, matrix, list(checkpoint["classes"]), len(dataset), loss, mode,
                            flip=flip, seconds=time.perf_counter() - started, border=border, scales=tuple(scales),
                            holdout=holdout, holdout_groups=holdout_groups if holdout else "")


def _selected(dataset: Any, holdout: float, max_images: int | None, holdout_groups: str = "") -> Any:
    """The held-out images of ``dataset`` (all of it for ``holdout`` 0), the first ``max_images`` of them;
    one Subset of the dataset itself, so that image sizes are still read from the file headers."""
    from fcnseg.data.splits import group_holdout_split, holdout_split, image_groups

    if holdout and holdout_groups:
        indices = group_holdout_split(image_groups(dataset, holdout_groups), holdout)[1]
    else:
        indices = holdout_split(len(dataset), holdout)[1] if holdout else list(range(len(dataset)))
    if max_images:
        indices = indices[:max_images]
    return dataset if len(indices) == len(dataset) else torch.utils.data.Subset(dataset, indices)


def write_report(report: EvaluationReport, path: str | Path) -> Path:
    """Writes the JSON report and a confusion-matrix PNG beside it."""
    from fcnseg.visualize import plot_confusion_matrix

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2))
    plot_confusion_matrix(report.confusion.matrix.cpu().numpy(), report.classes, path.with_suffix(".confusion.png"))
    return path
