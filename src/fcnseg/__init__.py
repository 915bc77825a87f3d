"""fcnseg: semantic segmentation with Fully Convolutional Networks on PyTorch.

The public API, as torchvision and segmentation_models_pytorch users expect it::

    from fcnseg import Segmenter, train, TrainConfig, build_model, build_dataset, list_models

Models load with the package; training, datasets and prediction load on first use (PEP 562), so
``import fcnseg`` and the command line start fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fcnseg.errors import CheckpointError, DataError, FcnsegError, OptionError, WeightsError
from fcnseg.models import (
    FCN,
    bilinear_kernel,
    build_model,
    fcn_mobilenet_v2,
    fcn_resnet18,
    fcn_resnet34,
    fcn_resnet50,
    list_models,
)

__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_LAZY = {
    "Segmenter": "fcnseg.inference",
    "train": "fcnseg.training",
    "TrainConfig": "fcnseg.training",
    "TrainResult": "fcnseg.training",
    "build_dataset": "fcnseg.data",
    "list_datasets": "fcnseg.data",
    "load_checkpoint": "fcnseg.models.checkpoint",
}

if TYPE_CHECKING:
    from fcnseg.data import build_dataset, list_datasets
    from fcnseg.inference import Segmenter
    from fcnseg.models.checkpoint import load_checkpoint
    from fcnseg.training import TrainConfig, TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcnseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__", "FCN", "bilinear_kernel", "build_model", "fcn_mobilenet_v2", "fcn_resnet18", "fcn_resnet34",
    "fcn_resnet50", "list_models", "Segmenter", "train", "TrainConfig", "TrainResult", "build_dataset",
    "list_datasets", "load_checkpoint", "FcnsegError", "DataError", "CheckpointError", "OptionError", "WeightsError",
]
