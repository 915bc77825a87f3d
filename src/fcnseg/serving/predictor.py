"""The model behind ``fcnseg serve``: an upload read as ``fcnseg predict`` reads a file, predicted one at a time.

An upload is written to a private temporary folder and read by `fcnseg.data.io` from there, so it
goes through the one reader of fcnseg (EXIF orientation, the pixel cap checked from the header
before any pixel is decoded). The mask is encoded by `fcnseg.visualize.save_label_png`, the encoder of
``fcnseg predict``'s ``<stem>.png``: the API returns the bytes ``fcnseg predict`` writes for the same
photo and options (tests/serving checks it).

One lock serialises the model calls: a forward pass already uses every core, two at once would only
double the memory, and the sliding-window and flip settings are switched per request on the one
`Segmenter`.
"""
from __future__ import annotations

import io
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcnseg.constants import SERVE_MAX_PIXELS, SERVE_MAX_UPLOAD_BYTES
from fcnseg.data.files import above_cap_message
from fcnseg.data.io import image_size, to_rgb_array
from fcnseg.errors import DataError, UsageError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.visualize import save_label_png

PAYLOAD_TOO_LARGE = 413
BAD_REQUEST = 400


class UploadError(UsageError):
    """An upload the server refuses (answered with ``status``, the server goes on serving)."""

    def __init__(self, message: str, status: int = BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Prediction:
    """What one upload became.

    Attributes:
        png: the palette PNG of class ids, as ``fcnseg predict`` writes ``<stem>.png``.
        counts: pixels predicted as each class, index = class id.
        size: the upright (height, width) of the photo and of the mask.
        seconds: wall time of reading and predicting (waiting for the lock excluded).
    """

    png: bytes
    counts: list[int]
    size: tuple[int, int]
    seconds: float


class Predictor:
    """A `Segmenter` serving uploads, with the caps an upload must respect.

    Args:
        segmenter: the model; its ``mode`` and ``flip`` are set per request (under the lock).
        max_upload_bytes: larger uploads are refused (413).
        max_pixels: photos of more pixels (width x height, read from the header) are refused (413)
            before they are decoded; None: no cap of the server's own (fcnseg's reader keeps its own).
    """

    def __init__(self, segmenter: Segmenter, *, max_upload_bytes: int = SERVE_MAX_UPLOAD_BYTES,
                 max_pixels: int | None = SERVE_MAX_PIXELS) -> None:
        self.segmenter = segmenter
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.default_mode = segmenter.mode
        self.default_flip = segmenter.flip
        self.lock = threading.Lock()

    def info(self) -> dict:
        """The model's classes and colours, and the server's defaults and caps (``GET /api/info``)."""
        s = self.segmenter
        return {"classes": s.classes, "colors": [list(c) for c in s.colors], "num_classes": s.num_classes,
                "mode": self.default_mode, "flip": self.default_flip, "window": list(s.window),
                "max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels}

    def predict(self, data: bytes, filename: str = "upload", *, mode: str | None = None,
                flip: bool | None = None) -> Prediction:
        """The palette PNG mask of an uploaded photo.

        Args:
            data: the uploaded file's bytes.
            filename: the name the browser sent, used in messages only (never as a path).
            mode: "whole" or "sliding"; None for the server's default.
            flip: horizontal-flip test-time augmentation; None for the server's default.

        Raises:
            UploadError: too large (413), too many pixels (413), empty or not a readable image (400).
        """
        name = _display_name(filename)
        if not data:
            raise UploadError(f"{name}: the upload is empty; choose a photo")
        if len(data) > self.max_upload_bytes:
            raise UploadError(too_large_message(name, len(data), self.max_upload_bytes), PAYLOAD_TOO_LARGE)
        if mode not in (None, "whole", "sliding"):
            raise UploadError(f"mode must be whole or sliding, got {mode!r}")
        with tempfile.TemporaryDirectory(prefix="fcnseg-serve-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            with self.lock:
                started = time.perf_counter()
                image = self._read(path, name)
                self.segmenter.mode = mode or self.default_mode
                self.segmenter.flip = self.default_flip if flip is None else flip
                pred = self.segmenter.predict(image)
                png = encode_label_png(pred, self.segmenter.colors)
                seconds = time.perf_counter() - started
        counts = np.bincount(pred.ravel(), minlength=self.segmenter.num_classes).tolist()
        return Prediction(png, counts, (int(pred.shape[0]), int(pred.shape[1])), seconds)

    def _read(self, path: Path, name: str) -> np.ndarray:
        """The upload as ``(H, W, 3)`` uint8, through fcnseg's reader, the pixel cap checked first."""
        try:
            height, width = image_size(path)
            if self.max_pixels is not None and height * width > self.max_pixels:
                size = f"{width}x{height} (WxH) = {width * height:,} pixels"
                raise UploadError(above_cap_message(Path(name), size, self.max_pixels), PAYLOAD_TOO_LARGE)
            return to_rgb_array(path)
        except DataError as err:
            message = str(err).replace(str(path), name)
            # The reader's own cap (the process-wide one) refused it from the header.
            status = PAYLOAD_TOO_LARGE if "above the cap" in message else BAD_REQUEST
            raise UploadError(message, status) from None


def encode_label_png(pred: np.ndarray, colors: list[tuple[int, int, int]]) -> bytes:
    """Class ids as the palette PNG ``fcnseg predict`` writes: `fcnseg.visualize.save_label_png`, its encoder."""
    buffer = io.BytesIO()
    save_label_png(pred, colors, buffer)
    return buffer.getvalue()


def too_large_message(name: str, size: int, cap: int) -> str:
    """The refusal of an upload (``name``: its file name, or "upload" before it is known) above the byte cap."""
    return (f"{name} is {size / 2**20:.1f} MiB, above the upload cap of {cap / 2**20:.1f} MiB; "
            "downscale the photo, or start the server with a larger --max-upload-mb")


def _display_name(filename: str) -> str:
    """The browser's file name, reduced to a short printable base name (it is only ever shown)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:120].strip()
    return base or "upload"
