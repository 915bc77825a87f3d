"""Inference engines behind `Segmenter`: who runs the model's forward pass.

An engine is a callable from a normalised batch ``(N, 3, H, W)`` float32 to logits
``(N, C, H, W)`` of the same height and width, as the PyTorch model is; `fcnseg.inference.windows`
calls it for whole images and for windows alike, so every engine gets whole-image, sliding-window
and flip prediction for free. "torch" is the model itself (optionally `torch.compile`d); other
engines (ONNX Runtime, OpenVINO, JAX) register a factory here from their own modules, which import
their optional packages only when built. "auto" picks the fastest installed engine for the
segmenter's precision by the measured order `AUTO_ORDER` (docs/ENGINES.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fcnseg.errors import FcnsegError, OptionError

Engine = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EngineRequest:
    """What a factory needs to build an engine for one segmenter.

    Attributes:
        model: the FCN (inference form when the segmenter optimises), in eval mode, on ``device``.
        device: where the segmenter's tensors live.
        dtype: the autocast dtype the segmenter predicts with (None for float32); an engine that
            cannot run it raises `OptionError`.
        compile: compile the engine's graph where the engine has such a step.
        calibration: normalised images ``(1, 3, H, W)`` for engines that quantise (``torch-int8``).
    """

    model: nn.Module
    device: torch.device
    dtype: torch.dtype | None
    compile: bool = False
    calibration: tuple[torch.Tensor, ...] = ()


Factory = Callable[[EngineRequest], Engine]

# name -> "module:function" of its factory; imported on first use so that optional engines cost
# nothing until asked for. Extras name the pip extra that installs what the engine needs.
_FACTORIES: dict[str, str] = {
    "torch": "fcnseg.inference.backends:torch_engine",
    "auto": "fcnseg.inference.backends:auto_engine",
    "onnxruntime": "fcnseg.inference.onnx_engine:onnxruntime_engine",
    "openvino": "fcnseg.inference.openvino_engine:openvino_engine",
    "jax": "fcnseg.jax_backend.engine:jax_engine",
    "torch-int8": "fcnseg.inference.pt2e_engine:pt2e_int8_engine",
}
_EXTRAS: dict[str, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino", "jax": "jax", "torch-int8": "int8"}
# The package each optional engine imports: "auto" considers an engine installed when it is found.
_PACKAGES: dict[str, str] = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

# "auto": per precision the engines in order of speed on the CPU, the first installed one wins.
# The order is the measurement of benchmarks/bench_engines.py (docs/ENGINES.md): the recommended
# CamVid model (MobileNetV2 FCN-8s, 360x480, batch 1) on 2 cores with native bf16.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "float32": ("openvino", "torch"),
    "bfloat16": ("openvino", "torch"),
    "float16": ("torch",),
}


def register_backend(name: str, factory: str, extra: str | None = None) -> None:
    """Makes ``name`` an engine choice; ``factory`` is ``"module:function"`` taking an `EngineRequest`."""
    _FACTORIES[name] = factory
    if extra:
        _EXTRAS[name] = extra


def backend_names() -> list[str]:
    """The engine choices, "torch" first."""
    return list(_FACTORIES)


def make_engine(name: str, request: EngineRequest) -> Engine:
    """The engine ``name`` built for ``request``.

    Raises:
        OptionError: an unknown name, or an engine whose optional package is not installed (the
            message names the pip extra).
    """
    if name not in _FACTORIES:
        raise OptionError(f"unknown backend {name!r}; choose one of {', '.join(_FACTORIES)}")
    module_name, function = _FACTORIES[name].split(":")
    try:
        factory: Factory = getattr(importlib.import_module(module_name), function)
        return factory(request)
    except ModuleNotFoundError as err:
        extra = _EXTRAS.get(name, name)
        raise OptionError(f"backend {name!r} needs the package {err.name!r}: "
                          f"pip install 'fcnseg[{extra}]'") from None


def auto_choice(device: torch.device, dtype: torch.dtype | None) -> str:
    """The engine "auto" builds: the first installed engine of `AUTO_ORDER` for the precision on the
    CPU; "torch" on GPUs (the other engines run on the CPU only here) and when none is installed."""
    if device.type != "cpu":
        return "torch"
    precision = str(dtype or torch.float32).removeprefix("torch.")
    for name in AUTO_ORDER.get(precision, ("torch",)):
        if name == "torch" or importlib.util.find_spec(_PACKAGES.get(name, name)) is not None:
            return name
    return "torch"


def auto_engine(request: EngineRequest) -> Engine:
    """The "auto" engine: `auto_choice`'s engine, or "torch" (after a one-line warning) when that
    engine cannot take the model (a model the ONNX exporter cannot export). With ``compile``
    "torch": compiling asks for ``torch.compile``, which only the torch engine does."""
    name = "torch" if request.compile else auto_choice(request.device, request.dtype)
    if name == "torch":
        return torch_engine(request)
    try:
        return make_engine(name, request)
    except FcnsegError as err:
        warnings.warn(f"backend 'auto': {name} cannot run this model ({err}); using torch", RuntimeWarning,
                      stacklevel=2)
        return torch_engine(request)


class FrozenCompiled(nn.Module):
    """A compiled module called with inductor's freezing on.

    An `nn.Module`, as the torch engine is, so that `Segmenter` knows torch computes and leaves its
    threads alone (it keeps torch single-threaded only while a foreign engine runs).
    """

    def __init__(self, compiled: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config  # torch's documented switch for freezing

        with inductor_config.patch(freezing=True):
            return self.compiled(batch)


def torch_engine(request: EngineRequest) -> Engine:
    """The model itself; with ``compile``, `torch.compile` of it (shapes may vary between calls).

    Compiled, every call runs with inductor's freezing on: the weights become constants, so
    inductor folds them into prepacked oneDNN convolutions (without it the compiled model ran
    slower than eager on the CPU). Freezing only applies to inference, which is all an engine does.
    """
    if not request.compile:
        return request.model
    return FrozenCompiled(torch.compile(request.model, dynamic=None))
