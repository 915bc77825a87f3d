"""One optimiser step over one or more micro-batches; model, data and optimiser come in as arguments."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from fcnseg.errors import FcnsegError
from fcnseg.ops.loss import segmentation_loss
from fcnseg.runtime import autocast_context


class TrainingDiverged(FcnsegError):
    """The loss, the weights or the BatchNorm statistics became NaN or infinite."""


def loss_diverged(loss: float, amp_dtype: torch.dtype | None = None) -> TrainingDiverged:
    """The error for a NaN or infinite loss, for every backend: what is kept and what to try next."""
    amp_hint = (f" or train without {str(amp_dtype).removeprefix('torch.')} mixed precision (--amp none)"
                if amp_dtype else "")
    return TrainingDiverged(f"loss is {loss}; stopping before this step's update. The last good checkpoint is "
                            f"kept: --resume continues from it; if the loss diverges again, lower --lr{amp_hint}")


def ensure_finite_state(model: nn.Module) -> None:
    """Raises `TrainingDiverged` unless every parameter and floating buffer of ``model`` is finite.

    Buffers too: BatchNorm's running statistics can overflow while the loss stays finite (batch
    statistics in training), and evaluation reads them.
    """
    state = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not all(torch.isfinite(t).all() for t in state):
        raise TrainingDiverged("weights or BatchNorm statistics became NaN or infinite; stopping without "
                               "overwriting the last good checkpoint (--resume continues from it)")


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
                raise loss_diverged(loss.item(), amp_dtype)
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
