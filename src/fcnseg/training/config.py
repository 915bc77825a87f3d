"""Training settings: one dataclass, named recipes, and the optional YAML file that sets defaults.

Precedence, lowest first: the dataclass defaults (the recommended recipe), ``--recipe``, the YAML
``--config`` file, then options given on the command line. The resolved config is saved with
every run and inside every checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from fcnseg.constants import AMP_CHOICES
from fcnseg.data.registry import DATASETS
from fcnseg.errors import OptionError
from fcnseg.models.fcn import VARIANTS
from fcnseg.models.upsample import UPSAMPLER_CHOICES
from fcnseg.ops.losses import LOSSES
from fcnseg.training.recipes import RECIPES


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
    holdout: float = 0.0  # validate on this share of train_split, held out from training, instead of val_split
    holdout_groups: str = ""  # a regex naming each training image's group: the holdout is whole groups
    crop: tuple[int, int] = (320, 480)
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    hflip: bool = True
    color_jitter: float = 0.0
    hue_jitter: float = 0.0  # hue shifts in [-h, h] turns of the colour wheel
    copy_paste: str = ""  # comma-separated class names pasted from other training images (fcnseg.data.copy_paste)
    copy_paste_prob: float = 0.5  # the share of training samples that get a paste
    drop_small: bool = False  # the chapter drops images smaller than the crop; we pad them
    border_as_background: bool = False  # the chapter's reading of VOC's void border
    cache_images: bool = False  # decode the training pairs once, keep them in memory (fcnseg.data.memory)
    workers: int = field(default_factory=lambda: default_workers())
    # model
    model: str = "fcn_resnet18"
    variant: str = "8s"
    upsampler: str = "bilinear"
    upsampler_bias: bool = False  # the chapter's nn.ConvTranspose2d has a bias; the paper's FCN has none
    score_init: str = "default"  # the 1x1 score convolution: PyTorch's default init, or "xavier" (MXNet)
    weights_backbone: str | None = "DEFAULT"
    freeze_backbone: bool = False
    cache_features: int = 0  # with freeze_backbone: augmented views per image whose body features are cached; 0: off
    feature_cache: str | None = None  # directory for the cache (memory-mapped); None: in memory
    # optimisation
    epochs: int = 30
    iterations: int | None = None  # if set, overrides epochs
    batch_size: int = 8
    global_batch: bool = False  # batch_size is the global batch under torchrun, split across processes
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
    loss: str = "ce"  # or a loss for thin classes: ohem, lovasz, ce+dice, ce+lovasz (fcnseg.ops.losses)
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
    d2l_metrics: bool = False  # log the chapter's train loss, train and test accuracy (docs/CHAPTER.md)
    recipe: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_plain_dict(self) -> dict[str, Any]:
        """`to_dict` with tuples as lists: what YAML files and ``weights_only`` checkpoints hold."""
        return _plain(self.to_dict())

    def to_yaml(self) -> str:
        """The config as RUN_DIR/config.yaml holds it (and ``fcnseg train --print-config`` prints it)."""
        return yaml.safe_dump(self.to_plain_dict(), sort_keys=False)

    def validate(self) -> TrainConfig:
        """Converts each field to its type in place (``lr="1e-3"`` becomes 0.001, ``crop="256x352"`` a
        pair, ``hflip="no"`` False) and refuses values out of range, so a config built in Python is
        checked like one from the command line or a YAML file; returns ``self``.

        Raises:
            OptionError: naming the field, what it must be, and the value given.
        """
        return validate_config(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "variant": VARIANTS,
    "upsampler": UPSAMPLER_CHOICES,
    "optimizer": ("sgd", "adamw"),
    "schedule": ("constant", "poly", "cosine"),
    "loss_reduction": ("mean", "d2l"),
    "class_weights": ("none", "median-frequency"),
    "loss": LOSSES,
    "amp": AMP_CHOICES,
    "eval_mode": ("whole", "sliding"),
    "score_init": ("default", "xavier"),
    "recipe": tuple(RECIPES),
}

FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}
_TRUE, _FALSE, _NONE = ("1", "true", "yes", "on"), ("0", "false", "no", "off"), ("none", "null", "")
MIN_CROP = 32  # the FCN's output stride: a smaller crop leaves the coarsest scores less than one cell


class _Mismatch(ValueError):
    """A value that does not fit its field; the message completes "<key> must be ..."."""


def parse_bool(value: Any) -> bool:
    """True/False from a bool, 1/0, or yes/no, true/false, on/off (any case): what YAML files and the
    older ``--flag true`` spelling hold. Anything else is refused, never read as "truthy"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _Mismatch("yes or no (true/false, on/off, 1/0)")


def _to_int(value: Any) -> int:
    """An int from an int, an integral float (``2.0``) or its text; True/False are not numbers here."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, (float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
            if number.is_integer():
                return int(number)
        except ValueError:
            pass
    raise _Mismatch("a whole number")


def _to_float(value: Any) -> float:
    """A float from a number or its text ("1e-3"); True/False are not numbers here."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # "1e-3": PyYAML reads an exponent without a dot as a string
        except ValueError:
            pass
    raise _Mismatch("a number")


def _to_pair(value: Any, kind: type) -> tuple:
    """A size (``HxW``, one number, or ``[H, W]``) for int pairs; ``[A, B]`` or "A B" for float pairs."""
    if kind is int and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return parse_size(str(value))
        except ValueError:
            raise _Mismatch("a size HxW (e.g. 320x480) or [H, W]") from None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple((_to_int if kind is int else _to_float)(v) for v in value)
    raise _Mismatch("a size HxW (e.g. 320x480) or [H, W]" if kind is int else "two numbers [MIN, MAX], or none")


def convert_value(value: Any, hint: Any) -> Any:
    """``value`` as the field type ``hint`` says (bool, int, float, str, pairs, optional, dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert_value(value, inner)
    if hint is bool:
        return parse_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch("text")
    if origin is tuple:
        return _to_pair(value, args[0])
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise _Mismatch(f"of type {hint}")


def _at_least(low: float, what: str) -> tuple[Callable[[Any], bool], str]:
    """A rule accepting None (an optional field not set) and values >= ``low``."""
    return (lambda v: v is None or v >= low), what  # `v >= low` is False for NaN


# Range rules by field: (accepts, "what it must be"). Types are checked first, by convert_value.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "workers": _at_least(0, "a whole number >= 0"),
    "batch_size": _at_least(1, "a whole number >= 1"),
    "accumulate": _at_least(1, "a whole number >= 1"),
    "epochs": _at_least(1, "a whole number >= 1 (0 would train nothing)"),
    "iterations": _at_least(1, "a whole number >= 1 (0 would train nothing), or none to train --epochs"),
    "lr": ((lambda v: 0 < v < math.inf), "a number > 0"),
    "momentum": _at_least(0, "a number >= 0"),
    "weight_decay": _at_least(0, "a number >= 0"),
    "color_jitter": _at_least(0, "a number >= 0"),
    "hue_jitter": ((lambda v: 0 <= v <= 0.5), "a number from 0 to 0.5 (turns of the colour wheel)"),
    "copy_paste_prob": ((lambda v: 0 <= v <= 1), "a number from 0 to 1"),
    "warmup_iters": _at_least(0, "a whole number >= 0"),
    "cache_features": _at_least(0, "a whole number >= 0 (0: off)"),
    "checkpoint_every": _at_least(0, "a whole number >= 0 (0: at the end of each epoch only)"),
    "eval_every": _at_least(1, "a whole number >= 1"),
    "save_every": _at_least(1, "a whole number >= 1"),
    "max_val_images": _at_least(1, "a whole number >= 1, or none for all"),
    "crop": ((lambda v: min(v) >= MIN_CROP), f"a size HxW with both sides >= {MIN_CROP} (the output stride)"),
    "scale_range": ((lambda v: v is None or 0 < v[0] <= v[1] < math.inf), "two numbers 0 < MIN <= MAX, or none"),
}


def _check_value(name: str, value: Any) -> None:
    """Raises `_Mismatch` when ``value`` is outside what field ``name`` allows."""
    if name in CHOICES and value not in CHOICES[name]:
        raise _Mismatch(f"one of {', '.join(CHOICES[name])}")
    if name == "model":
        from fcnseg.models import list_models

        if value not in list_models():
            raise _Mismatch(f"one of {', '.join(list_models())}")
    if name == "device":
        from fcnseg.runtime import select_device

        try:
            select_device(value)  # before any data is read: a missing GPU is a usage error
        except (ValueError, RuntimeError) as err:  # OptionError, or torch's RuntimeError for a bad name
            raise OptionError(f"--device {value}: {err}") from None
    accepts, what = _RULES.get(name, (None, ""))
    if accepts is not None and not accepts(value):
        raise _Mismatch(what)


def coerce_values(values: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """``values`` converted to their TrainConfig field types and checked, field by field.

    Args:
        source: where the values come from (a config file's path), named in the error.

    Raises:
        OptionError: naming the key (and the option that sets it), what it must be, and the value.
    """
    hints = typing.get_type_hints(TrainConfig)
    converted = {}
    for name, value in values.items():
        if name not in hints:
            raise OptionError(f"{f'config {source}: ' if source else ''}unknown option {name}")
        try:
            converted[name] = convert_value(value, hints[name])
            _check_value(name, converted[name])
        except _Mismatch as err:
            where = f"config {source}: {name}" if source else f"{name} (--{name.replace('_', '-')})"
            shown = "x".join(map(str, value)) if name == "crop" and isinstance(value, tuple) else repr(value)
            raise OptionError(f"{where} must be {err}, got {shown}") from None
        except OptionError as err:
            if source:
                raise OptionError(f"config {source}: {name}: {err}") from None
            raise
    return converted


def validate_config(config: TrainConfig) -> TrainConfig:
    """Converts every field of ``config`` to its type in place and refuses values out of range."""
    for name, value in coerce_values({f.name: getattr(config, f.name) for f in dataclasses.fields(config)}).items():
        setattr(config, name, value)
    if not 0 <= config.holdout < 1:
        raise OptionError(f"holdout must be a fraction of the training split, 0 <= F < 1 (0: validate on "
                          f"{config.val_split!r}), got {config.holdout}")
    if config.holdout_groups and not config.holdout:
        raise OptionError("--holdout-groups chooses which images --holdout F holds out; give --holdout F too")
    if config.holdout_groups:
        from fcnseg.data.splits import group_pattern

        group_pattern(config.holdout_groups)  # a bad expression is refused before any data is read
    if config.loss != "ce" and (config.d2l_metrics or config.cache_features or config.loss_reduction != "mean"):
        reason = ("the chapter's recipes train with its cross-entropy" if config.d2l_metrics else
                  "--cache-features trains the head with cross-entropy" if config.cache_features else
                  "--loss-reduction d2l is a reduction of the cross-entropy")
        raise OptionError(f"--loss {config.loss} cannot be used here: {reason}; use --loss ce")
    if config.cache_features and not config.freeze_backbone:
        raise OptionError("--cache-features V needs --freeze-backbone: only a frozen body's features can be cached")
    return config


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping of TrainConfig fields (dashes or underscores), converted to the fields' types.

    Raises:
        OptionError: the file is missing or not YAML, or a key is unknown, or a value does not fit its
            field (``epochs: two``, ``hflip: maybe``); the message names the file and the key.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise OptionError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise OptionError(f"config {path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise OptionError(f"config {path}: unknown options {', '.join(unknown)}")
    return coerce_values(data, source=str(path))


def resolve_config(explicit: dict[str, Any], config_file: str | None = None, recipe: str | None = None, *,
                   require_root: bool = True) -> TrainConfig:
    """Merges defaults, recipe, YAML file and explicit options (later wins), converts and validates.

    Args:
        explicit: options given by the caller; None means "not given", the string "none" means None.
        require_root: refuse a config without a dataset root (``--print-config`` shows one anyway).

    Raises:
        OptionError: an unknown recipe, a bad value (named, with what it must be), no root.
    """
    file_values = read_yaml_config(config_file) if config_file else {}
    recipe = recipe or file_values.get("recipe") or "default"
    if recipe not in RECIPES:
        raise OptionError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values: dict[str, Any] = dict(RECIPES[recipe])
    values.update(file_values)
    values.update(coerce_values({k: v for k, v in explicit.items() if v is not None}))
    values["recipe"] = recipe
    config = TrainConfig(**values).validate()
    if require_root and not config.root:
        raise OptionError("no dataset root given (--root DIR)")
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
