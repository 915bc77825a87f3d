"""Model folders in the Hugging Face convention, read back as checkpoints.

A model folder (written by ``fcnseg export CKPT --format hf``, `fcnseg.export.model_folder`) holds:

- ``model.safetensors``: the model's state dict, in safetensors (tensors only: reading it can run
  no code, unlike a pickle);
- ``config.json``: how to rebuild the model (``model_name``, ``model_kwargs``, also spelt out as
  ``body``, ``variant``, ``num_classes``, ``upsampler_bias``), the class names and colours, the
  normalisation, the void label, the training crop, and the metrics and training config when known;
- ``README.md``: the model card (not needed to load).

`read_model_folder` turns such a folder into the dict `fcnseg.models.checkpoint.load_checkpoint`
returns for a checkpoint file, so every command and function that takes a checkpoint takes a folder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from fcnseg.errors import CheckpointError, OptionError, WeightsError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FOLDER_FORMAT = "fcnseg-model-folder"
FOLDER_VERSION = 1
CONFIG_KEYS = ("model_name", "model_kwargs", "classes", "colors", "ignore_index", "mean", "std")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a model folder's config and weights."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def missing_files(path: str | os.PathLike) -> list[str]:
    """The files a model folder needs that ``path`` lacks (none for a complete folder)."""
    return [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (Path(path) / name).is_file()]


def read_model_folder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of a model folder (format, model, weights, classes, colours, normalisation,
    and ``config`` with the training crop), without running any code from it.

    Raises:
        CheckpointError: the folder lacks config.json or model.safetensors, or either is unreadable
            or incomplete.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path} is not a model folder: it has no {' and no '.join(missing)} "
                              "(fcnseg export CKPT --format hf --out DIR writes one)")
    config = _read_config(path / CONFIG_NAME)
    try:
        state_dict = load_file(path / WEIGHTS_NAME, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path / WEIGHTS_NAME}: {err} (truncated or corrupt; it was not loaded)") from None
    training = config.get("training_config")
    run_config = dict(training) if isinstance(training, dict) else {}
    if config.get("crop"):
        run_config["crop"] = list(config["crop"])
    return {
        "format": "fcnseg-checkpoint", "version": 1,
        "model_name": config["model_name"], "model_kwargs": dict(config["model_kwargs"], weights_backbone=None),
        "state_dict": state_dict, "classes": list(config["classes"]), "colors": [list(c) for c in config["colors"]],
        "ignore_index": int(config["ignore_index"]), "mean": list(config["mean"]), "std": list(config["std"]),
        "config": run_config, "metrics": config.get("metrics"),
    }


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise CheckpointError(f"{path} is not an fcnseg model config (no \"format\": \"{FOLDER_FORMAT}\")")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; the model was not loaded")
    if int(config.get("format_version", 1)) > FOLDER_VERSION:
        raise CheckpointError(f"{path} has format version {config['format_version']}; this fcnseg reads up to "
                              f"{FOLDER_VERSION}")
    return config


def resolve_model_folder(name_or_path: str | os.PathLike, *, revision: str | None = None,
                         cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A local model folder (or checkpoint file), or the folder of a Hub repository ``"owner/name"``
    downloaded (or found in the Hugging Face cache) by ``huggingface_hub.snapshot_download``.

    Only ``config.json``, ``model.safetensors`` and ``README.md`` are fetched: a repository's other
    files (code among them) are never downloaded, and nothing in these three runs when loaded.

    Raises:
        CheckpointError: a local path that does not exist and is no repository id.
        OptionError: a repository id without huggingface_hub installed.
        WeightsError: the repository cannot be downloaded nor found in the cache (offline, unknown
            repository or revision); the message says how to provide the folder instead.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    text = str(name_or_path)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or text.endswith((".pt", ".pth")):
        raise CheckpointError(f"{text}: no such model folder or checkpoint (nor a Hub repository id owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise OptionError(f"loading {text} from the Hugging Face Hub needs huggingface_hub: pip install "
                          f"'fcnseg[hub]'; or download the folder yourself and pass its path") from None
    try:
        folder = snapshot_download(text, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    except Exception as err:  # offline, unknown repository or revision, HTTP errors: one answer
        reason = " ".join(str(err).split())[:300] or err.__class__.__name__
        raise WeightsError(f"cannot get {text}{f' (revision {revision})' if revision else ''} from the Hugging Face "
                           f"Hub: {reason}. Without network access, download the folder on another machine "
                           f"(huggingface-cli download {text} --local-dir DIR), copy it here and pass DIR, or point "
                           "HF_HUB_CACHE at a cache that holds it (with HF_HUB_OFFLINE=1)") from None
    return Path(folder)
