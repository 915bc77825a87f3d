"""The "torch-int8" engine: PyTorch's own static INT8 (PT2E, torchao's x86 inductor quantizer).

The model is captured with `torch.export`, observers are inserted by torchao's
``X86InductorQuantizer`` (per-channel int8 weights, uint8 activations), calibrated on the
segmenter's calibration images, converted, and compiled by inductor with freezing (which lowers
the quantize/dequantize pairs around each convolution to oneDNN int8 kernels). An exported graph
has fixed shapes, so the engine builds one quantised model per input shape it meets, each
calibrated on the calibration images resized to that shape. Measured on the recommended CamVid
model (docs/ENGINES.md): 1.6x torch fp32 and 1.2x torch bf16 at batch 1 on 2 cores with VNNI.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import FcnsegError, OptionError
from fcnseg.inference.backends import EngineRequest, FrozenCompiled
from fcnseg.inference.onnx_engine import warn_float32
from fcnseg.models.inference_form import unfuse_activations


def quantizer_modules() -> tuple[Any, Any]:
    """torchao's ``quantize_pt2e`` and ``x86_inductor_quantizer`` modules (the extra ``[int8]``)."""
    from torchao.quantization.pt2e import quantize_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    return quantize_pt2e, x86_inductor_quantizer


class Pt2eInt8(nn.Module):
    """One INT8 model per input shape, built on first sight of the shape (see the module's text)."""

    def __init__(self, model: nn.Module, calibration: list[torch.Tensor]) -> None:
        super().__init__()
        self.model = unfuse_activations(copy.deepcopy(model))  # the quantizer matches Conv2d + ReLU by type
        self.calibration = calibration
        self.built: dict[tuple[int, ...], nn.Module] = {}

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        if shape not in self.built:
            self.built[shape] = self.build(shape)
        with torch.autocast(batch.device.type, enabled=False):  # int8 inside, float32 around it
            return self.built[shape](batch.float())

    def build(self, shape: tuple[int, ...]) -> nn.Module:
        quantize_pt2e, x86 = quantizer_modules()
        example = torch.zeros(shape)
        with torch.inference_mode(False), torch.no_grad():
            try:
                captured = torch.export.export(self.model, (example,)).module()
                quantizer = x86.X86InductorQuantizer()
                quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
                prepared = quantize_pt2e.prepare_pt2e(captured, quantizer)
                for image in self.calibration:
                    resized = F.interpolate(image, size=shape[-2:], mode="bilinear", align_corners=False)
                    prepared(resized.expand(shape[0], -1, -1, -1).contiguous())
                converted = quantize_pt2e.convert_pt2e(prepared)
            except Exception as err:  # export and quantisation fail in many ways; all mean "not this model"
                raise FcnsegError(f"backend 'torch-int8' cannot quantise this model: {err.__class__.__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from err
        return FrozenCompiled(torch.compile(converted))


def pt2e_int8_engine(request: EngineRequest) -> Pt2eInt8:
    """The "torch-int8" engine for ``request`` (CPU, calibration images given); a bf16/fp16
    segmenter gets int8 with float32 around it, after a warning.

    Raises:
        OptionError: no calibration images, or a GPU.
    """
    quantizer_modules()  # a missing torchao shows here, as the extra to install
    if not request.calibration:
        raise OptionError("backend 'torch-int8' needs calibration images: --calibration DIR (a folder of "
                          "images like those you will segment)")
    if request.device.type != "cpu":
        raise OptionError(f"backend 'torch-int8' runs on the CPU only, not {request.device}")
    if request.dtype is not None:
        warn_float32("torch-int8", request.dtype)
    return Pt2eInt8(request.model, [image.float().cpu() for image in request.calibration])
