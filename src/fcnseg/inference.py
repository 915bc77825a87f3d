"""Prediction on whole images of any size: one pass, or overlapping windows, and `Segmenter`.

The FCN is fully convolutional, so the simplest prediction is one forward pass over the whole
image (the model pads to a multiple of 32 and crops back). Sliding-window prediction instead runs
fixed-size windows (the training crop size) over a grid and averages the logits where windows
overlap, the algorithm of mmsegmentation's ``slide_inference`` written as pure functions:
`window_grid` places the windows, `merge_windows` averages them with a count map.

`Segmenter` wraps a model with its class names, colours and normalisation, and turns photos in any
form (path, PIL image, array, tensor) into label maps of exactly the photo's size.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Literal, Sequence, overload

import numpy as np
import torch
from torch import nn

from fcnseg.checkpoint import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint, model_from_checkpoint
from fcnseg.devices import select_device
from fcnseg.imageio import ImageLike, to_rgb_array
from fcnseg.models.inference_form import inference_form

Size = tuple[int, int]
Mode = Literal["whole", "sliding"]
MODES: tuple[str, ...] = ("whole", "sliding")
DEFAULT_WINDOW: Size = (320, 480)  # the chapter's training crop


def default_stride(window: Size) -> Size:
    """Two thirds of the window, rounded up: every pixel away from the edges is seen by 1-4 windows."""
    return (math.ceil(window[0] * 2 / 3), math.ceil(window[1] * 2 / 3))


def window_grid(height: int, width: int, window: Size, stride: Size) -> list[Size]:
    """Top-left corners ``(y, x)`` of the windows that cover an image, row by row.

    Windows start every ``stride`` pixels; the last window of each row and column is moved back so
    that it ends exactly at the image edge (mmsegmentation's ``slide_inference``), so the whole
    image is covered and no window hangs over it. Along a side shorter than the window there is one
    window at 0, of the image's size: the model accepts any size, so nothing needs padding.

    Args:
        height, width: image size.
        window: window size ``(h, w)``.
        stride: step ``(h, w)`` between windows; at most the window size, so that no pixel is skipped.

    Returns:
        Corners; each window spans ``[y, y + min(window_h, height))`` by ``[x, x + min(window_w, width))``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min(window) < 1 or min(stride) < 1:
        raise ValueError(f"window and stride must be positive, got window {window}, stride {stride}")
    if stride[0] > window[0] or stride[1] > window[1]:
        raise ValueError(f"stride {stride} is larger than window {window}: pixels between windows would be skipped")
    ys = _starts(height, window[0], stride[0])
    xs = _starts(width, window[1], stride[1])
    return [(y, x) for y in ys for x in xs]


def _starts(size: int, window: int, stride: int) -> list[int]:
    count = max(size - window + stride - 1, 0) // stride + 1
    last = max(size - window, 0)
    return [min(i * stride, last) for i in range(count)]


def count_map(
    corners: Sequence[Size], window: Size, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """How many windows cover each pixel: ``(height, width)`` float32.

    Args:
        corners: top-left ``(y, x)`` of each window.
        window: the windows' size ``(h, w)`` (clipped at the image edge).
        height, width: image size.
    """
    count = torch.zeros((height, width), dtype=torch.float32, device=device)
    for y, x in corners:
        count[y : y + window[0], x : x + window[1]] += 1
    return count


def merge_windows(logits: Sequence[torch.Tensor], corners: Sequence[Size], height: int, width: int) -> torch.Tensor:
    """Averages window logits into one map; pixels covered by several windows get their mean.

    Args:
        logits: per window, ``(N, C, h, w)`` or ``(C, h, w)`` logits, all of the same size.
        corners: top-left ``(y, x)`` of each window in the image.
        height, width: image size.

    Returns:
        ``(N, C, height, width)`` float32 (``(C, height, width)`` for unbatched windows).

    Raises:
        ValueError: no windows, windows of different sizes, or some pixel covered by no window.
    """
    if len(logits) == 0 or len(logits) != len(corners):
        raise ValueError(f"need one corner per window, got {len(logits)} windows and {len(corners)} corners")
    unbatched = logits[0].ndim == 3
    batched = [t[None] if unbatched else t for t in logits]
    size = tuple(batched[0].shape[-2:])
    if any(tuple(t.shape[-2:]) != size for t in batched):
        raise ValueError("windows must all have the same size")
    n, c = batched[0].shape[:2]
    total = batched[0].new_zeros((n, c, height, width), dtype=torch.float32)
    for window_logits, (y, x) in zip(batched, corners):
        total[:, :, y : y + size[0], x : x + size[1]] += window_logits.float()
    count = count_map(corners, size, height, width, device=total.device)
    if bool((count == 0).any()):
        raise ValueError("the windows leave some pixels uncovered")
    merged = total / count
    return merged[0] if unbatched else merged


def predict_whole(
    model: nn.Module,
    image: torch.Tensor,
    *,
    flip: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits of whole images in one forward pass.

    Args:
        model: the FCN, in eval mode.
        image: ``(N, 3, H, W)`` normalised, on the model's device.
        flip: also run the horizontally flipped images and average the logits (flipped back).
        dtype: run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``); None leaves
            the caller's autocast state as it is.

    Returns:
        ``(N, C, H, W)`` float32 logits.
    """
    with torch.inference_mode(), _autocast(image.device, dtype):
        return _forward(model, image, flip)


def predict_sliding(
    model: nn.Module,
    image: torch.Tensor,
    *,
    window: Size = DEFAULT_WINDOW,
    stride: Size | None = None,
    batch_size: int = 8,
    flip: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits of whole images from overlapping windows, averaged where they overlap.

    Args:
        model: the FCN, in eval mode.
        image: ``(N, 3, H, W)`` normalised, on the model's device.
        window: window size ``(h, w)``, normally the training crop size.
        stride: step between windows; None for two thirds of the window (`default_stride`).
        batch_size: windows per forward pass (windows of all N images are batched together).
        flip: horizontal-flip test-time augmentation, as in `predict_whole`.
        dtype: autocast dtype, as in `predict_whole`.

    Returns:
        ``(N, C, H, W)`` float32 logits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    window = (int(window[0]), int(window[1]))
    stride = default_stride(window) if stride is None else (int(stride[0]), int(stride[1]))
    n, _, height, width = image.shape
    corners = window_grid(height, width, window, stride)
    h, w = min(window[0], height), min(window[1], width)
    # Every window has the same size (they are clamped inside the image), so windows of all
    # images stack into batches; crops are views, copied only batch by batch.
    crops = [(i, y, x) for i in range(n) for (y, x) in corners]
    total = None
    with torch.inference_mode(), _autocast(image.device, dtype):
        for start in range(0, len(crops), batch_size):
            chunk = crops[start : start + batch_size]
            batch = torch.stack([image[i, :, y : y + h, x : x + w] for i, y, x in chunk])
            logits = _forward(model, batch, flip)
            if total is None:
                # In the logits' memory layout (channels-last from the fast upsampler): adding a
                # channels-last window into an NCHW total transposes it and measured 20% of a
                # window's time here.
                layout = torch.channels_last if logits.stride(1) == 1 else torch.contiguous_format
                total = logits.new_zeros((n, logits.shape[1], height, width)).contiguous(memory_format=layout)
            for (i, y, x), window_logits in zip(chunk, logits):
                total[i, :, y : y + h, x : x + w] += window_logits
        # Accumulated window by window rather than through merge_windows, so that only one
        # batch of window logits is held at a time; the average is the same.
        return total / count_map(corners, (h, w), height, width, device=total.device)


def _forward(model: nn.Module, image: torch.Tensor, flip: bool) -> torch.Tensor:
    if not flip:
        return model(image).float()
    # Image and mirror go through in one batch, so flip costs one call, not two.
    both = model(torch.cat([image, image.flip(-1)])).float()
    plain, mirrored = both.chunk(2)
    return (plain + mirrored.flip(-1)) / 2


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def image_to_tensor(image: ImageLike) -> torch.Tensor:
    """An image-like value as a float32 ``(3, H, W)`` tensor in 0..1 (not yet normalised).

    Float tensors and arrays are used as given (no rounding to 8 bits); everything else goes
    through `fcnseg.imageio.to_rgb_array`.
    """
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        return image.detach().float().expand(3, -1, -1)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        array = image[..., :3] if image.ndim == 3 and image.shape[2] == 4 else image
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3):
            raise ValueError(f"expected an image array (H, W, 3) or (H, W), got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1).expand(3, -1, -1)
    array = to_rgb_array(image)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


class Segmenter:
    """A model with its class metadata, predicting label maps for images of any size.

    Args:
        model: the FCN. With ``optimize`` a copy of it is moved to ``device`` and put in eval mode;
            otherwise the model itself is.
        classes: class names, index = class id.
        colors: one RGB triple per class.
        mean, std: the normalisation the model was trained with (per channel, on 0..1 values).
        device: "auto"/None for the best available device, or a device name.
        mode: "whole" (one pass per image) or "sliding" (windows averaged, see `predict_sliding`).
        window, stride: sliding-window geometry; ``stride`` None for two thirds of the window.
        flip: horizontal-flip test-time augmentation.
        batch_size: images (whole mode) or windows (sliding mode) per forward pass.
        dtype: autocast dtype (``torch.bfloat16``, ``torch.float16``) or None for float32.
        ignore_index: the void label of the training data (kept as metadata; never predicted).
        optimize: predict with `fcnseg.models.inference_form` of an fcnseg FCN (BatchNorm folded
            into the convolutions, channels-last memory: the same logits up to float rounding,
            faster); a copy, so ``model`` itself is left as it is. False, or a model that is not an
            fcnseg FCN, predicts with ``model`` as given.

    Example:
        >>> segmenter = Segmenter.from_checkpoint("runs/voc/best.pt")
        >>> label = segmenter.predict("photo.jpg")          # (H, W) int64 class ids
        >>> proba = segmenter.predict_proba("photo.jpg")    # (C, H, W) float32
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        colors: Sequence[Sequence[int]],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str | torch.device | None = None,
        *,
        mode: Mode = "whole",
        window: Size = DEFAULT_WINDOW,
        stride: Size | None = None,
        flip: bool = False,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        ignore_index: int = 255,
        optimize: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if len(classes) != len(colors):
            raise ValueError(f"{len(classes)} class names but {len(colors)} colours")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = select_device(device)
        self.model = (inference_form(model) if optimize else model).to(self.device).eval()
        self.classes = list(classes)
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.mean = torch.tensor([float(m) for m in mean], device=self.device).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std], device=self.device).view(3, 1, 1)
        self.mode = mode
        self.window = (int(window[0]), int(window[1]))
        self.stride = stride
        self.flip = flip
        self.batch_size = batch_size
        self.dtype = dtype
        self.ignore_index = ignore_index

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike | dict,
        device: str | torch.device | None = None,
        **options,
    ) -> "Segmenter":
        """Builds the model a checkpoint describes, with its classes, colours and normalisation.

        Args:
            checkpoint: a path or an already loaded checkpoint dict.
            device: as in `Segmenter`.
            **options: ``mode``, ``window``, ``stride``, ``flip``, ``batch_size``, ``dtype``,
                ``optimize``.

        Raises:
            CheckpointError: missing, corrupt or foreign checkpoint.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = load_checkpoint(checkpoint)
        model = model_from_checkpoint(checkpoint)
        return cls(model, checkpoint["classes"], checkpoint["colors"], checkpoint["mean"], checkpoint["std"],
                   device, ignore_index=checkpoint["ignore_index"], **options)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """An image as the model's input: ``(3, H, W)`` float32, normalised, on the device."""
        return (image_to_tensor(image).to(self.device) - self.mean) / self.std

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` of a preprocessed batch ``(N, 3, H, W)``, by this segmenter's mode."""
        if self.mode == "sliding":
            return predict_sliding(self.model, image, window=self.window, stride=self.stride,
                                   batch_size=self.batch_size, flip=self.flip, dtype=self.dtype)
        return predict_whole(self.model, image, flip=self.flip, dtype=self.dtype)

    @overload
    def predict(self, image: ImageLike) -> np.ndarray: ...
    @overload
    def predict(self, image: list[ImageLike]) -> list[np.ndarray]: ...

    def predict(self, image):
        """Class ids of each pixel.

        Args:
            image: a path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor (uint8 0..255 or
                float 0..1), of any size; or a list of them.

        Returns:
            int64 array ``(H, W)`` of the image's exact size, or a list of them for a list.
        """
        if isinstance(image, list):
            return [logits.argmax(0).cpu().numpy() for logits in self._logits_each(image)]
        return self._logits_each([image])[0].argmax(0).cpu().numpy()

    @overload
    def predict_proba(self, image: ImageLike) -> np.ndarray: ...
    @overload
    def predict_proba(self, image: list[ImageLike]) -> list[np.ndarray]: ...

    def predict_proba(self, image):
        """Class probabilities (softmax of the logits), as `predict` takes images.

        Returns:
            float32 array ``(C, H, W)``, or a list of them for a list.
        """
        if isinstance(image, list):
            return [logits.softmax(0).cpu().numpy() for logits in self._logits_each(image)]
        return self._logits_each([image])[0].softmax(0).cpu().numpy()

    def _logits_each(self, images: list[ImageLike]) -> list[torch.Tensor]:
        """Logits ``(C, H, W)`` per image, in order; images of equal size share forward passes.

        Only equal sizes are batched: padding a smaller image to a larger one would change the
        logits near its border (the model's receptive field sees the padding), so results would
        depend on which other images happen to be in the list.
        """
        tensors = [self.preprocess(image) for image in images]
        results: list[torch.Tensor | None] = [None] * len(tensors)
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_size.setdefault(tuple(tensor.shape[-2:]), []).append(index)
        # In sliding mode the batch is of windows, so images go one at a time into predict_sliding.
        per_pass = self.batch_size if self.mode == "whole" else 1
        for indices in by_size.values():
            for start in range(0, len(indices), per_pass):
                chunk = indices[start : start + per_pass]
                logits = self.logits(torch.stack([tensors[i] for i in chunk]))
                for i, item in zip(chunk, logits):
                    results[i] = item
        return results


__all__ = [
    "DEFAULT_WINDOW", "MODES", "Segmenter", "count_map", "default_stride", "image_to_tensor", "merge_windows",
    "predict_sliding", "predict_whole", "window_grid",
]
