"""OpenVINO as an inference engine: the model's ONNX export compiled for the CPU.

The "openvino" engine exports the model to ONNX in memory (the export the "onnxruntime" engine
runs, dynamic batch, height and width; an `OnnxModel`'s file as it is, INT8 QDQ files included),
reads it into OpenVINO and compiles it for the CPU once: the compiled model takes any input size,
so no per-shape cache is needed (measured through the Segmenter: a model reshaped to the input's
static size was no faster). A batch runs image by image: per image, batches of 8 ran 0.9x (this
host) to 0.3x (another) as fast as single images (docs/ENGINES.md).

Precision follows the segmenter's: float32 (OpenVINO's own default on bf16 CPUs is bf16, so
float32 is asked for explicitly), bf16 as the inference precision hint when the segmenter predicts
in bf16 and the CPU computes bf16 natively, fp16 likewise where the CPU has FP16; elsewhere float32
after a one-line warning. Threads follow torch's thread count.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from fcnseg.errors import FcnsegError
from fcnseg.inference.backends import Engine, EngineRequest
from fcnseg.inference.onnx_engine import model_to_onnx, warn_float32

# torch dtype -> (OpenVINO inference precision hint, the CPU capability it needs)
_PRECISIONS = {torch.bfloat16: ("bf16", "BF16"), torch.float16: ("f16", "FP16")}


@functools.cache
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plug-in computes natively here ("FP32", "BF16", "INT8", ...)."""
    return list(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def inference_precision(dtype: torch.dtype | None) -> str:
    """The precision hint for a segmenter's dtype: "f32", or "bf16"/"f16" where the CPU has it."""
    if dtype in (None, torch.float32):
        return "f32"
    hint, capability = _PRECISIONS.get(dtype, (None, None))
    if hint is None or capability not in cpu_capabilities():
        warn_float32("openvino", dtype)
        return "f32"
    return hint


def compile_onnx(model: bytes, precision: str = "f32", threads: int | None = None) -> Any:
    """An ONNX model compiled by OpenVINO for the CPU, for latency, at ``precision``."""
    core = _core()
    try:
        ov_model = core.read_model(model=model)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        return core.compile_model(ov_model, "CPU", config)
    except RuntimeError as err:  # OpenVINO reports conversion and compilation failures as RuntimeError
        raise FcnsegError(f"OpenVINO cannot compile the model: {str(err).strip().splitlines()[0]}") from None


def openvino_engine(request: EngineRequest) -> Engine:
    """The "openvino" engine: the model's ONNX export compiled by OpenVINO for the CPU.

    ``compile`` changes nothing: OpenVINO always compiles.
    """
    import onnx  # noqa: F401  (fail first, so that a missing package is named before any work)
    import openvino  # noqa: F401

    precision = inference_precision(request.dtype)
    compiled = compile_onnx(model_to_onnx(request.model), precision)
    device = request.device

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = None
        for i in range(len(array)):
            # share_outputs: a view of OpenVINO's output, copied once, into the batch's logits
            result = compiled(array[i:i + 1], share_outputs=True)[0]
            if logits is None:
                logits = np.empty((len(array), *result.shape[1:]), dtype=np.float32)
            logits[i] = result[0]
        return torch.from_numpy(logits).to(device)

    return run


__all__ = ["compile_onnx", "cpu_capabilities", "inference_precision", "openvino_engine"]
