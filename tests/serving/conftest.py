"""A small random-weight checkpoint (ResNet-18 FCN-8s, 3 classes) and its Segmenter, for the server tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fcnseg import fcn_resnet18
from fcnseg.inference.segmenter import Segmenter
from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

CLASSES = ["background", "thing", "stuff"]
COLORS = [(0, 0, 0), (200, 30, 30), (30, 200, 30)]


def save_tiny_checkpoint(path: Path) -> Path:
    """A random-weight ResNet-18 FCN-8s of `CLASSES`, trained (so its config says) on 32x48 crops."""
    torch.manual_seed(0)
    model = fcn_resnet18(variant="8s", num_classes=3, weights_backbone=None)
    return save_checkpoint(make_checkpoint(model, classes=CLASSES, colors=COLORS, config={"crop": [32, 48]}), path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("serve-ck") / "fcn8s.pt")


@pytest.fixture(scope="module")
def segmenter(checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(checkpoint, device="cpu", window=(32, 48))
