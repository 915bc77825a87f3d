"""The writing side of bulk prediction: each output written whole or not at all, in this process.

Files are written under a temporary name in the output folder and renamed (``os.replace``) once
complete, so a kill leaves either the previous file or the new one, never half of one; a run's start
removes the temporary files a killed run left (`fcnseg.inference.bulk.start_run`).
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from fcnseg.errors import FcnsegError
from fcnseg.inference.reading import ImageItem, MaskSource


class Predictor(Protocol):
    """What bulk prediction needs of a `fcnseg.inference.Segmenter`."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    mode: str
    batch_size: int
    classes: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int

    def logits(self, image: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BulkOptions:
    """How inputs are predicted and drawn beyond the segmenter's own settings (see `predict_files`)."""

    grid: bool = False
    masks: MaskSource | None = None
    overlay: bool = True
    alpha: float = 0.5
    frame_masks: bool = False
    workers: int = 0
    overlay_format: str = "png"


def write_outputs(segmenter: Predictor, item: ImageItem, pred: np.ndarray, out: Path, names: list[str],
                  options: BulkOptions) -> None:
    """The label map, the overlay (and the grid) of one image, each written whole or not at all.

    Raises:
        OSError: a file cannot be written; the files of this image written before it are removed.
    """
    from PIL import Image

    from fcnseg.constants import OVERLAY_JPEG_QUALITY
    from fcnseg.visualize import PNG_COMPRESS_LEVEL, save_label_png, save_prediction_grid

    image = item.image.numpy()
    colors, ignore = segmenter.colors, segmenter.ignore_index
    # zlib level 1: the overlay's PNG is encoded 3.5 times as fast as at the default level 6 (36 against
    # 124 ms for a 360x480 CamVid photo), for a file 10% larger; bulk prediction must keep up with the model.
    # A JPEG (--overlay-format jpg) is faster still (constants.OVERLAY_JPEG_QUALITY).
    save_options = ({"format": "JPEG", "quality": OVERLAY_JPEG_QUALITY} if options.overlay_format == "jpg"
                    else {"format": "PNG", "compress_level": PNG_COMPRESS_LEVEL})
    writers = {"": lambda p: save_label_png(pred, colors, p),
               "_overlay": lambda p: Image.fromarray(blend(image, pred, colors, options.alpha, ignore)).save(
                   p, **save_options),
               "_grid": lambda p: save_prediction_grid([(image, pred, item.target)], segmenter.classes, colors, p,
                                                       ignore_index=ignore)}
    written: list[Path] = []
    try:
        # names are in `output_files`' order: the label map, then the overlay and the grid if asked for
        kinds = ["", *(["_overlay"] if options.overlay else []), *(["_grid"] if options.grid else [])]
        for name, kind in zip(names, kinds, strict=True):
            written.append(save_atomically(out / name, writers[kind]))
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def blend(image: np.ndarray, ids: np.ndarray, colors: Sequence[Sequence[int]], alpha: float,
          ignore_index: int) -> np.ndarray:
    """`fcnseg.visualize.overlay`, equal to it to the last bit, by table look-up: the result for each
    (class, channel, photo value) is computed once, with overlay's float32 arithmetic, instead of
    once per pixel, and each channel is one ``np.take`` with 16-bit indices (about 3 times as fast
    as overlay on a 360x480 photo with uint8 ids; numpy has no fused gather, hence this).

    Args:
        image: uint8 ``(H, W, 3)``.
        ids: ``(H, W)`` class ids; void, negative and colourless ids show the photo unchanged.

    Returns:
        uint8 ``(H, W, 3)``.
    """
    count = len(colors)
    painted = np.asarray(colors, dtype=np.uint8).reshape(-1, 3).astype(np.float32)[:, :, None]
    values = np.arange(256, dtype=np.float32)[None, None, :]
    table = np.empty((count + 1, 3, 256), dtype=np.uint8)
    table[:-1] = np.clip(values * (1 - alpha) + painted * alpha + 0.5, 0, 255).astype(np.uint8)
    table[-1] = np.arange(256, dtype=np.uint8)  # the row of pixels left as they are
    index_type = np.uint16 if table.size <= 1 << 16 else np.int64
    starts = _row_starts(np.asarray(ids), count, ignore_index, index_type)
    flat, image = table.ravel(), np.asarray(image)
    out = np.empty(image.shape, dtype=np.uint8)
    for channel in range(3):
        np.take(flat, starts + index_type(256 * channel) + image[:, :, channel], out=out[:, :, channel])
    return out


def _row_starts(ids: np.ndarray, count: int, ignore_index: int, index_type: type) -> np.ndarray:
    """Each pixel's offset in `blend`'s table: its class's rows, or the unchanged row (``count``)."""
    stride = 3 * 256
    if ids.dtype == np.uint8:  # one look-up per pixel
        by_id = np.full(256, count * stride, dtype=index_type)
        kept = [i for i in range(min(count, 256)) if i != ignore_index]
        by_id[kept] = np.asarray(kept, dtype=index_type) * index_type(stride)
        return by_id[ids]
    rows = np.where((ids < 0) | (ids >= count) | (ids == ignore_index), count, ids)
    return rows.astype(index_type) * index_type(stride)


def save_atomically(path: Path, save: Callable[[Path], object]) -> Path:
    """``save(temporary path)`` then a rename to ``path``: a kill leaves the old file or the new one,
    never half of one (the temporary ``.<name>.<pid>.tmp`` is removed at the next run's start)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def predict_video_file(segmenter: Predictor, path: Path, out: Path, name: str, options: BulkOptions) -> list[str]:
    """A video's outputs (`fcnseg.inference.video.predict_video`), as names relative to ``out``."""
    try:
        from fcnseg.inference.video import predict_video
    except ModuleNotFoundError as err:
        if err.name != "fcnseg.inference.video":
            raise
        raise FcnsegError("this fcnseg has no video support (fcnseg.inference.video is missing)") from None
    written = predict_video(segmenter, path, out, name, frame_masks=options.frame_masks, alpha=options.alpha,
                            batch_size=segmenter.batch_size)
    root = out.resolve()
    outside = [str(p) for p in written if not Path(p).resolve().is_relative_to(root)]
    if outside:
        raise FcnsegError(f"the video writer wrote {outside[0]}, outside {out}; its outputs were not recorded")
    return [Path(p).resolve().relative_to(root).as_posix() for p in written]


class BackgroundWriter:
    """Runs ``work(job)`` for each submitted job in one thread of this process, in order, so that
    encoding and writing files overlaps the next forward pass (PNG encoding releases the GIL).

    At most ``depth`` jobs wait (`submit` blocks beyond), which bounds the images held in memory. An
    exception in ``work`` (an interrupt included) stops the thread; it is raised again in the caller
    by the next `submit` or by `close`, and later jobs are dropped, as a killed run drops them.
    """

    def __init__(self, work: Callable[[object], None], depth: int) -> None:
        self.work = work
        self.jobs: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.error: BaseException | None = None
        self.failed = False
        self.thread = threading.Thread(target=self._loop, name="fcnseg-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not _STOP:
            if not self.failed:
                try:
                    self.work(job)
                except BaseException as err:  # noqa: BLE001 (given back to the caller's thread)
                    self.error, self.failed = err, True

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, job: object) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        """Waits for the submitted jobs, then raises the first exception of ``work``, if any."""
        self.jobs.put(_STOP)
        self.thread.join()
        self._raise()


_STOP = object()

