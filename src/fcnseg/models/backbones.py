"""torchvision classification bodies as FCN feature extractors with taps at strides 2, 4, 8, 16 and 32.

ImageNet weights come from torchvision's weights enums when online, or from a local state-dict
file (loaded strictly, ``weights_only=True``) when not. This module knows nothing of datasets,
training or the CLI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Union

import torch
import torchvision
from torch import nn

from fcnseg.errors import WeightsError
from fcnseg.models.depthwise_conv import use_spread_gradients

WeightsArg = Union[str, os.PathLike, None]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one torchvision body and where its FCN taps are."""

    builder: Callable[..., nn.Module]
    weights_enum: type
    channels: tuple[int, int, int, int, int]  # channels at strides 2, 4, 8, 16, 32


BACKBONES: Mapping[str, BackboneSpec] = MappingProxyType({
    "resnet18": BackboneSpec(torchvision.models.resnet18, torchvision.models.ResNet18_Weights, (64, 64, 128, 256, 512)),
    "resnet34": BackboneSpec(torchvision.models.resnet34, torchvision.models.ResNet34_Weights, (64, 64, 128, 256, 512)),
    "resnet50": BackboneSpec(torchvision.models.resnet50, torchvision.models.ResNet50_Weights,
                             (64, 256, 512, 1024, 2048)),
    "mobilenet_v2": BackboneSpec(torchvision.models.mobilenet_v2, torchvision.models.MobileNet_V2_Weights,
                                 (16, 24, 32, 96, 1280)),
})

# MobileNetV2 `features` indices that end each stride: [0, 7) -> 8, [7, 14) -> 16, [14, 19) -> 32.
_MOBILENET_STAGE_ENDS = (7, 14, 19)
# How many children of ``stage8`` make the stride-2 and stride-4 taps: ResNet's conv1, bn1, relu
# (stride 2), then maxpool and layer1 (stride 4); MobileNetV2's features[:2] (its last stride-2 block,
# 16 channels) and features[:4] (its last stride-4 block, 24 channels).
_EARLY_TAP_ENDS = {"resnet": (3, 5), "mobilenet": (2, 4)}


class Backbone(nn.Module):
    """A classification body split into three stages ending at strides 8, 16 and 32.

    ``forward`` returns five feature maps ``(c2, c4, c8, c16, c32)``; for ResNet ``c2`` is the stem's
    ReLU and the others the outputs of layer1, layer2, layer3 and layer4 (the chapter's body is
    everything up to layer4, without avgpool and fc). ``c2`` and ``c4`` are read inside ``stage8``
    (after its first ``early_tap_ends`` children), so the state-dict keys are those of the three
    stages; only FCN-2s and FCN-4s use them. ``channels`` lists the five maps' channels. ``body`` is the torchvision module whose state dict ImageNet files describe.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        self.name = name
        self.channels = BACKBONES[name].channels
        net = BACKBONES[name].builder(weights=None)
        self.early_tap_ends = _EARLY_TAP_ENDS["resnet" if name.startswith("resnet") else "mobilenet"]
        if name.startswith("resnet"):
            self.stage8 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
            self.stage16 = net.layer3
            self.stage32 = net.layer4
        else:
            f = net.features
            a, b, c = _MOBILENET_STAGE_ENDS
            self.stage8 = nn.Sequential(*f[:a])
            self.stage16 = nn.Sequential(*f[a:b])
            self.stage32 = nn.Sequential(*f[b:c])
            use_spread_gradients(self)  # its strided depthwise layers: a faster bf16 backward on CPU
        # Kept only to map torchvision's key names onto ours; not registered as a submodule.
        self._keymap = _torchvision_key_map(net, self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c8, early = x, []
        for index, layer in enumerate(self.stage8):
            c8 = layer(c8)
            if index + 1 in self.early_tap_ends:
                early.append(c8)
        c16 = self.stage16(c8)
        c32 = self.stage32(c16)
        return (*early, c8, c16, c32)

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Loads a torchvision state dict of the whole classifier or of its body, strictly.

        Classifier heads (ResNet ``fc``, MobileNetV2 ``classifier``) are dropped; MobileNetV2 files
        may hold ``features`` alone (keys ``0.0.weight`` ...) or the whole model.

        Raises:
            WeightsError: keys are missing or unexpected, or a shape differs; names them.
        """
        expected = set(self._keymap)
        keys = dict(state_dict)
        if self.name == "mobilenet_v2" and not any(k.startswith("features.") for k in keys):
            keys = {f"features.{k}": v for k, v in keys.items()}
        head_prefixes = ("fc.", "classifier.")
        keys = {k: v for k, v in keys.items() if not k.startswith(head_prefixes)}
        missing = sorted(expected - set(keys))
        unexpected = sorted(set(keys) - expected)
        if missing or unexpected:
            raise WeightsError(
                f"{source} does not match torchvision's {self.name}: "
                f"{len(missing)} missing keys {_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}"
            )
        ours = self.state_dict()
        converted = {}
        for tv_key, value in keys.items():
            our_key = self._keymap[tv_key]
            if ours[our_key].shape != value.shape:
                raise WeightsError(
                    f"{source}: {tv_key} has shape {tuple(value.shape)}, {self.name} expects {tuple(ours[our_key].shape)}"
                )
            converted[our_key] = value
        self.load_state_dict(converted, strict=True)


def _preview(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def _torchvision_key_map(net: nn.Module, backbone: Backbone) -> dict[str, str]:
    """torchvision state-dict key -> our key, matched by tensor identity."""
    by_id = {}
    for key, tensor in backbone.state_dict(keep_vars=True).items():
        by_id[id(tensor)] = key
    mapping = {}
    for key, tensor in net.state_dict(keep_vars=True).items():
        if id(tensor) in by_id:
            mapping[key] = by_id[id(tensor)]
    return mapping


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors``.

    Raises:
        WeightsError: the file is missing, unreadable or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad files
        raise WeightsError(f"cannot read backbone weights {path}: {err.__class__.__name__}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return state


def build_backbone(name: str, weights: WeightsArg = None) -> Backbone:
    """Builds a body and loads ImageNet weights.

    Args:
        name: "resnet18", "resnet34", "resnet50" or "mobilenet_v2".
        weights: "DEFAULT" or an enum member name such as "IMAGENET1K_V1" (torchvision's weights,
            downloaded once into the torch hub cache), a path to a local state-dict file, or None
            for random initialisation.
    """
    backbone = Backbone(name)
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return backbone
    spec = BACKBONES[name]
    if isinstance(weights, str) and (weights == "DEFAULT" or hasattr(spec.weights_enum, weights)):
        backbone.load_torchvision_state_dict(_download_torchvision_weights(spec, weights, name), f"torchvision {name} {weights}")
        return backbone
    path = Path(weights)
    if not path.exists():
        raise WeightsError(
            f"backbone weights {str(weights)!r} are neither a torchvision enum name (DEFAULT, "
            f"{', '.join(m.name for m in spec.weights_enum)}) nor an existing file"
        )
    backbone.load_torchvision_state_dict(load_weights_file(path), str(path))
    return backbone


def _download_torchvision_weights(spec: BackboneSpec, member: str, name: str) -> dict[str, torch.Tensor]:
    enum_member = spec.weights_enum.DEFAULT if member == "DEFAULT" else spec.weights_enum[member]
    try:
        return enum_member.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # URLError, socket errors, hash mismatch...
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum_member.url).name
        raise WeightsError(
            f"cannot get torchvision's ImageNet weights for {name} ({enum_member}): "
            f"{err.__class__.__name__}: {err}.\n"
            f"  Without network access, download {enum_member.url} elsewhere and either put it at {cache} "
            f"(torch's cache) or pass its path: --weights-backbone /path/to/{Path(enum_member.url).name} "
            f"(Python: weights_backbone='/path/to/file.pth'); or train from scratch with --weights-backbone none."
        ) from None
