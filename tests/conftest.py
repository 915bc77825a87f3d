"""Shared fixtures: the real data in ../shared/data (the one place that finds it), and CPU determinism.

Tests that need the real data use the fixtures below (``shared_data``, ``voc_sample``,
``camvid_root``) or call ``require_shared("camvid")`` (``from tests.conftest import require_shared``).
Absent data skips the test with the reason, except under CI (``CI=true``), where it is a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers share the cores, one worker per CPU: one thread each (and in the processes they start),
    # else each worker's torch spins threads against the others' and the suite gets slower, not faster.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from torch import nn

from fcnseg.models.fcn import FCN

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "FCNSEG_SHARED_DATA"


def shared_data_dir() -> Path:
    """../shared/data beside the repository, or $FCNSEG_SHARED_DATA."""
    return Path(os.environ.get(SHARED_DATA_ENV, REPO_ROOT.parent / "shared" / "data"))


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require_shared(relative: str = "") -> Path:
    """Path of a file or folder in the shared data; skips when absent, fails under CI=true."""
    path = shared_data_dir() / relative
    if not path.exists():
        message = (f"shared data {path} is absent (set {SHARED_DATA_ENV} to the shared data folder "
                   "or place it at ../shared/data beside the repository)")
        if on_ci():
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``../shared/data`` or ``$FCNSEG_SHARED_DATA``)."""
    return require_shared()


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    """The folder holding ``VOCdevkit/`` with five genuine VOC2012 pairs."""
    return require_shared("voc2012-sample")


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """CamVid (SegNet distribution): train/val images and masks, train.txt and val.txt."""
    return require_shared("camvid")


class TinyBackbone(nn.Module):
    """Five strided convolutions with taps at strides 2, 4, 8, 16 and 32: the FCN at a fraction of the cost."""

    channels = (8, 8, 8, 16, 32)

    def __init__(self) -> None:
        super().__init__()

        def conv(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.ReLU())

        self.stage8 = nn.Sequential(conv(3, 8), conv(8, 8), conv(8, 8))
        self.stage16 = conv(8, 16)
        self.stage32 = conv(16, 32)

    def forward(self, x):
        c2 = self.stage8[:1](x)  # inside stage8, as fcnseg's bodies tap strides 2 and 4
        c4 = self.stage8[1:2](c2)
        c8 = self.stage8[2:](c4)
        c16 = self.stage16(c8)
        return c2, c4, c8, c16, self.stage32(c16)


def tiny_fcn(variant: str = "8s", seed: int = 0) -> FCN:
    torch.manual_seed(seed)
    model = FCN(TinyBackbone(), 3, variant=variant)
    for name, param in model.named_parameters():
        if name.startswith("score"):  # skip scores start at zero; make them count
            nn.init.normal_(param, std=0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small forward passes, which are dominated by OpenMP hand-offs
    that stall when the CPU is shared (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def three_class_tiny_fcn(variant: str = "8s") -> FCN:
    """`tiny_fcn` with zero biases: on `gradient_photo` it predicts all three classes (with its
    biases, one class everywhere, and mask comparisons would prove nothing)."""
    net = tiny_fcn(variant, seed=1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return net


def gradient_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` photo of colour ramps and noise, on which `three_class_tiny_fcn` predicts every class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 255 / max(height - 1, 1), xx * 255 / max(width - 1, 1), (yy + xx) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def random_scores_checkpoint(path: Path, num_classes: int = 3, **checkpoint_fields) -> Path:
    """A saved MobileNetV2 FCN-8s checkpoint (random body, random score layers without bias, so it
    predicts every class somewhere) for the synthetic classes; ``checkpoint_fields`` as `make_checkpoint`
    takes them (mean, std, ...)."""
    from fcnseg.data import default_palette
    from fcnseg.data.synthetic import synthetic_classes
    from fcnseg.models import build_model
    from fcnseg.models.checkpoint import make_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model("fcn_mobilenet_v2", variant="8s", num_classes=num_classes, weights_backbone=None).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("score"):
                param.zero_() if name.endswith("bias") else param.normal_(0, 1.0)
    checkpoint = make_checkpoint(model, classes=synthetic_classes(num_classes), colors=default_palette(num_classes),
                                 **checkpoint_fields)
    return save_checkpoint(checkpoint, path)
