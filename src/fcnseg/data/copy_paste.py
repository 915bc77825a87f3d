"""Copy-paste augmentation: the pixels of chosen classes from another training image, pasted onto this one.

A thin class such as CamVid's Pole is learned in the few settings the training images show it in, and
missed against others (docs/RESULTS.md, "What val's Pole measures"). Pasting the class's pixels from
one training image onto another, shifted sideways, shows them against new backgrounds (Ghiasi et
al. 2021, "Simple Copy-Paste"). The paste comes before the random scale, crop and flip, inside
the seeded transform (`fcnseg.data.samplers.SeededTransformDataset`), so a run stays repeatable and
resumes exactly. torchvision's v2 transforms work on one sample and have no pasting from another,
hence this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from fcnseg.errors import OptionError

PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Cutout:
    """The pixels of the chosen classes in one training image: where they are, their colours, their labels."""

    rows: torch.Tensor  # int16 (N,)
    cols: torch.Tensor  # int16 (N,)
    colours: torch.Tensor  # uint8 (3, N)
    labels: torch.Tensor  # uint8 (N,)


def parse_classes(text: str, classes: Sequence[str]) -> list[int]:
    """The ids of the comma-separated class names of ``--copy-paste`` (e.g. "Pole,SignSymbol").

    Raises:
        OptionError: a name that is not one of ``classes``, or no name at all.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise OptionError(f"--copy-paste {text!r}: give one or more class names, comma-separated")
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise OptionError(f"--copy-paste: {', '.join(map(repr, unknown))} is not a class of this dataset; "
                          f"its classes are {', '.join(classes)}")
    return sorted({list(classes).index(name) for name in names})


def collect_cutouts(pairs: Dataset, class_ids: Sequence[int]) -> list[Cutout]:
    """The cutout of every pair of ``pairs`` (uint8 image (3, H, W), int64 target (H, W)) that holds
    any of ``class_ids``; read once, when a run starts."""
    wanted = torch.tensor(list(class_ids), dtype=torch.int64)
    cutouts = []
    for index in range(len(pairs)):
        image, target = pairs[index]
        rows, cols = torch.nonzero(torch.isin(target, wanted), as_tuple=True)
        if len(rows):
            cutouts.append(Cutout(rows.to(torch.int16), cols.to(torch.int16), image[:, rows, cols].to(torch.uint8),
                                  target[rows, cols].to(torch.uint8)))
    return cutouts


class CopyPaste:
    """With probability ``probability``, pastes a random cutout at a random sideways shift of up to
    ``max_shift`` of the image's width, then applies ``then`` (the usual random scale, crop and flip).

    Draws from torch's global RNG, which `SeededTransformDataset` seeds per sample. The pasted pixels
    replace the image's and the target's (void included); the input tensors are not modified.
    """

    def __init__(self, cutouts: list[Cutout], probability: float, then: PairTransform, *,
                 classes: Sequence[str] = (), max_shift: float = 0.25) -> None:
        if not 0 <= probability <= 1:
            raise ValueError(f"copy-paste probability must be in [0, 1], got {probability}")
        self.cutouts = cutouts
        self.probability = probability
        self.then = then
        self.classes = list(classes)
        self.max_shift = max_shift

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cutouts and float(torch.rand(())) < self.probability:
            image, target = self.paste(image, target)
        return self.then(image, target)

    def paste(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, target)`` with one random cutout pasted, as new tensors."""
        cutout = self.cutouts[int(torch.randint(len(self.cutouts), ()))]
        height, width = target.shape
        reach = int(self.max_shift * width)
        shift = int(torch.randint(-reach, reach + 1, ()))
        rows, cols = cutout.rows.long(), cutout.cols.long() + shift
        inside = (rows < height) & (cols >= 0) & (cols < width)  # donors of another size are clipped
        rows, cols = rows[inside], cols[inside]
        image, target = image.clone(), target.clone()
        image[:, rows, cols] = cutout.colours[:, inside].to(image.dtype)
        target[rows, cols] = cutout.labels[inside].to(target.dtype)
        return image, target

    def __repr__(self) -> str:  # part of the feature cache's key (fcnseg.training.feature_cache)
        return (f"CopyPaste(classes={self.classes}, probability={self.probability}, max_shift={self.max_shift}, "
                f"cutouts={len(self.cutouts)}, then={self.then!r})")
