"""Shipping a trained model: ONNX files (`fcnseg.export.onnx`) and the formats that build on them:
INT8 ONNX statically quantised on the user's images (`fcnseg.export.int8`), which
`fcnseg.inference.onnx_engine.onnx_segmenter` runs as a `Segmenter` (docs/ENGINES.md)."""
from fcnseg.export.int8 import DEFAULT_CALIBRATION_IMAGES, calibration_files, export_int8
from fcnseg.export.onnx import (
    DEFAULT_OPSET,
    DEFAULT_SIZES,
    DEFAULT_TOLERANCE,
    EXPORTERS,
    export_onnx,
    read_onnx_metadata,
    verify_onnx,
)
from fcnseg.export.subpixel import subpixel_form

__all__ = ["DEFAULT_CALIBRATION_IMAGES", "DEFAULT_OPSET", "DEFAULT_SIZES", "DEFAULT_TOLERANCE", "EXPORTERS",
           "calibration_files", "export_int8", "export_onnx", "read_onnx_metadata", "subpixel_form",
           "verify_onnx"]
