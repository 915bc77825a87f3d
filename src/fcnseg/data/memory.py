"""Training pairs decoded once and kept in memory, for datasets whose decoding costs more than a step's share.

CamVid's 360x480 PNG pairs take 17 ms each to decode on one core (PIL), a tenth of a training step
of 8 images on 2 cores; decoded, its 367 training pairs hold 254 MB. The same choice as
Ultralytics' ``cache="ram"``: off by default, refused when it would not fit.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fcnseg.errors import OptionError
from fcnseg.progress import progress_bar
from fcnseg.runtime import free_memory_bytes

# Share of the free memory the decoded pairs may take.
MAX_FREE_MEMORY_SHARE = 0.5
# Attributes of the wrapped dataset that describe it, not its pixels, kept on the wrapper.
_DESCRIPTIVE = ("classes", "colors", "image_paths", "mask_paths", "ignore_index")


class InMemoryPairs(Dataset):
    """The ``(image uint8 (3, H, W), mask int64 (H, W))`` pairs of ``pairs``, all decoded at construction.

    Masks are stored as uint8 when their values fit (class ids and the void 255), a quarter of the
    memory of int64, and returned as int64. Only untransformed pairs belong here: the random
    training transforms still run on every read.

    Raises:
        OptionError: the decoded pairs would take more than half of the free memory (estimated
            from the first pair before the rest are decoded).
    """

    def __init__(self, pairs: Dataset, *, progress: bool = False, option: str = "--cache-images") -> None:
        count = len(pairs)
        first = pairs[0] if count else None
        if first is not None:
            check_fits(count * (first[0].numel() * first[0].element_size() + first[1].numel()), count, option)
        self.images: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        for index in progress_bar(range(count), desc="decoding images", unit="image", disable=not progress):
            image, mask = first if index == 0 else pairs[index]
            self.images.append(image)
            self.masks.append(mask.to(torch.uint8) if mask.numel() and 0 <= mask.min() and mask.max() <= 255 else mask)
        for name in _DESCRIPTIVE:
            if hasattr(pairs, name):
                setattr(self, name, getattr(pairs, name))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.masks[index].long()


def check_fits(needed: int, count: int, option: str) -> None:
    """Refuses decoded pairs of ``needed`` bytes that would take more than half of the free memory."""
    free = free_memory_bytes()
    if free is not None and needed > MAX_FREE_MEMORY_SHARE * free:
        raise OptionError(
            f"{option}: the {count} decoded training images need about {needed / 2**30:.1f} GiB, more than half of the "
            f"{free / 2**30:.1f} GiB of free memory; train without {option} (images are then decoded on every read)"
        )
