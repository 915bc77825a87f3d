"""INT8 ONNX: static quantisation calibrated on the user's images, with onnxruntime's tools.

`export_int8` exports the float32 ONNX model (`fcnseg.export.onnx`, checked against PyTorch), lets
onnxruntime's ``quant_pre_process`` fold and infer shapes, and ``quantize_static`` it: weights int8
per output channel (7-bit by default on x86 CPUs without VNNI, whose int8 kernels overflow on
8-bit weights: `fcnseg.runtime.int8_needs_reduced_range`), activations uint8 with ranges (MinMax)
observed on the calibration images, in
the QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised operator, the format
onnxruntime's and OpenVINO's CPU kernels fuse into int8 convolutions), the output dequantised after
the last upsampler's data movement (`fcnseg.export.qdq_tail`). The calibration images are
preprocessed as `Segmenter` preprocesses photos (read upright, RGB 0..1, normalised with the
model's mean and std, at their own size), so the observed ranges are those prediction meets.

The file keeps the float32 model's contract and metadata (input ``image`` (N, 3, H, W) with dynamic
N, H, W; output ``logits``; classes, colours, mean, std), plus ``quantization``. Run it with
`fcnseg.inference.onnx_engine.onnx_segmenter` (every Segmenter mode), or with onnxruntime alone as
docs/INFERENCE.md shows for the float32 file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fcnseg.constants import IMAGE_EXTENSIONS
from fcnseg.data.io import image_to_tensor, list_images
from fcnseg.errors import DataError, FcnsegError, UsageError
from fcnseg.export.onnx import INPUT_NAME, OUTPUT_NAME, Exporter, export_onnx, read_onnx_metadata
from fcnseg.export.qdq_tail import dequantize_outputs_last
from fcnseg.export.subpixel import subpixel_form
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.runtime import atomic_write, int8_needs_reduced_range

DEFAULT_CALIBRATION_IMAGES = 64
_AGREEMENT_IMAGES = 8  # calibration images on which the report compares INT8 with float32


def calibration_files(folder: str | os.PathLike, count: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``count`` image files of a folder, spread evenly over its sorted listing.

    Spread rather than the first ``count``: a folder sorted by name often holds sequences (video
    frames, one scene after another), and the ranges should see all of them.

    Raises:
        UsageError: the folder is missing, not a folder, or holds no image files; ``count`` < 1.
    """
    folder = Path(folder)
    if count < 1:
        raise UsageError(f"--calibration-images must be positive, got {count}")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UsageError(f"calibration folder {folder} {what}; give a folder of images like those you will segment")
    files = list_images(folder)
    if not files:
        raise UsageError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "give a folder of images like those you will segment")
    if len(files) <= count:
        return files
    return [files[int(i)] for i in np.linspace(0, len(files) - 1, count).round()]


def calibration_batches(files: Sequence[Path], mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """The readable files as model inputs ``(1, 3, H, W)`` float32, normalised as `Segmenter` does.

    Raises:
        UsageError: none of the files can be read as an image.
    """
    mean_t = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
    std_t = torch.tensor([float(s) for s in std]).view(3, 1, 1)
    batches, unreadable = [], []
    for path in files:
        try:
            batches.append(((image_to_tensor(path) - mean_t) / std_t)[None].numpy())
        except DataError:
            unreadable.append(path.name)
    if not batches:
        raise UsageError(f"none of the {len(files)} calibration images can be read (e.g. {unreadable[0]}); "
                         "give a folder of readable images")
    return batches


def export_int8(
    model_or_checkpoint: nn.Module | str | os.PathLike | dict,
    path: str | os.PathLike,
    calibration: str | os.PathLike,
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    verify: bool = True,
    reduce_range: bool | None = None,
    **export_options: Any,
) -> dict[str, Any]:
    """Writes an INT8 ONNX model statically quantised on the images of a calibration folder.

    The file is written atomically, and only when everything succeeded: a failed or interrupted
    export leaves no file (and an existing one as it was).

    Args:
        model_or_checkpoint: an FCN module, or a checkpoint (path or loaded dict).
        path: the ``.onnx`` file to write.
        calibration: a folder of images like those the model will segment.
        calibration_images: how many of its images calibrate (spread over the folder).
        exporter, opset, verify: as `export_onnx` for the float32 model quantised.
        reduce_range: 7-bit weights (True) or 8-bit (False); None: 7-bit where this CPU needs it
            (`fcnseg.runtime.int8_needs_reduced_range`), so the file suits the machine exporting it.
        **export_options: more of `export_onnx`'s options: ``classes``, ``colors``, ``mean``,
            ``std``, ``dynamic``, ``sizes``, ``tolerance``.

    Returns:
        A report: ``path``, ``num_classes``, ``calibration_images`` (used), ``unreadable``,
        ``fp32_bytes``, ``int8_bytes``, ``agreement`` (INT8 and float32 argmax on the same pixels
        of up to 8 calibration images), ``reduce_range``, ``fp32`` (`export_onnx`'s report).

    Raises:
        UsageError: missing or empty calibration folder, or no readable image in it.
        FcnsegError: onnx/onnxruntime missing, the export or the quantisation failed.
    """
    files = calibration_files(calibration, calibration_images)
    quantization = _require_quantization()
    if reduce_range is None:
        reduce_range = int8_needs_reduced_range()
    with tempfile.TemporaryDirectory(prefix="fcnseg-int8-") as folder:
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        options = {"opset": opset} if opset is not None else {}
        model = _subpixel_model(model_or_checkpoint, export_options)
        fp32_report = export_onnx(model, fp32_path, exporter=exporter, verify=verify, **options, **export_options)
        stored = read_onnx_metadata(fp32_path)
        batches = calibration_batches(files, stored["mean"], stored["std"])
        _quantize(quantization, fp32_path, int8_path, batches, Path(folder), reduce_range)
        _dequantize_last(int8_path)
        agreement = _agreement(fp32_path, int8_path, batches[:_AGREEMENT_IMAGES])
        data = _with_metadata(fp32_path, int8_path, len(batches), reduce_range)
        atomic_write(path, lambda f: f.write(data))
        return {"path": str(path), "num_classes": fp32_report["num_classes"], "calibration_images": len(batches),
                "unreadable": len(files) - len(batches), "fp32_bytes": fp32_path.stat().st_size,
                "int8_bytes": len(data), "agreement": agreement, "reduce_range": reduce_range, "fp32": fp32_report}


def _subpixel_model(source: nn.Module | str | os.PathLike | dict, export_options: dict[str, Any]) -> nn.Module:
    """The model to quantise, its upsamplers in sub-pixel form (`fcnseg.export.subpixel`: a
    convolution onnxruntime quantises to int8, where its ``ConvTranspose`` has no int8 kernel and
    took half of the INT8 model's time); a checkpoint's classes, colours, mean and std go into
    ``export_options`` unless given there."""
    if isinstance(source, nn.Module):
        return subpixel_form(getattr(source, "module", source)).cpu().float().eval()  # a copy: the caller's stays
    checkpoint = source if isinstance(source, dict) else load_checkpoint(source)
    for key in ("classes", "colors", "mean", "std"):
        if checkpoint.get(key) is not None:
            export_options.setdefault(key, checkpoint[key])
    return subpixel_form(model_from_checkpoint(checkpoint).eval())


def _require_quantization() -> Any:
    try:
        import onnxruntime
        from onnxruntime import quantization
    except ImportError:
        raise FcnsegError("INT8 export needs onnxruntime: pip install 'fcnseg[export]'") from None
    onnxruntime.set_default_logger_severity(3)  # its quantiser logs every removed initialiser
    return quantization


def _quantize(quantization: Any, fp32: Path, int8: Path, batches: list[np.ndarray], folder: Path,
              reduce_range: bool) -> None:
    """quant_pre_process then quantize_static (QDQ, per-channel int8 weights, 7-bit with
    ``reduce_range``, uint8 activations)."""

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.inputs, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = _pre_process(quantization, fp32, folder / "prepared.onnx")
    try:
        quantization.quantize_static(
            str(prepared), str(int8), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax, reduce_range=reduce_range)
    except Exception as err:  # the quantiser raises many kinds; all mean "this graph did not quantise"
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FcnsegError(f"onnxruntime's quantize_static failed: {err.__class__.__name__}: {text}") from err


def _dequantize_last(int8: Path) -> None:
    """The quantised file with its outputs dequantised after the final upsampler's data movement
    (`fcnseg.export.qdq_tail`: the same numbers, the DepthToSpace and crops on uint8)."""
    import onnx

    model = onnx.load(str(int8))
    if dequantize_outputs_last(model):
        onnx.save(model, str(int8))


def _pre_process(quantization: Any, fp32: Path, prepared: Path) -> Path:
    """The graph optimised and shape-annotated for quantisation, as onnxruntime advises.

    Its symbolic shape inference cannot follow the pad-to-32-and-crop of a graph with dynamic H and
    W ("Incomplete symbolic shape inference"), so it is skipped: ONNX's own shape inference and the
    optimiser still run. A graph that even these cannot handle is quantised as exported.
    """
    try:
        quantization.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    except Exception:  # the optimiser's failures come in many types; the export as it is still quantises
        return fp32
    return prepared


def _agreement(fp32: Path, int8: Path, batches: list[np.ndarray]) -> float:
    """Share of pixels where the INT8 and float32 models predict the same class."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, int8)]
    same = total = 0
    for batch in batches:
        preds = [s.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].argmax(1) for s in sessions]
        same += int((preds[0] == preds[1]).sum())
        total += preds[0].size
    return same / total


def _with_metadata(fp32: Path, int8: Path, images: int, reduce_range: bool) -> bytes:
    """The INT8 model's bytes, with the float32 model's metadata (the quantiser drops it) and its own."""
    import onnx

    source = onnx.load(str(fp32), load_external_data=False)
    model = onnx.load(str(int8))
    del model.metadata_props[:]
    for entry in source.metadata_props:
        model.metadata_props.add(key=entry.key, value=entry.value)
    note = {"format": "QDQ", "weights": "int8 per channel" + (", 7-bit range" if reduce_range else ""),
            "reduce_range": reduce_range, "activations": "uint8 per tensor",
            "calibration": f"MinMax on {images} images", "tool": "onnxruntime.quantization.quantize_static"}
    model.metadata_props.add(key="quantization", value=json.dumps(note))
    model.doc_string = source.doc_string + " (INT8, statically quantised)"
    return model.SerializeToString()


__all__ = ["DEFAULT_CALIBRATION_IMAGES", "calibration_batches", "calibration_files", "export_int8"]
