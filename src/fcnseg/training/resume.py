"""What a resumed run must share with the checkpoint it resumes: model, data, batch, optimiser, seed."""
from __future__ import annotations

from typing import Any

from fcnseg.errors import CheckpointError
from fcnseg.training.config import TrainConfig


def check_resumable(checkpoint: dict[str, Any], config: TrainConfig, classes: list[str]) -> None:
    """Refuses to resume from a checkpoint of another model, dataset or recipe."""
    for key in ("optimizer", "scheduler", "rng", "epoch", "global_step", "config"):
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint has no {key!r}: it is not a training checkpoint and cannot be resumed")
    saved = checkpoint["config"]
    for key in ("model", "variant", "upsampler", "batch_size", "accumulate", "optimizer", "seed", "dataset"):
        if saved.get(key) != getattr(config, key):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r}, this run asks for "
                f"{getattr(config, key)!r} (use another --out to start a new run)"
            )
    if list(checkpoint["classes"]) != classes:
        raise CheckpointError("cannot resume: the checkpoint's classes differ from this dataset's")
