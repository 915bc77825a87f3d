"""Prediction: whole, sliding-window and flipped (`windows`), and `Segmenter` for photos."""
from fcnseg.data.io import image_to_tensor
from fcnseg.inference.segmenter import Segmenter
from fcnseg.inference.windows import (
    DEFAULT_WINDOW,
    MODES,
    check_window,
    count_map,
    default_stride,
    merge_windows,
    predict_sliding,
    predict_whole,
    window_grid,
)

__all__ = [
    "DEFAULT_WINDOW", "MODES", "Segmenter", "check_window", "count_map", "default_stride", "image_to_tensor", "merge_windows",
    "predict_sliding", "predict_whole", "window_grid",
]
