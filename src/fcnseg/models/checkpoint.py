"""Self-describing checkpoints: atomic writes, safe loads, and model rebuilding.

A checkpoint is a dict saved with ``torch.save`` and read with ``weights_only=True``, so loading a
file from an untrusted source never runs pickled code. It holds the model's name and builder
arguments next to its state dict (the nanoGPT pattern), the class names, colours and
normalisation that inference needs, and, for training checkpoints, everything ``--resume`` needs.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from fcnseg.errors import CheckpointError, OptionError
from fcnseg.models.fcn import build_model
from fcnseg.models.model_folder import missing_files, read_model_folder
from fcnseg.runtime import atomic_write

FORMAT = "fcnseg-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model_name", "model_kwargs", "state_dict", "classes", "colors", "ignore_index", "mean", "std")


def make_checkpoint(
    model: nn.Module,
    *,
    classes: list[str],
    colors: list[tuple[int, int, int]] | list[list[int]],
    ignore_index: int = IGNORE_INDEX,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    **extra: Any,
) -> dict[str, Any]:
    """Builds the checkpoint dict of a model built by `fcnseg.build_model` (or a DDP wrapper of one).

    Args:
        model: the FCN; its ``model_name`` and ``model_kwargs`` attributes say how to rebuild it.
        classes: class names, index = class id.
        colors: one RGB triple per class.
        ignore_index: the void label.
        mean, std: input normalisation.
        **extra: training state (``epoch``, ``iteration``, ``optimizer``, ``scheduler``, ``scaler``,
            ``rng``, ``config``, ``metrics``...), stored as given.
    """
    model = getattr(model, "module", model)
    if not hasattr(model, "model_name"):
        raise ValueError("model has no model_name; build it with fcnseg.build_model or a builder like fcn_resnet18")
    if len(classes) != len(colors):
        raise ValueError(f"{len(classes)} class names but {len(colors)} colours")
    kwargs = dict(model.model_kwargs)
    kwargs["weights_backbone"] = None  # the state dict carries the weights
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_name": model.model_name,
        "model_kwargs": kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(classes),
        "colors": [list(map(int, c)) for c in colors],
        "ignore_index": int(ignore_index),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        **extra,
    }


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes atomically: a temporary file in the same folder, flushed to disk, then renamed.

    A crash or kill mid-write leaves the previous file intact, never a truncated one.
    """
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint file or a model folder that exists, before any reading (the check a
    command makes before its work starts).

    Raises:
        OptionError: nothing at ``path``, or a folder that is not a model folder (naming the file it lacks).
    """
    path = Path(path)
    if not path.exists():
        raise OptionError(f"checkpoint not found: {path}")
    missing = missing_files(path) if path.is_dir() else []
    if missing:
        raise OptionError(f"checkpoint {path} is a folder but not a model folder: it has no "
                          f"{' and no '.join(missing)} (fcnseg export CKPT --format hf --out DIR writes one)")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads and validates a checkpoint file without running pickled code (``weights_only=True``), or
    a model folder (`fcnseg.models.model_folder`: safetensors and JSON, no code either).

    Raises:
        CheckpointError: missing, truncated, not a checkpoint, or one from another program; a folder
            that is not a complete model folder.
    """
    path = Path(path)
    if path.is_dir():
        return read_model_folder(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle with code, random bytes...
        raise CheckpointError(_unreadable(path, err)) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an fcnseg checkpoint (no format={FORMAT!r} marker); "
            "to start from a backbone state dict use --weights-backbone instead"
        )
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it was not loaded")
    if checkpoint["version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {checkpoint['version']}; this fcnseg reads up to {FORMAT_VERSION}")
    return checkpoint


def _unreadable(path: Path, err: Exception) -> str:
    """fcnseg's own words for a file ``torch.load(weights_only=True)`` refused.

    torch's message for a refused pickle advises loading it with ``weights_only=False``, which
    would run whatever code it names: advice fcnseg never repeats. Such a file is described instead
    (what it holds, that nothing ran); for other failures only torch's first line is kept.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds part of its message with terminal codes
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return (f"cannot read checkpoint {path}: it holds pickled objects other than tensors and plain data "
                f"(it names {named[1]}), which could run code when loaded; it was not loaded, and nothing in it "
                "ran. fcnseg's checkpoints hold only tensors and plain data, so this file comes from another "
                "program or was altered; use checkpoints from sources you trust, or retrain")
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text:
        opcode = re.search(r"Unsupported operand (\d+)", text)
        detail = f" (pickle instruction {opcode[1]} is not accepted)" if opcode else ""
        return (f"cannot read checkpoint {path}: not a pickle of tensors and plain data that can be read "
                f"safely{detail}; the file is truncated, corrupt, or written by another program; it was not loaded")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"cannot read checkpoint {path}: {err.__class__.__name__}: {first} (truncated or corrupt; it was not loaded)"


def model_from_checkpoint(checkpoint: dict[str, Any] | str | os.PathLike) -> nn.Module:
    """Rebuilds the model a checkpoint describes and loads its weights strictly (eval mode, CPU).

    Raises:
        CheckpointError: the state dict does not match the described model.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    try:
        model = build_model(checkpoint["model_name"], **checkpoint["model_kwargs"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint describes a model fcnseg cannot build: {err}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not match {checkpoint['model_name']}: {err}") from None
    return model.eval()
