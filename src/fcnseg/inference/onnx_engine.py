"""ONNX Runtime as an inference engine, and exported ONNX files (INT8 ones too) as segmenters.

The "onnxruntime" engine exports the segmenter's model to ONNX in memory (`fcnseg.export.onnx`,
dynamic batch, height and width) and runs it with onnxruntime's CPU provider, with as many threads
as torch uses. onnxruntime runs float32 only on the CPU: a segmenter whose precision is bf16 or fp16
(``amp="auto"`` resolves to bf16 on CPUs with native bf16) runs float32 here, after a one-line
warning, rather than failing, because that is what it would compute with ``amp="none"`` too.

`onnx_segmenter` turns an ``.onnx`` file written by ``fcnseg export`` (float32 or the INT8 file of
``--int8``) into a `Segmenter` with the classes, colours and normalisation stored in its metadata:
every Segmenter feature (sliding windows, flip, any image size) then runs on that file.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.errors import FcnsegError, UsageError
from fcnseg.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, read_onnx_metadata
from fcnseg.export.subpixel import subpixel_form
from fcnseg.inference.backends import Engine, EngineRequest
from fcnseg.inference.segmenter import Segmenter
from fcnseg.runtime import int8_needs_reduced_range


class OnnxModel(nn.Module):
    """An exported ONNX model as a module: ``forward`` runs it in onnxruntime (CPU).

    The "onnxruntime" and "openvino" engines run its file as it is instead of exporting a model;
    with the "torch" engine it is called directly.

    Args:
        path: an ``.onnx`` file with input ``image`` and output ``logits`` (as ``fcnseg export`` writes).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"ONNX model {self.path} does not exist; give a file written by fcnseg export")
        self._session = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            self._session = new_session(self.path)
        return run_session(self._session, image, image.device)


def model_to_onnx(model: nn.Module) -> bytes:
    """The serialised ONNX graph of a model (dynamic N, H, W); an `OnnxModel`'s file as it is.

    The upsamplers are exported in their sub-pixel form (`fcnseg.export.subpixel`: a convolution
    and a depth-to-space, which onnxruntime and OpenVINO run faster than their ``ConvTranspose``).
    The legacy (TorchScript) exporter is tried first: it exports an FCN in about 2 s where the
    dynamo exporter takes about 30 s (both match PyTorch to ~1e-6); dynamo is the fallback.

    Raises:
        FcnsegError: neither exporter can export the model.
    """
    if isinstance(model, OnnxModel):
        return model.path.read_bytes()
    model = subpixel_form(model)
    with tempfile.TemporaryDirectory(prefix="fcnseg-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(model, path, verify=False, exporter="legacy")
        except FcnsegError:
            export_onnx(model, path, verify=False, exporter="dynamo")
        return path.read_bytes()


def new_session(model: bytes | str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of a model, with ``threads`` (default: torch's thread count) threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        where = "the exported model" if isinstance(model, bytes) else str(model)
        raise FcnsegError(f"onnxruntime cannot load {where}: {str(err).strip().splitlines()[0]}") from None


def run_session(session: Any, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits of a normalised batch from an onnxruntime session, as float32 on ``device``."""
    array = image.detach().to("cpu", torch.float32).contiguous().numpy()
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: array})
    return torch.from_numpy(logits).to(device)


def warn_float32(engine: str, dtype: torch.dtype | None) -> None:
    """The one-line warning of an engine that runs float32 where the segmenter asked for ``dtype``."""
    name = str(dtype).removeprefix("torch.")
    warnings.warn(f"the {engine} engine runs float32 here, not {name} (pass amp='none' to ask for float32)",
                  RuntimeWarning, stacklevel=5)  # the caller of Segmenter(...)


def onnxruntime_engine(request: EngineRequest) -> Engine:
    """The "onnxruntime" engine: the model exported to ONNX in memory, run on the CPU in float32.

    ``compile`` changes nothing: onnxruntime optimises the graph when it loads it anyway.
    """
    import onnx  # noqa: F401  (fail first, so that a missing package is named before any work)
    import onnxruntime  # noqa: F401

    if request.dtype not in (None, torch.float32):
        warn_float32("onnxruntime", request.dtype)
    session = new_session(model_to_onnx(request.model))
    device = request.device
    return lambda image: run_session(session, image, device)


def warn_if_int8_overflows(path: Path, metadata: dict[str, Any]) -> None:
    """A one-line warning when an INT8 file's 8-bit weights meet a CPU whose int8 kernels overflow on them."""
    quantization = metadata.get("quantization")
    if not isinstance(quantization, dict) or quantization.get("reduce_range") or not int8_needs_reduced_range():
        return
    warnings.warn(f"{path} holds 8-bit INT8 weights, which the int8 kernels of this CPU (x86 without VNNI) "
                  "overflow: expect many pixels to differ from float32; export it again on this machine "
                  "(fcnseg export --int8 writes 7-bit weights here) or use the float32 file",
                  RuntimeWarning, stacklevel=3)


def onnx_segmenter(path: str | os.PathLike, device: str | torch.device | None = "cpu", **options) -> Segmenter:
    """A `Segmenter` over an exported ONNX file, with the classes, colours and statistics it stores.

    Args:
        path: an ``.onnx`` file written by ``fcnseg export`` (float32, or INT8 with ``--int8``).
        device: where the segmenter's tensors live; the engine computes on the CPU.
        **options: as `Segmenter` (``mode``, ``window``, ``flip``, ``batch_size``...); ``backend``
            is "onnxruntime" unless given ("openvino" runs the same file), ``amp`` "none".

    Raises:
        UsageError: the file does not exist or holds no fcnseg metadata.
    """
    model = OnnxModel(path)
    metadata = read_onnx_metadata(model.path)
    missing = [key for key in ("classes", "colors", "mean", "std") if key not in metadata]
    if missing:
        raise UsageError(f"{model.path} holds no fcnseg metadata ({', '.join(missing)} missing); "
                         "export it with fcnseg export")
    warn_if_int8_overflows(model.path, metadata)
    options.setdefault("backend", "onnxruntime")
    options.setdefault("amp", "none")
    return Segmenter(model, metadata["classes"], metadata["colors"], metadata["mean"], metadata["std"], device,
                     ignore_index=int(metadata.get("ignore_index", 255)), optimize=False, **options)


__all__ = ["OnnxModel", "model_to_onnx", "new_session", "onnx_segmenter", "onnxruntime_engine", "run_session",
           "warn_if_int8_overflows"]
