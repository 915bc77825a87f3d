"""Prediction on whole images of any size: one pass, or overlapping windows averaged, and flips.

The FCN is fully convolutional, so the simplest prediction is one forward pass over the whole
image (the model pads to a multiple of 32 and crops back). Sliding-window prediction instead runs
fixed-size windows (the training crop size) over a grid and averages the logits where windows
overlap, the algorithm of mmsegmentation's ``slide_inference`` written as pure functions:
`window_grid` places the windows, `merge_windows` averages them with a count map.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import OptionError
from fcnseg.runtime import autocast_context

Size = tuple[int, int]
Mode = Literal["whole", "sliding"]
MODES: tuple[str, ...] = ("whole", "sliding")
DEFAULT_WINDOW: Size = (320, 480)  # the chapter's training crop


def default_stride(window: Size) -> Size:
    """Two thirds of the window, rounded up: every pixel away from the edges is seen by 1-4 windows."""
    return (math.ceil(window[0] * 2 / 3), math.ceil(window[1] * 2 / 3))


def check_window(window: Size, stride: Size | None = None) -> None:
    """Refuses a sliding-window geometry that cannot cover an image: before any image is read.

    Args:
        window: window size ``(h, w)``, both positive.
        stride: step ``(h, w)``, both positive and at most the window's; None for `default_stride`.

    Raises:
        OptionError: (a ValueError) a side of zero or less, or a stride larger than the window,
            which would skip the pixels between windows.
    """
    if len(window) != 2 or min(window) < 1:
        raise OptionError(f"sliding window must be two positive sides (height, width), got {_hxw(window)}")
    if stride is None:
        return
    if len(stride) != 2 or min(stride) < 1:
        raise OptionError(f"sliding stride must be two positive steps (height, width), got {_hxw(stride)}")
    if stride[0] > window[0] or stride[1] > window[1]:
        raise OptionError(f"sliding stride {_hxw(stride)} is larger than the window {_hxw(window)}: the pixels "
                          "between windows would be skipped; choose a stride at most the window (by default "
                          "two thirds of it)")


def _hxw(size: Sequence[int]) -> str:
    """A size as the ``--window``/``--stride`` options write it: ``HxW``."""
    return "x".join(str(v) for v in size)


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

    Raises:
        OptionError: a window or stride `check_window` refuses.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    check_window(window, stride)
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
    with torch.inference_mode(), autocast_context(image.device, dtype):
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

    Raises:
        OptionError: a window or stride `check_window` refuses, or a batch size below 1.
    """
    if batch_size < 1:
        raise OptionError(f"batch_size must be positive, got {batch_size}")
    check_window(window, stride)
    window = (int(window[0]), int(window[1]))
    stride = default_stride(window) if stride is None else (int(stride[0]), int(stride[1]))
    n, _, height, width = image.shape
    corners = window_grid(height, width, window, stride)
    h, w = min(window[0], height), min(window[1], width)
    # Every window has the same size (they are clamped inside the image), so windows of all
    # images stack into batches; crops are views, copied only batch by batch.
    crops = [(i, y, x) for i in range(n) for (y, x) in corners]
    total = None
    with torch.inference_mode(), autocast_context(image.device, dtype):
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


def check_scales(scales: Sequence[float]) -> None:
    """Refuses test-time scales that are not one or more positive factors: before any image is read.

    Raises:
        OptionError: no scale, or a scale of zero or less.
    """
    if not scales or min(scales) <= 0:
        raise OptionError(f"scales must be positive numbers, got {list(scales)}")


def predict_scales(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                   scales: Sequence[float]) -> torch.Tensor:
    """Multi-scale test-time augmentation: the image resized by each scale, predicted, its logits
    resized back (bilinear) and averaged, so thin objects are also seen larger and large ones whole.

    Args:
        predict: images ``(N, 3, h, w)`` to logits of the same size (`predict_whole` or
            `predict_sliding` with their options bound; flip applies at every scale).
        image: ``(N, 3, H, W)`` normalised.
        scales: resize factors, e.g. ``(0.75, 1.0, 1.25)``; ``(1.0,)`` is ``predict(image)``.

    Returns:
        ``(N, C, H, W)`` float32 logits.
    """
    check_scales(scales)
    height, width = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = image if size == (height, width) else F.interpolate(image, size=size, mode="bilinear",
                                                                      align_corners=False)
        logits = predict(resized).float()
        if size != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
    return total / len(scales)


def _forward(model: nn.Module, image: torch.Tensor, flip: bool) -> torch.Tensor:
    if not flip:
        return model(image).float()
    # Image and mirror go through in one batch, so flip costs one call, not two.
    both = model(torch.cat([image, image.flip(-1)])).float()
    plain, mirrored = both.chunk(2)
    return (plain + mirrored.flip(-1)) / 2
