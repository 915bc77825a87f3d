"""Training settings: one dataclass, named recipes, and the optional YAML file that sets defaults.

Precedence, lowest first: the dataclass defaults (the recommended recipe), ``--recipe``, the YAML
``--config`` file, then options given on the command line. The resolved config is saved with
every run and inside every checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fcnseg.data.registry import DATASETS
from fcnseg.errors import FcnsegError, OptionError
from fcnseg.models.fcn import VARIANTS
from fcnseg.models.upsample import UPSAMPLER_CHOICES


def default_workers() -> int:
    """DataLoader workers for this machine: none with 2 cores or fewer, where a worker process takes
    its core from the training threads (MobileNetV2 FCN-8s, 360x480, 2 cores: 30 steps in 24.5 s
    loading in-process, 28.9 s with one worker); else half the cores, at most 4."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


@dataclass
class TrainConfig:
    """Everything a training run depends on."""

    # data
    dataset: str = "folder"
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[int, int] = (320, 480)
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.0
    drop_small: bool = False  # the chapter drops images smaller than the crop; we pad them
    border_as_background: bool = False  # the chapter's reading of VOC's void border
    workers: int = field(default_factory=lambda: default_workers())
    # model
    model: str = "fcn_resnet18"
    variant: str = "8s"
    upsampler: str = "bilinear"
    weights_backbone: str | None = "DEFAULT"
    freeze_backbone: bool = False
    cache_features: int = 0  # with freeze_backbone: augmented views per image whose body features are cached; 0: off
    feature_cache: str | None = None  # directory for the cache (memory-mapped); None: in memory
    # optimisation
    epochs: int = 30
    iterations: int | None = None  # if set, overrides epochs
    batch_size: int = 8
    accumulate: int = 1
    optimizer: str = "sgd"
    # 0.02, poly, wd 1e-4, no warm-up: docs/RESULTS.md (Q4's search, where lr 0.012-0.022 with poly and
    # wd 1e-4 made the best trials and lr >= 0.07 diverged; the 0.70 mIoU CamVid run used lr 0.02).
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    warmup_iters: int = 0
    loss_reduction: str = "mean"  # "d2l": sum over images of each image's mean pixel loss
    class_weights: str = "none"  # or "median-frequency"
    # hardware
    device: str = "auto"
    amp: str = "auto"  # auto: bf16 on CPUs that support it, fp16 on CUDA; or bf16, fp16, none
    channels_last: bool = True
    # bookkeeping
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False  # replace the finished or abandoned run in `out` instead of refusing
    checkpoint_every: int = 0  # iterations; 0: at the end of each epoch only
    eval_every: int = 1  # epochs
    save_every: int = 1  # epochs; last.pt is always written at the end of the run
    eval_mode: str = "whole"
    max_val_images: int | None = None
    recipe: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_plain_dict(self) -> dict[str, Any]:
        """`to_dict` with tuples as lists: what YAML files and ``weights_only`` checkpoints hold."""
        return _plain(self.to_dict())


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "variant": VARIANTS,
    "upsampler": UPSAMPLER_CHOICES,
    "optimizer": ("sgd", "adamw"),
    "schedule": ("constant", "poly", "cosine"),
    "loss_reduction": ("mean", "d2l"),
    "class_weights": ("none", "median-frequency"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "eval_mode": ("whole", "sliding"),
    "recipe": ("default", "d2l"),
}

# The chapter's setting, so users can compare against it.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "d2l": {
        "model": "fcn_resnet18",
        "variant": "32s",
        "upsampler": "bilinear",
        "optimizer": "sgd",
        "lr": 1e-3,
        "momentum": 0.0,
        "weight_decay": 1e-3,
        "batch_size": 32,
        "epochs": 5,
        "crop": (320, 480),
        "scale_range": None,
        "hflip": False,
        "schedule": "constant",
        "loss_reduction": "d2l",
        "drop_small": True,
        "border_as_background": True,
        "amp": "none",
        "channels_last": False,
    },
}

FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping of TrainConfig fields (dashes or underscores); unknown keys are refused."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FcnsegError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise FcnsegError(f"config {path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise FcnsegError(f"config {path}: unknown options {', '.join(unknown)}")
    return data


def resolve_config(explicit: dict[str, Any], config_file: str | None = None, recipe: str | None = None) -> TrainConfig:
    """Merges defaults, recipe, YAML file and explicit options (later wins) and validates."""
    values: dict[str, Any] = {}
    file_values = read_yaml_config(config_file) if config_file else {}
    recipe = recipe or file_values.get("recipe") or "default"
    if recipe not in RECIPES:
        raise FcnsegError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values.update(RECIPES[recipe])
    values.update(file_values)
    values.update({k: v for k, v in explicit.items() if v is not None})
    values["recipe"] = recipe
    for key in ("crop", "scale_range"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    config = TrainConfig(**values)
    # "none" spells None because None in `explicit` means "not given" (and YAML users may write it).
    for key in ("weights_backbone", "scale_range"):
        if isinstance(getattr(config, key), str) and getattr(config, key).lower() in ("none", "null", ""):
            setattr(config, key, None)
    for key, allowed in CHOICES.items():
        if getattr(config, key) not in allowed:
            raise FcnsegError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    if not config.root:
        raise FcnsegError("no dataset root given (--root DIR)")
    if config.batch_size < 1 or config.accumulate < 1:
        raise FcnsegError("batch size and accumulation steps must be positive")
    if config.cache_features < 0 or (config.cache_features and not config.freeze_backbone):
        raise FcnsegError("--cache-features V needs V >= 0 and --freeze-backbone: only a frozen body's features can be cached")
    return config


def parse_size(text: str) -> tuple[int, int]:
    """'320x480' -> (320, 480); a single number means a square."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise OptionError(f"size must look like HxW (e.g. 320x480), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise OptionError(f"size must look like HxW with positive sides, got {text!r}")
    return sizes[0], sizes[1]


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
