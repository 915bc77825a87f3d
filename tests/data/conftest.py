"""Fixtures for the data tests: tiny dataset trees written on the fly.

The real shared data (``voc_sample``, ``camvid_root``) comes from tests/conftest.py."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

VOC_PALETTE = [
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
    (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
    (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128),
]


def palette_png(path: Path, ids: np.ndarray, palette=VOC_PALETTE) -> Path:
    """Writes ``ids`` as a palette (mode P) PNG, the way VOC stores masks."""
    image = Image.fromarray(ids.astype(np.uint8), "P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = palette
    flat[255] = (224, 224, 192)
    image.putpalette(flat.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def write_palette_png() -> Callable[..., Path]:
    return palette_png


@pytest.fixture
def make_voc_tree() -> Callable[..., Path]:
    """Returns ``make(root, splits={"train": [...], "val": [...]}, size=(h, w), seed=0)`` writing
    ``root/VOCdevkit/VOC2012`` with random JPEG images and palette masks (ids 0-20 and 255)."""

    def make(root: Path, splits: dict[str, list[str]] | None = None, size: tuple[int, int] = (24, 32), seed: int = 0) -> Path:
        splits = splits or {"train": ["a", "b"], "val": ["c"]}
        rng = np.random.default_rng(seed)
        base = root / "VOCdevkit" / "VOC2012"
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        names = sorted({n for ids in splits.values() for n in ids})
        for name in names:
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
            ids = rng.integers(0, 21, size)
            ids[0, :] = 255  # a void border row, as real VOC masks have around objects
            palette_png(base / "SegmentationClass" / f"{name}.png", ids)
        for split, ids in splits.items():
            (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        if "trainval" not in splits:
            (base / "ImageSets" / "Segmentation" / "trainval.txt").write_text("".join(f"{i}\n" for i in names))
        return base

    return make
