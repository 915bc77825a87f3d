"""ONNX export with a parity check against PyTorch in onnxruntime, and self-describing metadata.

The exported graph takes ``image`` ``(N, 3, H, W)`` float32, normalised, with N, H and W dynamic,
and returns ``logits`` ``(N, C, H, W)``: the same contract as `FCN.forward`, the pad to a multiple
of 32 and the crop back included. Class names, colours, mean and std go into the model's
``metadata_props`` as JSON strings, so that a program with onnxruntime alone (no torch, no fcnseg)
can preprocess, predict and colour; docs/INFERENCE.md shows how.

Two exporters are supported. "dynamo" (``torch.onnx.export(..., dynamo=True)``, the default) is
torch's maintained path, built on ``torch.export`` and onnxscript. "legacy" (``dynamo=False``, the
TorchScript tracer) is deprecated by torch but exports this model about 20 times faster; both
produce graphs that match PyTorch to ~1e-6 for any input size.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import time
import warnings
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import nn

from fcnseg import __version__
from fcnseg.constants import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.data.classes import default_palette
from fcnseg.errors import FcnsegError
from fcnseg.models.checkpoint import load_checkpoint, model_from_checkpoint
from fcnseg.runtime import atomic_write

Exporter = Literal["dynamo", "legacy"]
EXPORTERS: tuple[str, ...] = ("dynamo", "legacy")
DEFAULT_OPSET = 18  # the lowest the dynamo exporter emits directly (it cannot down-convert Pad to 17)
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((320, 480), (375, 500))
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_TOLERANCE = 1e-4


def export_onnx(
    model_or_checkpoint: nn.Module | str | os.PathLike | dict,
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    colors: Sequence[Sequence[int]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    verify: bool = True,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    exporter: Exporter = "dynamo",
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Exports an FCN to an ONNX file and checks it against PyTorch with onnxruntime.

    The file is written only when the check passes (atomically: no half-written file either).

    Args:
        model_or_checkpoint: an FCN module, or a checkpoint (path or loaded dict) to rebuild one.
        path: the ``.onnx`` file to write.
        classes, colors, mean, std: metadata to store; taken from the checkpoint when not given,
            else class ids as names, the VOC palette and ImageNet statistics.
        opset: ONNX opset (the dynamo exporter needs 18 or later).
        dynamic: batch, height and width dynamic; False fixes the input to ``(1, 3, *sizes[0])``.
        verify: run both models on random inputs of each of ``sizes`` and compare.
        sizes: ``(H, W)`` input sizes to verify (the first is also the example input of the export).
        exporter: "dynamo" or "legacy", see the module docstring.
        tolerance: largest allowed absolute difference between the logits of the two runtimes.

    Returns:
        A report: ``path``, ``exporter``, ``opset``, ``dynamic``, ``num_classes``, ``export_seconds``,
        ``verified``, ``parity`` (per size: ``size``, ``batch``, ``max_abs_diff``), ``max_abs_diff``
        and ``tolerance``.

    Raises:
        FcnsegError: onnx, onnxscript or onnxruntime missing, the export failed, or the outputs
            differ by more than ``tolerance``.
        CheckpointError: unreadable checkpoint.
    """
    sizes = _checked_sizes(exporter, opset, sizes)
    _require("onnx")
    model, metadata = _model_and_metadata(model_or_checkpoint, classes, colors, mean, std)

    example = torch.randn(1, 3, *sizes[0], generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    export = _export_dynamo if exporter == "dynamo" else _export_legacy
    proto = export(model, example, opset, dynamic)
    export_seconds = time.perf_counter() - started
    _describe(proto, metadata, dynamic)
    data = proto.SerializeToString()

    report: dict[str, Any] = {
        "path": str(path), "exporter": exporter, "opset": _opset_of(proto), "dynamic": dynamic,
        "num_classes": len(json.loads(metadata["classes"])), "export_seconds": round(export_seconds, 2),
        "verified": False, "parity": [], "max_abs_diff": None, "tolerance": tolerance,
    }
    if verify:
        report.update(_parity(model, data, sizes if dynamic else sizes[:1], dynamic, tolerance, path))
    atomic_write(path, lambda f: f.write(data))
    return report


def _checked_sizes(exporter: str, opset: int, sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The verification sizes as ints, after refusing an unknown exporter or an opset it cannot write."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset < 18:
        raise FcnsegError(f"the dynamo exporter writes opset 18 or later, not {opset}; "
                          "use opset 18+ or exporter 'legacy'")
    if not sizes:
        raise ValueError("need at least one (H, W) size")
    return [(int(h), int(w)) for h, w in sizes]


def _describe(proto, metadata: dict[str, str], dynamic: bool) -> None:
    """Makes the graph self-describing: named dynamic axes, fcnseg's metadata, a doc string of the contract."""
    if dynamic:
        _name_output_axes(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    variant = json.loads(metadata["model_kwargs"]).get("variant", "?")
    proto.doc_string = (f"fcnseg {json.loads(metadata['model_name'])} ({variant}): input '{INPUT_NAME}' float32 "
                        f"(N, 3, H, W), RGB in 0..1 normalised with the metadata's mean and std; "
                        f"output '{OUTPUT_NAME}' (N, C, H, W)")


def _parity(model: nn.Module, data: bytes, sizes: list[tuple[int, int]], dynamic: bool, tolerance: float,
            path: str | os.PathLike) -> dict[str, Any]:
    """The report's parity fields; raises before anything is written when the runtimes differ too much."""
    parity = verify_onnx(model, data, sizes, batch=2 if dynamic else 1)
    max_abs_diff = max(p["max_abs_diff"] for p in parity)
    if max_abs_diff > tolerance:
        worst = max(parity, key=lambda p: p["max_abs_diff"])
        h, w = worst["size"]
        raise FcnsegError(f"ONNX output differs from PyTorch by {worst['max_abs_diff']:.3g} at size {h}x{w} "
                          f"(tolerance {tolerance:g}); {path} was not written")
    return {"parity": parity, "max_abs_diff": max_abs_diff, "verified": True}


def verify_onnx(
    model: nn.Module,
    onnx_model: bytes | str | os.PathLike,
    sizes: Sequence[tuple[int, int]],
    *,
    batch: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Runs PyTorch and onnxruntime on the same random inputs and measures the difference.

    Args:
        model: the PyTorch model (CPU, eval mode).
        onnx_model: the serialised ONNX model or a path to it.
        sizes: input sizes ``(H, W)`` to try.
        batch: batch size of the first size (later sizes use batch 1), to exercise a dynamic batch.

    Returns:
        Per size: ``{"size": (H, W), "batch": n, "max_abs_diff": float}``.

    Raises:
        FcnsegError: onnxruntime missing, or an output of the wrong shape.
    """
    ort = _require("onnxruntime")
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    results = []
    for index, (h, w) in enumerate(sizes):
        n = batch if index == 0 else 1
        image = torch.randn(n, 3, h, w, generator=generator)
        with torch.inference_mode():
            expected = model(image).float().numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})
        if actual.shape != expected.shape:
            raise FcnsegError(f"ONNX model returned shape {actual.shape} for input {tuple(image.shape)}; "
                              f"PyTorch gives {expected.shape}")
        diff = float(np.abs(actual - expected).max())
        # NaN compares false with any tolerance; count it as the worst difference instead.
        results.append({"size": (h, w), "batch": n, "max_abs_diff": diff if math.isfinite(diff) else math.inf})
    return results


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fcnseg metadata of an exported model, JSON values decoded (``classes``, ``colors``, ...)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    metadata = {}
    for entry in proto.metadata_props:
        try:
            metadata[entry.key] = json.loads(entry.value)
        except ValueError:
            metadata[entry.key] = entry.value
    return metadata


def _model_and_metadata(source, classes, colors, mean, std) -> tuple[nn.Module, dict[str, str]]:
    checkpoint: dict[str, Any] = {}
    if isinstance(source, nn.Module):
        # A copy: the export moves the model to the CPU in eval mode, the caller's stays as it is.
        model = copy.deepcopy(getattr(source, "module", source))
    else:
        checkpoint = source if isinstance(source, dict) else load_checkpoint(source)
        model = model_from_checkpoint(checkpoint)
    model = model.cpu().float().eval()
    num_classes = getattr(model, "num_classes", None)
    if classes is None:
        classes = checkpoint.get("classes") or [str(i) for i in range(num_classes or 0)]
    classes = list(classes)
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"the model predicts {num_classes} classes but {len(classes)} class names were given")
    if colors is None:
        colors = checkpoint.get("colors") or [list(c) for c in default_palette(len(classes))]
    if len(colors) != len(classes):
        raise ValueError(f"{len(classes)} class names but {len(colors)} colours")
    mean = [float(v) for v in (mean if mean is not None else checkpoint.get("mean", IMAGENET_MEAN))]
    std = [float(v) for v in (std if std is not None else checkpoint.get("std", IMAGENET_STD))]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {mean} and {std}")
    # Every value is a JSON string, so that readers decode them all the same way.
    metadata = {
        "model_name": json.dumps(getattr(model, "model_name", checkpoint.get("model_name", type(model).__name__))),
        "model_kwargs": json.dumps(getattr(model, "model_kwargs", checkpoint.get("model_kwargs", {}))),
        "classes": json.dumps(classes),
        "colors": json.dumps([[int(v) for v in c] for c in colors]),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "ignore_index": json.dumps(int(checkpoint.get("ignore_index", 255))),
        "input_range": json.dumps("RGB 0..1, then (x - mean) / std per channel"),
        "fcnseg_version": json.dumps(__version__),
    }
    return model, metadata


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int, dynamic: bool):
    _require("onnxscript")
    dynamic_shapes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    try:
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    external_data=False, verbose=False)
    except Exception as err:  # the exporter raises many types; all mean "this model did not export"
        raise FcnsegError(f"torch.onnx.export (dynamo) failed: {err.__class__.__name__}: {_first_line(err)}; "
                          "try exporter 'legacy'") from err
    return program.model_proto


def _export_legacy(model: nn.Module, example: torch.Tensor, opset: int, dynamic: bool):
    onnx = _require("onnx")
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Choosing this exporter is explicit (and documented as deprecated); its warnings add nothing.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None)
        except Exception as err:
            raise FcnsegError(f"torch.onnx.export (legacy) failed: {err.__class__.__name__}: "
                              f"{_first_line(err)}") from err
    return onnx.load_from_string(buffer.getvalue())


def _name_output_axes(proto) -> None:
    # The dynamo exporter names output sizes by their symbolic formula (the pad-and-crop's
    # "Min(height, 32*...)"); the crop makes them equal to the input's, so say so.
    for output in proto.graph.output:
        if output.name != OUTPUT_NAME:
            continue
        dims = output.type.tensor_type.shape.dim
        for index, name in ((0, "batch"), (2, "height"), (3, "width")):
            if len(dims) > index:
                dims[index].Clear()
                dims[index].dim_param = name


def _opset_of(proto) -> int:
    return next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), -1)


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise FcnsegError(f"ONNX export needs the '{module}' package: pip install 'fcnseg[export]' "
                          "(onnx, onnxruntime, onnxscript)") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


__all__ = ["DEFAULT_OPSET", "DEFAULT_SIZES", "EXPORTERS", "INPUT_NAME", "OUTPUT_NAME", "export_onnx",
           "read_onnx_metadata", "verify_onnx"]
