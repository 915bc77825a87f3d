"""Videos: every frame segmented, written as an overlay video and, on request, per-frame masks.

`predict_video` decodes a video with PyAV (``pip install 'fcnseg[video]'``), segments its frames in
batches with a `Segmenter`, and writes ``<name>_overlay.mp4``: the class colours blended over every
frame (`fcnseg.visualize.overlay`), as many frames as the input, at its frame rate (H.264, or MPEG-4
Part 2 where PyAV's FFmpeg has no H.264 encoder). With ``frame_masks`` it also writes
``<name>_masks/<index>.png``: one palette PNG per frame (index from 000000), the same kind of file
``fcnseg predict`` writes for a photo.

Outputs appear whole or not at all: they are written under temporary names in the output folder
and renamed when the last frame is done, so a run killed mid-video leaves no overlay or mask folder
that looks complete (only hidden ``.<name>_overlay.mp4.<pid>.tmp`` and ``.<name>_masks.<pid>.tmp``
leftovers, which the next run of the same video removes).

Notes: the overlay runs at the input's average frame rate (a variable-rate video comes out at a
constant rate with the same number of frames); the audio is not copied; H.264 in yuv420p needs even
sides, so a frame with an odd side is padded by one row or column repeating its edge.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fcnseg.data.io import image_to_tensor
from fcnseg.errors import FcnsegError, OptionError, UsageError
from fcnseg.inference.segmenter import Segmenter
from fcnseg.ops.argmax import class_map
from fcnseg.visualize import overlay, palette_image

OVERLAY_SUFFIX = "_overlay.mp4"
MASKS_SUFFIX = "_masks"
_CODECS = ("libx264", "h264", "mpeg4")  # the first that this FFmpeg build can encode
_DEFAULT_RATE = Fraction(25)  # for a stream that states no rate at all


def predict_video(
    segmenter: Segmenter,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    *,
    frame_masks: bool,
    alpha: float,
    batch_size: int,
) -> list[Path]:
    """Segments every frame of a video; writes the overlay video and, optionally, per-frame masks.

    Args:
        segmenter: the model, its colours and its prediction mode (whole or sliding).
        path: the video (any container and codec PyAV's FFmpeg decodes: mp4, mkv, avi, webm, mov...).
        out_dir: the output folder (created if missing).
        name: the outputs' base name: ``<name>_overlay.mp4`` and ``<name>_masks/``.
        frame_masks: also write one palette PNG per frame into ``<name>_masks/``.
        alpha: weight of the class colours in the overlay, 0 to 1.
        batch_size: frames per forward pass (in sliding mode, frames whose windows are batched
            together); the logits of a batch are held in memory at once.

    Returns:
        The outputs written: the overlay video, then the masks folder when ``frame_masks``.

    Raises:
        UsageError: the file does not exist, or ``alpha``/``batch_size`` are out of range.
        FcnsegError: the file is not a video PyAV can decode, has no video stream, is corrupt, or
            has no frames (the message names the file); nothing is written then.
    """
    path = Path(path)
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"alpha must be in [0, 1], got {alpha}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be positive, got {batch_size}")
    if not path.is_file():
        raise UsageError(f"video {path} does not exist; check the path")
    av = _import_av()
    out_dir = Path(out_dir)
    overlay_path, masks_path = out_dir / f"{name}{OVERLAY_SUFFIX}", out_dir / f"{name}{MASKS_SUFFIX}"
    temp_video = out_dir / f".{name}{OVERLAY_SUFFIX}.{os.getpid()}.tmp"
    temp_masks = out_dir / f".{name}{MASKS_SUFFIX}.{os.getpid()}.tmp" if frame_masks else None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out_dir, name)
        if temp_masks is not None:
            shutil.rmtree(temp_masks, ignore_errors=True)
            temp_masks.mkdir()
        count = _segment_frames(av, segmenter, path, temp_video, temp_masks, alpha, batch_size)
        if count == 0:
            raise FcnsegError(f"video {path} has no frames to segment")
        if temp_masks is not None:
            _replace_folder(temp_masks, masks_path)
        os.replace(temp_video, overlay_path)
    except (OSError, av.FFmpegError) as err:  # an unwritable or full output folder, an encoder that fails
        raise FcnsegError(f"cannot write the outputs of {path} in {out_dir}: {_reason(err)}") from None
    finally:
        with contextlib.suppress(OSError):  # nothing to remove where nothing could be written
            temp_video.unlink(missing_ok=True)
        if temp_masks is not None:
            shutil.rmtree(temp_masks, ignore_errors=True)
    return [overlay_path, masks_path] if frame_masks else [overlay_path]


def _remove_leftovers(out_dir: Path, name: str) -> None:
    """Removes the temporary outputs of this video that a killed run left (its process is gone)."""
    for suffix in (OVERLAY_SUFFIX, MASKS_SUFFIX):
        pattern = f".{glob.escape(name + suffix)}.*.tmp"
        for path in out_dir.glob(pattern):
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise OptionError("reading videos needs PyAV: pip install 'fcnseg[video]'") from None
    return av


def _segment_frames(av: Any, segmenter: Segmenter, path: Path, video_out: Path, masks_out: Path | None,
                    alpha: float, batch_size: int) -> int:
    """Decodes, segments and writes every frame; returns how many there were."""
    try:
        source = av.open(str(path))
    except av.FFmpegError as err:
        raise FcnsegError(f"cannot read video {path}: {_reason(err)}; is it a video file PyAV can decode?") from None
    with source:
        if not source.streams.video:
            raise FcnsegError(f"{path} has no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or _DEFAULT_RATE
        writer = None
        count = 0
        try:
            for frames in _batches(av, source, stream, path, batch_size):
                if writer is None:
                    writer = _Writer(av, video_out, rate, frames[0].shape[:2])
                for frame, pred in zip(frames, _predict(segmenter, frames)):
                    writer.write(overlay(frame, pred, segmenter.colors, alpha, ignore_index=segmenter.ignore_index))
                    if masks_out is not None:
                        palette_image(pred, segmenter.colors).save(masks_out / f"{count:06d}.png", format="PNG")
                    count += 1
        finally:
            if writer is not None:
                writer.close()
    return count


def _batches(av: Any, source: Any, stream: Any, path: Path, batch_size: int) -> Iterator[list[np.ndarray]]:
    """The frames as RGB arrays ``(H, W, 3)`` uint8, ``batch_size`` at a time."""
    batch: list[np.ndarray] = []
    try:
        for frame in source.decode(stream):
            batch.append(frame.to_ndarray(format="rgb24"))
            if len(batch) == batch_size:
                yield batch
                batch = []
    except av.FFmpegError as err:
        raise FcnsegError(f"video {path} is corrupt: {_reason(err)}") from None
    if batch:
        yield batch


def _predict(segmenter: Segmenter, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Class ids ``(H, W)`` of frames of equal size, in one `Segmenter.logits` call.

    Normalised as `Segmenter.preprocess` does, from the attributes bulk prediction's `Predictor`
    protocol also has (``device``, ``mean``, ``std``)."""
    image = torch.stack([(image_to_tensor(frame).to(segmenter.device) - segmenter.mean) / segmenter.std
                         for frame in frames])
    return list(class_map(segmenter.logits(image)).cpu().numpy())


class _Writer:
    """An MP4 file of RGB frames at a constant rate (H.264 yuv420p where available)."""

    def __init__(self, av: Any, path: Path, rate: Fraction, size: tuple[int, int]) -> None:
        codec = next(c for c in _CODECS if c in av.codecs_available)
        self.container = av.open(str(path), "w", format="mp4")
        self.stream = self.container.add_stream(codec, rate=rate)
        self.height, self.width = size
        # yuv420p halves the chroma planes: both sides must be even.
        self.stream.height, self.stream.width = self.height + self.height % 2, self.width + self.width % 2
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "20", "preset": "veryfast"}
        self.av = av

    def write(self, image: np.ndarray) -> None:
        pad = ((0, self.stream.height - self.height), (0, self.stream.width - self.width), (0, 0))
        frame = self.av.VideoFrame.from_ndarray(np.pad(image, pad, mode="edge"), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))  # flush the frames the encoder holds back
        finally:
            self.container.close()


def _replace_folder(new: Path, target: Path) -> None:
    """Puts a finished folder at ``target``; an older one there is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err).strip().splitlines()[0]


__all__ = ["MASKS_SUFFIX", "OVERLAY_SUFFIX", "predict_video"]
