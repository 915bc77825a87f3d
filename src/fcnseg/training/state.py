"""The run state: where a training run is, what it has learnt so far, and what a checkpoint saves of it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """Everything the loop counts, saved at the top level of every checkpoint and restored on resume.

    Attributes:
        epoch: epochs completed.
        step_in_epoch: optimiser steps taken in the current epoch (non-zero only mid-epoch).
        global_step: optimiser steps taken since the run began.
        best_miou: the best validation mIoU so far (-1 before the first validation).
        history: one record per completed epoch, the lines of metrics.jsonl.
        epoch_loss_sum: sum over the current epoch's images of their batch's loss.
        epoch_images: images seen in the current epoch.
        train_seconds: wall time spent training, over all sessions of the run.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_miou: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss_sum: float = 0.0
    epoch_images: int = 0
    train_seconds: float = 0.0

    def count_step(self, loss: float, images: int) -> None:
        """Counts one optimiser step of ``images`` images whose loss, as logged, is ``loss``."""
        self.step_in_epoch += 1
        self.global_step += 1
        self.epoch_loss_sum += loss * images
        self.epoch_images += images

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields as checkpoint keys (the names checkpoints have always used)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> RunState:
        """The state a checkpoint saved; fields it lacks keep their start values."""
        return cls(**{f.name: checkpoint[f.name] for f in dataclasses.fields(cls) if f.name in checkpoint})

    def end_epoch(self, record: dict[str, Any]) -> None:
        """Appends the epoch's record and starts the next epoch's counts."""
        self.history.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = 0.0
        self.epoch_images = 0
