"""What the training tests share: a user's own dataset, a config without a root, a recording callback."""
from __future__ import annotations

from pathlib import Path

import torch

from fcnseg.training import Callback, TrainConfig


class Squares(torch.utils.data.Dataset):
    """A user's own in-memory dataset: raw (uint8 image, int64 target) pairs and class names, no colours."""

    classes = ["background", "square"]

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pairs = []
        for _ in range(n):
            target = torch.zeros(48, 64, dtype=torch.int64)
            y, x = torch.randint(0, 24, (2,), generator=generator).tolist()
            target[y:y + 20, x:x + 30] = 1
            image = torch.where(target.bool(), 200, 30).to(torch.uint8).expand(3, -1, -1).clone()
            self.pairs.append((image, target))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.pairs[index]


def user_config(out: Path, **changes) -> TrainConfig:
    # No root and no dataset name: the data comes as objects.
    return TrainConfig(model="fcn_resnet18", variant="8s", weights_backbone=None, crop=(48, 64), scale_range=None,
                       hflip=False, batch_size=4, epochs=2, workers=0, amp="none", channels_last=False,
                       out=str(out), **changes)


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []
        self.epochs: list[tuple[int, dict]] = []

    def on_step_end(self, state, result) -> None:
        self.steps.append((state.global_step, state.step_in_epoch, result.images))

    def on_epoch_end(self, state, record) -> None:
        self.epochs.append((state.epoch, record))
