"""Prediction: whole, sliding-window, flipped and multi-scale (`windows`), `Segmenter` for photos, and
bulk prediction of files and folders that streams and resumes (`bulk.predict_files`)."""
from fcnseg.data.io import image_to_tensor
from fcnseg.inference.bulk import BulkResult, predict_files
from fcnseg.inference.segmenter import Segmenter
from fcnseg.inference.windows import (
    DEFAULT_WINDOW,
    MODES,
    check_window,
    count_map,
    default_stride,
    merge_windows,
    predict_scales,
    predict_sliding,
    predict_whole,
    window_grid,
)

__all__ = [
    "BulkResult", "DEFAULT_WINDOW", "MODES", "Segmenter", "check_window", "count_map", "default_stride", "image_to_tensor", "merge_windows",
    "predict_files", "predict_scales", "predict_sliding", "predict_whole", "window_grid",
]
