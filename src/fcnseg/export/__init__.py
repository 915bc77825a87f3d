"""Shipping a trained model: ONNX files (`fcnseg.export.onnx`) and the formats that build on them."""
from fcnseg.export.onnx import (
    DEFAULT_OPSET,
    DEFAULT_SIZES,
    DEFAULT_TOLERANCE,
    EXPORTERS,
    export_onnx,
    read_onnx_metadata,
    verify_onnx,
)

__all__ = ["DEFAULT_OPSET", "DEFAULT_SIZES", "DEFAULT_TOLERANCE", "EXPORTERS", "export_onnx", "read_onnx_metadata",
           "verify_onnx"]
