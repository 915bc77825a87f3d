"""The reading side of bulk prediction: images decoded in DataLoader workers, grouped by size.

`ImageFiles` is a map-style dataset over paths whose items never raise: an unreadable image (or its
unreadable ground-truth mask) comes back as an item with an error message, so that one bad file
fails its own input and the others go on. `group_by_size` gathers the streamed items into batches
of equal size, holding a bounded number of images at a time.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fcnseg.constants import IGNORE_INDEX, MASK_EXTENSIONS
from fcnseg.data.io import image_to_tensor, read_mask, to_rgb_array
from fcnseg.errors import FcnsegError
from fcnseg.inference.inputs import describe


@dataclass
class ImageItem:
    """One input as a worker read it.

    Attributes:
        index: the input's position in the dataset's list.
        image: uint8 ``(H, W, 3)``; None when it could not be read.
        input: the model's input, float32 ``(3, H, W)`` normalised (when the dataset normalises).
        target: the ground-truth class ids ``(H, W)`` when a mask was asked for and fits, else None.
        note: a warning to show (a mask of another size), or None.
        error: why the input failed, or None.
    """

    index: int
    image: torch.Tensor | None = None
    input: torch.Tensor | None = None
    target: np.ndarray | None = None
    note: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class MaskSource:
    """Where ground-truth masks are and how to read them: a folder of masks named like the images,
    or one mask file; the checkpoint's class count, void id and colours."""

    path: Path
    num_classes: int
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX


class ImageFiles(Dataset):
    """Images (and their masks) read in whichever process asks: a DataLoader's workers in bulk.

    Args:
        paths: the image files.
        masks: where ground-truth masks are, or None.
        mean, std: the model's normalisation; given, each item carries the model's input too, so that
            the workers do that arithmetic as well (`fcnseg.inference.Segmenter.preprocess`'s, exactly).
    """

    def __init__(self, paths: Sequence[Path], masks: MaskSource | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.paths = list(paths)
        self.masks = masks
        self.normalise = PixelNormaliser(mean, std) if mean is not None and std is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        path = self.paths[index]
        try:
            image = to_rgb_array(path)
            # Ground truth first: a mask that breaks the class list fails this input before any output.
            target, note = ground_truth(path, self.masks, image.shape[:2])
        except (FcnsegError, OSError) as err:
            return ImageItem(index, error=describe(str(path), str(err)))
        model_input = self.normalise(image) if self.normalise is not None else None
        return ImageItem(index, torch.from_numpy(image), model_input, target, note)


class PixelNormaliser:
    """uint8 ``(H, W, 3)`` photos as the model's input, float32 ``(3, H, W)``, equal bit for bit to
    `fcnseg.inference.Segmenter.preprocess` (``(x / 255 - mean) / std``): each channel's 256 results
    are computed once with that arithmetic and looked up per pixel, one ``np.take`` per channel
    instead of four passes over float tensors (half the time on a 360x480 photo; bulk prediction
    decodes beside the model on the same cores).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        std_t = torch.tensor([float(s) for s in std]).view(3, 1, 1)
        values = image_to_tensor(torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256))
        self.table = ((values - mean_t) / std_t)[:, 0].contiguous().numpy()

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        out = np.empty((3, *image.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self.table[channel], image[:, :, channel], out=out[channel])
        return torch.from_numpy(out)


def ground_truth(path: Path, masks: MaskSource | None, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The ground-truth mask of an image, or None (with a note when it does not fit).

    The mask is read as training and ``fcnseg eval`` read it (`fcnseg.data.io.read_mask`, with the
    checkpoint's classes, colours and void id): a colour or id outside the class list is an error
    naming the mask, which fails this input, not a silently void region.

    Raises:
        DataError: the mask is unreadable or holds a colour or id that is no class and not void.
    """
    if masks is None:
        return None, None
    if masks.path.is_file():
        candidate = masks.path
    else:
        candidates = [masks.path / f"{path.stem}{ext}" for ext in MASK_EXTENSIONS]
        candidate = next((c for c in candidates if c.is_file()), None)
        if candidate is None:
            return None, None
    target = read_mask(candidate, num_classes=masks.num_classes, void_id=masks.ignore_index,
                       colors=[list(c) for c in masks.colors]).numpy()
    if target.shape != tuple(size):
        return None, (f"fcnseg: warning: ground truth not shown: {candidate} is {target.shape[0]}x{target.shape[1]} "
                      f"but {path} is {size[0]}x{size[1]}")
    return target, None


def as_is(item: ImageItem) -> ImageItem:
    """The DataLoader's collate function: items pass unchanged (batches are formed by size later)."""
    return item


def image_loader(dataset: ImageFiles, *, workers: int, per_pass: int) -> Iterable[ImageItem]:
    """Streams the dataset's items in order, decoded by ``workers`` processes.

    Each worker keeps enough images ready for a forward pass of ``per_pass`` images between them.
    With no workers the images are read by a thread of this process, ``2 * per_pass`` ahead (decoding
    releases the GIL), so that reading overlaps the forward passes instead of leaving cores idle.
    """
    if not workers:
        return read_ahead(dataset, depth=2 * per_pass)
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=as_is,
                      prefetch_factor=max(2, -(-per_pass // workers) + 1))


def read_ahead(dataset: ImageFiles, depth: int) -> Iterator[ImageItem]:
    """The dataset's items in order, read by a background thread at most ``depth`` items ahead.

    The thread stops when the caller stops iterating (a failure, an interrupt); an unexpected error
    in it is raised in the caller.
    """
    items: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item: ImageItem | BaseException) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for index in range(len(dataset)):
                if not put(dataset[index]):
                    return
        except BaseException as err:  # noqa: BLE001 (raised again in the caller)
            put(err)

    thread = threading.Thread(target=read, name="fcnseg-reader", daemon=True)
    thread.start()
    try:
        for _ in range(len(dataset)):
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def group_by_size(items: Iterable[ImageItem], per_pass: int, max_held: int | None = None) -> Iterator[list[ImageItem]]:
    """Batches of up to ``per_pass`` items of one image size, as items stream in; failed items alone.

    Only equal sizes share a forward pass: padding would change the logits near a border. At most
    ``max_held`` images (default four passes' worth) wait at a time: beyond it the fullest group
    goes as it is, so that a folder of many sizes never holds more than a few batches in memory.
    """
    limit = max_held if max_held is not None else 4 * per_pass
    groups: dict[tuple[int, int], list[ImageItem]] = {}
    held = 0
    for item in items:
        if item.image is None:
            yield [item]
            continue
        key = (int(item.image.shape[0]), int(item.image.shape[1]))
        group = groups.setdefault(key, [])
        group.append(item)
        held += 1
        if len(group) >= per_pass:
            held -= len(group)
            yield groups.pop(key)
        elif held > limit:
            fullest = max(groups, key=lambda k: len(groups[k]))
            held -= len(groups[fullest])
            yield groups.pop(fullest)
    yield from groups.values()
