"""A checkpoint as a model folder in the Hugging Face convention (``fcnseg export --format hf``).

The folder holds ``model.safetensors`` (the state dict), ``config.json`` (everything needed to rebuild
the model and predict with it: `fcnseg.models.model_folder` reads it back) and ``README.md``, a model
card with YAML front matter (licence, library, task, tags) as the Hub shows it, the metrics stored in
the checkpoint, the training command and config, and the data. Upload it as it is
(``huggingface-cli upload owner/name DIR``); `Segmenter.from_pretrained` loads it from a folder or
from the Hub. Only tensors and JSON: loading it runs no code.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from fcnseg.errors import OptionError
from fcnseg.models.checkpoint import load_checkpoint
from fcnseg.models.model_folder import CARD_NAME, CONFIG_NAME, FOLDER_FORMAT, FOLDER_VERSION, WEIGHTS_NAME
from fcnseg.runtime import atomic_write

DEFAULT_LICENSE = "unknown"
METRIC_NAMES = {"pixel_acc": "pixel accuracy", "mean_acc": "mean accuracy", "miou": "mean IoU",
                "fwiou": "frequency-weighted IoU"}


def export_model_folder(checkpoint: str | os.PathLike | dict[str, Any], out: str | os.PathLike, *,
                        license: str = DEFAULT_LICENSE) -> dict[str, Any]:  # noqa: A002 (the Hub's field name)
    """Writes the model folder of a checkpoint (each file atomically).

    Args:
        checkpoint: a checkpoint file, a model folder, or a loaded checkpoint dict.
        out: the folder: new, empty, or an earlier model folder (its files are replaced).
        license: the card's ``license:`` field, a Hub licence id ("mit", "apache-2.0", "cc-by-4.0",
            "other"...); "unknown" by default, since the weights' terms follow from their training data.

    Returns:
        ``{"path", "files", "num_classes", "parameters"}``.

    Raises:
        OptionError: ``out`` is a file, or a folder holding other files.
        CheckpointError: the checkpoint cannot be read.
    """
    from safetensors.torch import save

    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    out = _checked_folder(Path(out))
    config = model_config(checkpoint)
    # Contiguous copies: safetensors refuses tensors that share memory or are views.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in checkpoint["state_dict"].items()}
    atomic_write(out / WEIGHTS_NAME, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    atomic_write(out / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2, allow_nan=False) + "\n").encode()))
    atomic_write(out / CARD_NAME, lambda f: f.write(model_card(checkpoint, config, license=license).encode()))
    return {"path": out, "files": [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME], "num_classes": len(config["classes"]),
            "parameters": sum(t.numel() for t in tensors.values())}


def _checked_folder(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file; give a folder for the model (a new or an empty one)")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME))
        if others:
            raise OptionError(f"--out {out} holds other files ({', '.join(others[:3])}); give a new or empty "
                              "folder, or an earlier model folder to replace")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(f"--out {out}: cannot create the folder ({err.strerror or err})") from None
    return out


def model_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint: what rebuilding and predicting need, and what it was trained on."""
    kwargs = dict(checkpoint["model_kwargs"], weights_backbone=None)
    training = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    crop = (training or {}).get("crop")
    return {
        "format": FOLDER_FORMAT, "format_version": FOLDER_VERSION, "library_name": "fcnseg",
        "model_name": checkpoint["model_name"], "model_kwargs": kwargs,
        "body": checkpoint["model_name"].removeprefix("fcn_"), "variant": kwargs.get("variant"),
        "num_classes": len(checkpoint["classes"]), "upsampler_bias": bool(kwargs.get("upsampler_bias", False)),
        "classes": list(checkpoint["classes"]), "colors": [list(map(int, c)) for c in checkpoint["colors"]],
        "mean": list(checkpoint["mean"]), "std": list(checkpoint["std"]), "ignore_index": checkpoint["ignore_index"],
        "crop": list(crop) if crop else None,
        "metrics": _plain(checkpoint.get("metrics")), "training_config": _plain(training),
    }


def _plain(value: Any) -> Any:
    """Strict-JSON data: tuples as lists, NaN and infinities (an IoU of a class never seen) as null,
    anything else JSON cannot hold as its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def model_card(checkpoint: dict[str, Any], config: dict[str, Any], *, license: str = DEFAULT_LICENSE) -> str:  # noqa: A002
    """The README.md of a model folder: Hub front matter, usage, classes, metrics, training and data."""
    front = {"license": license, "library_name": "fcnseg", "pipeline_tag": "image-segmentation",
             "tags": ["semantic-segmentation", "fcn", config["body"]]}
    title = f"FCN-{config['variant']} with a {config['body']} body, {config['num_classes']} classes"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             "A fully convolutional network for semantic segmentation, exported by `fcnseg export --format hf`.",
             "", "## Usage", "", "```python", "from fcnseg import Segmenter", "",
             'segmenter = Segmenter.from_pretrained("path/or/owner-name")', 'label = segmenter.predict("photo.jpg")  '
             "# (H, W) class ids", "```", "", "```bash", "fcnseg predict path/to/this/folder photos/ --out predictions/",
             "```", "", "## Classes", "", "| id | class | colour (RGB) |", "|---|---|---|"]
    lines += [f"| {i} | {name} | {tuple(color)} |" for i, (name, color) in enumerate(zip(config["classes"],
                                                                                          config["colors"]))]
    lines += ["", f"Input: RGB scaled to 0..1, normalised with mean {config['mean']} and std {config['std']}; "
              f"void label {config['ignore_index']}; training crop {config['crop'] or 'unknown'}.", ""]
    lines += _metrics_section(config.get("metrics")) + _training_section(config.get("training_config"))
    lines += ["## Licence", "", f"`{license}`: set with `fcnseg export --format hf --license ID`. The weights' terms "
              "also follow from those of the training data.", ""]
    return "\n".join(lines)


def _metrics_section(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["## Metrics", "", "The checkpoint holds no validation metrics.", ""]
    lines = ["## Metrics", "", "On the validation split of the training run (void pixels excluded):", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {metrics[key]:.4f} |" for key, label in METRIC_NAMES.items()
              if isinstance(metrics.get(key), (int, float))]
    per_class = metrics.get("per_class_iou")
    if isinstance(per_class, dict) and per_class:
        lines += ["", "| class | IoU |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" if isinstance(value, (int, float)) else f"| {name} | n/a |"
                  for name, value in per_class.items()]
    return [*lines, ""]


def _training_section(training: dict[str, Any] | None) -> list[str]:
    if not training:
        return ["## Training", "", "The checkpoint holds no training config.", ""]
    data = ", ".join(f"{key} `{training[key]}`" for key in ("dataset", "root", "train_split", "val_split")
                     if training.get(key) not in (None, ""))
    return ["## Training", "", "Trained with fcnseg; to train it again, save the config below as `config.yaml`, "
            "then:", "", "```bash", "fcnseg train --config config.yaml", "```", "", "```yaml",
            yaml.safe_dump(training, sort_keys=False).strip(), "```", "", "## Data", "", f"{data or 'not recorded'}.", ""]
