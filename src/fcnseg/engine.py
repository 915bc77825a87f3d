"""One training step and whole-image evaluation; model, data and optimiser come in as arguments."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.devices import native_cpu_bf16
from fcnseg.errors import FcnsegError
from fcnseg.metrics import ConfusionMatrix, SegmentationMetrics

IGNORE_INDEX = 255


class TrainingDiverged(FcnsegError):
    """The loss became NaN or infinite."""


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel cross-entropy ignoring the void label.

    Args:
        logits: ``(N, C, H, W)``.
        target: ``(N, H, W)`` int64.
        class_weights: optional ``(C,)`` weights (e.g. median frequency balancing).
        reduction: "mean" over labelled pixels, or "d2l": the chapter's sum over images of each
            image's mean pixel loss (its ``l.sum().backward()`` on per-image means), which scales
            the gradient with the batch size.
    """
    logits = logits.float()
    if reduction == "mean":
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    labelled = (target != ignore_index).flatten(1).sum(1).clamp(min=1)
    return (per_pixel.flatten(1).sum(1) / labelled).sum()


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` for the device, or a no-op when AMP is off."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """"auto" -> bf16 on CPUs with native bf16 (AVX-512 BF16/AMX) and bf16-capable GPUs, fp16 on
    other GPUs, off elsewhere; "bf16"/"fp16" force; "none" disables."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if native_cpu_bf16() else None
    return None


@dataclass
class StepResult:
    loss: float
    images: int


def train_step(
    model: nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    class_weights: torch.Tensor | None = None,
    loss_reduction: str = "mean",
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """One optimiser step over one or more micro-batches (gradient accumulation).

    Args:
        compute_loss: ``(image, target) -> loss`` in place of ``segmentation_loss(model(image),
            target)`` (e.g. `CachedFeatureHead.loss`, which fuses the last layer with the loss);
            it runs under the same autocast and must compute the same function.

    Raises:
        TrainingDiverged: a loss is NaN or infinite; the optimiser step is not taken.
    """
    micro_batches = list(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    total_loss, images = 0.0, 0
    for i, (image, target) in enumerate(micro_batches):
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync:
            if compute_loss is not None:
                with autocast_context(device, amp_dtype):
                    loss = compute_loss(image, target)
            else:
                with autocast_context(device, amp_dtype):
                    logits = model(image)
                loss = segmentation_loss(logits, target, class_weights=class_weights, reduction=loss_reduction)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()}; stopping (lower the learning rate or disable fp16 AMP); "
                    "the last good checkpoint is kept"
                )
            scaled = loss / len(micro_batches)
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        total_loss += loss.item()
        images += image.shape[0]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(loss=total_loss / len(micro_batches), images=images)


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
        matrix.update(logits.argmax(1), target)
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


def median_frequency_weights(dataset, num_classes: int) -> torch.Tensor:
    """Median frequency balancing (Eigen & Fergus): ``median(freq) / freq_c``.

    ``freq_c`` is the pixel count of class c over the pixel count of the images containing c.
    Reads every mask of ``dataset`` once (``read_pair`` when available, else ``dataset[i]``).
    """
    class_pixels = torch.zeros(num_classes, dtype=torch.float64)
    image_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(dataset)):
        target = dataset.read_pair(i)[1] if hasattr(dataset, "read_pair") else dataset[i][1]
        target = torch.as_tensor(target).long().flatten()
        target = target[target != IGNORE_INDEX]
        counts = torch.bincount(target, minlength=num_classes)[:num_classes].double()
        class_pixels += counts
        image_pixels += (counts > 0).double() * target.numel()
    freq = class_pixels / image_pixels.clamp(min=1)
    present = freq > 0
    weights = torch.ones(num_classes, dtype=torch.float64)
    weights[present] = freq[present].median() / freq[present]
    return weights.float()
