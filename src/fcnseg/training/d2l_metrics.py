"""The chapter's numbers, in the chapter's terms, for the d2l recipes (``config.d2l_metrics``).

d2l's ``train_ch13`` prints ``loss 0.426, train acc 0.867, test acc 0.851`` and ``N examples/sec``:

- train loss: each example's mean pixel loss, summed over the epoch's examples and divided by their
  number (its ``metric[0] / metric[2]``). The trainer logs every loss this way (`per_example_loss`).
- train accuracy: correct pixels / pixels of the training crops, from the logits of the very forward
  pass the step trains on (`ChapterMetrics.loss_function`): with the fused loss, which never builds
  the full-size logits, the last upsampling runs once more without gradient (about 5% of a CPU
  step); unfused (under torchrun) the step's own logits are counted.
- test accuracy: the same on random crops of the validation images, those smaller than the crop
  left out (the chapter's ``VOCSegDataset`` on the val split); seeded, the same crops every epoch.
- examples/sec: training examples of the epoch (all processes) over its training time.

Void pixels, if a dataset keeps any, are counted nowhere; the d2l recipes read VOC's border as
background, as the chapter does, so every pixel counts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fcnseg.constants import IGNORE_INDEX
from fcnseg.errors import OptionError
from fcnseg.models.fcn import OUTPUT_STRIDE, pad_to_multiple
from fcnseg.ops.argmax import class_map
from fcnseg.ops.fused_loss import upsample_cross_entropy
from fcnseg.ops.loss import segmentation_loss
from fcnseg.runtime import autocast_context
from fcnseg.training.config import TrainConfig
from fcnseg.training.datasets import build_test_crops
from fcnseg.training.distributed import DistributedContext
from fcnseg.training.step import StepResult

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_loss(result: StepResult, reduction: str, accumulate: int) -> StepResult:
    """``result`` with its loss as the mean over examples of each example's mean pixel loss.

    The "d2l" reduction trains on the batch's sum of per-example means (the chapter's
    ``l.sum().backward()``), which is batch-size times the figure the chapter prints; "mean" already
    is that figure when every pixel is labelled. Only what is logged changes, never the gradient.
    """
    if reduction != "d2l":
        return result
    per_micro_batch = max(result.images // max(accumulate, 1), 1)
    return dataclasses.replace(result, loss=result.loss / per_micro_batch)


def per_process_batch(config: TrainConfig, world_size: int) -> int:
    """The batch each process loads: ``batch_size``, or its share of it with ``global_batch``.

    Raises:
        OptionError: a global batch that the processes cannot share equally.
    """
    if not config.global_batch or world_size == 1:
        return config.batch_size
    if config.batch_size % world_size:
        raise OptionError(f"--batch-size {config.batch_size} is this recipe's global batch: it must divide among "
                          f"the {world_size} processes (or set global_batch: false for a batch per process)")
    return config.batch_size // world_size


def init_scores(model: nn.Module, score_init: str) -> None:
    """The 1x1 score convolution as the recipe's edition initialises it: "xavier" is MXNet's
    ``init.Xavier()`` (uniform, gain 1) with a zero bias; "default" leaves PyTorch's."""
    if score_init == "xavier":
        nn.init.xavier_uniform_(model.score32.weight)
        nn.init.zeros_(model.score32.bias)


def read_message(dataset: Dataset, crop: tuple[int, int]) -> str:
    """The chapter's "read N examples", with how many images smaller than the crop were left out."""
    dropped = getattr(dataset, "dropped", None)
    if dropped is None and isinstance(dataset, Subset):
        dropped = getattr(dataset.dataset, "dropped", None)
    if not dropped:
        return f"read {len(dataset)} examples"
    return f"read {len(dataset)} examples ({len(dropped)} smaller than {crop[0]}x{crop[1]} dropped)"


class PixelTally:
    """Correct and counted pixels, summed on the device (no synchronisation per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.correct = torch.zeros((), dtype=torch.float64, device=self.device)
        self.pixels = torch.zeros((), dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Counts ``argmax(logits) == target`` over the labelled pixels of ``target``."""
        labelled = target != IGNORE_INDEX
        self.correct += ((class_map(logits) == target) & labelled).sum()
        self.pixels += labelled.sum()

    def value(self, ctx: DistributedContext) -> float:
        """correct / pixels over every process (NaN when nothing was counted)."""
        counts = torch.stack([self.correct, self.pixels])
        if ctx.enabled:
            torch.distributed.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


class ChapterMetrics:
    """Train accuracy counted during the steps, test accuracy on seeded crops, examples/sec.

    Without test crops (a run without ``d2l_metrics``) it records nothing: the trainer calls it the same.
    """

    def __init__(self, test_crops: Dataset | None, config: TrainConfig, *, device: torch.device,
                 ctx: DistributedContext, amp_dtype: torch.dtype | None, batch_size: int) -> None:
        self.test_crops, self.config, self.device, self.ctx = test_crops, config, device, ctx
        self.amp_dtype, self.batch_size = amp_dtype, batch_size
        self.train_tally = PixelTally(device)
        self.started = time.perf_counter()

    @classmethod
    def for_run(cls, config: TrainConfig, train_dataset: Dataset, val_dataset: Dataset | None,
                **kwargs: Any) -> ChapterMetrics:
        """The run's chapter metrics: with ``config.d2l_metrics``, the test crops built and both splits'
        "read N examples" printed (by the first process), as the chapter prints them."""
        if not config.d2l_metrics:
            return cls(None, config, **kwargs)
        crops = build_test_crops(config, val_dataset)
        if kwargs["ctx"].is_main:
            print(read_message(train_dataset, tuple(config.crop)))
            print(read_message(crops, tuple(config.crop)))
        return cls(crops, config, **kwargs)

    def start_epoch(self) -> None:
        """Resets the epoch's counts and clock (a run resumed mid-epoch counts from the resume)."""
        self.train_tally.reset()
        self.started = time.perf_counter()

    def loss_function(self, model: nn.Module, net: nn.Module, *, fused: bool,
                      class_weights: torch.Tensor | None) -> LossFunction:
        """The step's loss, computing the same function as before, that also counts train accuracy.

        Args:
            model: the FCN (unwrapped).
            net: what the step calls unfused (the DDP wrapper under torchrun, else ``model``).
            fused: fuse the last upsampling with the loss (one process only).
        """
        reduction, tally = self.config.loss_reduction, self.train_tally

        def fused_loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            h, w = image.shape[-2:]
            score = model.scores(*model.backbone(pad_to_multiple(image, OUTPUT_STRIDE)))
            with torch.no_grad():
                tally.add(model.upsample_final(score.detach())[..., :h, :w], target)
            return upsample_cross_entropy(score, model.upsample_final, target, class_weights=class_weights,
                                          reduction=reduction)

        def unfused_loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = net(image)
            tally.add(logits.detach(), target)
            return segmentation_loss(logits, target, class_weights=class_weights, reduction=reduction)

        return fused_loss if fused and model.upsample_final.learnable else unfused_loss

    def epoch_record(self, model: nn.Module, examples: int, epoch: int) -> dict[str, Any]:
        """``train_acc``, ``test_acc`` and ``examples_per_sec`` of the epoch just trained.

        Args:
            examples: training examples this process saw in the epoch.
            epoch: the epoch's number: the test crops are drawn anew for each epoch, as the chapter's
                test iterator draws them, seeded by (seed, epoch, image) so a resumed run draws the same.
        """
        if self.test_crops is None:
            return {}
        self.test_crops.set_epoch(epoch)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        examples_all = examples * self.ctx.world_size
        return {"train_acc": self.train_tally.value(self.ctx), "test_acc": self.test_accuracy(model),
                "examples_per_sec": round(examples_all / seconds, 2)}

    @torch.inference_mode()
    def test_accuracy(self, model: nn.Module) -> float:
        """Pixel accuracy of ``model`` (eval mode) on the test crops, this process's share of them."""
        was_training = model.training
        model.eval()
        share = Subset(self.test_crops, range(self.ctx.rank, len(self.test_crops), self.ctx.world_size))
        tally = PixelTally(self.device)
        for image, target in DataLoader(share, batch_size=self.batch_size, num_workers=self.config.workers):
            image, target = image.to(self.device), target.to(self.device)
            if self.config.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with autocast_context(self.device, self.amp_dtype):
                tally.add(model(image).float(), target)
        model.train(was_training)
        return tally.value(self.ctx)


def format_chapter_line(record: dict[str, Any]) -> str:
    """The chapter's printout for one epoch: ``loss 0.426, train acc 0.867, test acc 0.851, 37.1 examples/sec``."""
    parts = [f"loss {record['train_loss']:.3f}"]
    parts += [f"{name} {record[key]:.3f}" for key, name in (("train_acc", "train acc"), ("test_acc", "test acc"))
              if key in record]  # no train acc when the head trains on cached features
    return ", ".join(parts + [f"{record['examples_per_sec']:.1f} examples/sec"])
