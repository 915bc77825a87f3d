"""Split list files: one entry per line, shared by the VOC, CamVid and folder readers."""
from __future__ import annotations

import os
from pathlib import Path

from fcnseg.errors import DataError


def read_split_file(path: str | os.PathLike) -> list[str]:
    """Returns the non-blank lines of a split file, stripped; lines starting with ``#`` are comments.

    Raises:
        DataError: the file is missing, unreadable, or lists nothing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {err}") from None
    lines = [line.strip() for line in text.splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    if not entries:
        raise DataError(f"split file {path} is empty")
    return entries


def holdout_split(count: int, fraction: float, chunks: int = 4) -> tuple[list[int], list[int]]:
    """Indices ``(kept, held_out)`` of a split with ``fraction`` of its items held out for validation.

    The held-out items are ``chunks`` runs of consecutive items spread evenly over the split, not a
    random sample: datasets list their files in name order, and neighbouring video frames (CamVid's
    sequences) are near-copies of each other, so a random sample would validate on frames whose
    neighbours were trained on. Runs keep that leak to their ends. The split is the same for every
    seed, so every trial of a search is scored on the same images.

    Args:
        count: items in the split.
        fraction: share held out, ``0 < fraction < 1``; at least one item is held out and one kept.
        chunks: runs of consecutive items (fewer when there are not enough items).

    Raises:
        DataError: fewer than two items, or a fraction out of range.
    """
    if not 0 < fraction < 1:
        raise DataError(f"holdout must be a fraction between 0 and 1, got {fraction}")
    if count < 2:
        raise DataError(f"a holdout needs at least 2 training images, the split has {count}")
    held = min(count - 1, max(1, round(count * fraction)))
    chunks = max(1, min(chunks, held))
    sizes = [held // chunks + (1 if i < held % chunks else 0) for i in range(chunks)]
    gap = (count - held) / chunks  # kept items between runs, spread evenly
    held_out: list[int] = []
    for i, size in enumerate(sizes):
        start = round(gap * (i + 0.5)) + sum(sizes[:i])
        held_out.extend(range(start, start + size))
    held_set = set(held_out)
    return [i for i in range(count) if i not in held_set], held_out
