"""Training: config, loss, step, trainer, checkpoints, distributed set-up, feature cache, tuning.

The trainer loads on first use (PEP 562), so the command line can read `TrainConfig` without
loading the training stack.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fcnseg.training.config import TrainConfig

_LAZY = {
    "Callback": "fcnseg.training.callbacks",
    "RunState": "fcnseg.training.state",
    "TrainResult": "fcnseg.training.trainer",
    "train": "fcnseg.training.trainer",
}

if TYPE_CHECKING:
    from fcnseg.training.callbacks import Callback
    from fcnseg.training.state import RunState
    from fcnseg.training.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fcnseg.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Callback", "RunState", "TrainConfig", "TrainResult", "train"]
