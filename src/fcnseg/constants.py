"""The values every part of fcnseg agrees on, in one place (like timm's ``data/constants.py``)."""
from __future__ import annotations

IGNORE_INDEX = 255
"""The one void label: every dataset returns it for unlabelled pixels, whatever its own void id on
disk; losses and metrics skip it."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet input statistics (on 0..1 values), the normalisation of every pretrained body."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
"""Files read as photos (lower case; matched case-insensitively)."""

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm")
"""Files ``fcnseg predict`` reads as videos, frame by frame (lower case; matched case-insensitively)."""

MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".gif")
"""Files read as label masks: lossless formats only (a JPEG mask's edges hold invented colours)."""

MAX_IMAGE_PIXELS = 89_478_485
"""The default pixel cap: images with more pixels (width x height, from the header) are refused
before decoding. It is Pillow's own decompression-bomb warning threshold (1 GiB of RGBA at 4 bytes,
over 3), so fcnseg refuses where Pillow starts to warn: a 48-megapixel phone photo (8000x6000) and
a 61-megapixel full-frame camera pass; a 144-megapixel PNG of a few hundred bytes does not. Decoding
at the cap takes 268 MB as RGB, about 1 GB as float32 for the model, and the FCN's logits of 21
classes 7.5 GB: more would be minutes of CPU for a photo nobody meant to segment at full size.
Raise it with `fcnseg.data.io.set_max_image_pixels` or ``--max-pixels``."""

MAX_IMAGE_PIXELS_ENV = "FCNSEG_MAX_IMAGE_PIXELS"
"""The environment variable that carries a raised (or lowered) pixel cap to DataLoader worker
processes: ``0`` or ``none`` for no cap."""

AMP_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "none")
"""The mixed-precision choices (``--amp``, ``Segmenter(amp=...)``): "auto" is bf16 where the
hardware computes it natively, fp16 on other GPUs, float32 elsewhere (`fcnseg.runtime.resolve_amp_dtype`)."""

SERVE_HOST = "127.0.0.1"
SERVE_PORT = 7860
"""Where ``fcnseg serve`` listens by default: this machine only (``--host 0.0.0.0`` opens it to the network)."""

SERVE_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
SERVE_MAX_PIXELS = 25_000_000
"""The caps of an upload to ``fcnseg serve``: 20 MiB of file, 25 megapixels (a 24-megapixel camera's
photo passes). Lower than `MAX_IMAGE_PIXELS`: a web page's visitor waits for the answer, and one
request must not hold the model for minutes. Raised with ``--max-upload-mb`` and ``--max-pixels``."""

INT8_AGREEMENT_WARNING = 0.98
"""`fcnseg export --int8` warns when fewer of the calibration pixels than this share get float32's class."""

DEFAULT_BACKEND = "auto"
"""The engine `Segmenter` and ``fcnseg predict``/``serve`` run the model with unless told: "auto", the
fastest installed engine for the precision on the CPU (OpenVINO where ``fcnseg[openvino]`` is
installed, else torch), torch on GPUs and with ``compile=True``. Measured in docs/ENGINES.md."""

OVERLAY_FORMATS = ("png", "jpg")
OVERLAY_JPEG_QUALITY = 90
"""What `fcnseg predict --overlay-format` writes the colour overlays as: PNG (lossless, the default) or
JPEG at this quality, which encodes a 360x480 overlay about 10 times as fast as a level-1 PNG (1.2
against 13 ms) for a bulk run that must keep up with the model. Label maps stay PNG: they hold class ids."""
