"""Split list files: one entry per line, shared by the VOC, CamVid and folder readers."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from fcnseg.errors import DataError, OptionError


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


def group_pattern(pattern: str) -> re.Pattern:
    """``--holdout-groups``'s regular expression, compiled.

    Raises:
        OptionError: ``pattern`` is not a regular expression.
    """
    try:
        return re.compile(pattern)
    except re.error as err:
        raise OptionError(f"--holdout-groups {pattern!r} is not a regular expression ({err})") from None


def group_names(names: Sequence[str], pattern: str) -> list[str]:
    """The group of each item name: the first match of the regular expression ``pattern`` in it (its
    first parenthesised group, when it has one), e.g. ``^[^_]+`` names CamVid's sequences
    (``0016E5`` of ``0016E5_08061``).

    Raises:
        OptionError: ``pattern`` is not a regular expression, or a name it does not match.
    """
    regex = group_pattern(pattern)
    groups = []
    for name in names:
        match = regex.search(name)
        if match is None:
            raise OptionError(f"--holdout-groups {pattern!r} does not match the image {name!r}: every image "
                              "name must match, and the match names its group")
        groups.append(match.group(1) if regex.groups else match.group(0))
    return groups


def image_groups(dataset: object, pattern: str) -> list[str]:
    """The group of each pair of ``dataset``, named by ``pattern`` (`group_names`) in its image's file
    name without extension (the dataset's ``image_paths``).

    Raises:
        OptionError: the dataset has no ``image_paths``, or a name ``pattern`` does not match.
    """
    paths = getattr(dataset, "image_paths", None)
    if paths is None:
        raise OptionError(f"--holdout-groups needs image file names, and the dataset ({type(dataset).__name__}) "
                          "has no image_paths; give it one path per pair")
    return group_names([Path(p).stem for p in paths], pattern)


def group_holdout_split(groups: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Indices ``(kept, held_out)`` holding out whole groups: those whose items come closest to
    ``fraction`` of all (ties: fewer held out), at least one group held out and one kept.

    For video frames: a random or run-wise holdout shares its scenes with the neighbouring frames
    trained on (docs/RESULTS.md, "Copy-paste, probed on an unseen sequence"); a held-out sequence
    does not. Deterministic: the same groups for every seed.

    Raises:
        DataError: fewer than two groups, or a fraction out of range.
    """
    if not 0 < fraction < 1:
        raise DataError(f"holdout must be a fraction between 0 and 1, got {fraction}")
    order = sorted(set(groups))
    if len(order) < 2:
        raise DataError(f"a holdout of whole groups needs at least 2 groups; every image is in group {order[0]!r}"
                        if order else "a holdout needs at least 2 training images, the split has none")
    counts = Counter(groups)
    sizes = [counts[name] for name in order]
    reachable = [1]  # bit s of reachable[i]: some choice among the first i groups holds s items
    for size in sizes:
        reachable.append(reachable[-1] | (reachable[-1] << size))
    total, target = len(groups), fraction * len(groups)
    candidates = [s for s in range(1, total) if reachable[-1] >> s & 1]
    if not candidates:  # cannot happen with >= 2 non-empty groups; kept for clarity
        raise DataError("no set of whole groups leaves images on both sides of the holdout")
    held_total = min(candidates, key=lambda s: (abs(s - target), s))
    chosen, remaining = set(), held_total
    for index in range(len(order) - 1, -1, -1):  # walk back through the reachable sums
        if not reachable[index] >> remaining & 1:
            chosen.add(order[index])
            remaining -= sizes[index]
    held = [i for i, g in enumerate(groups) if g in chosen]
    kept = [i for i, g in enumerate(groups) if g not in chosen]
    return kept, held


def training_listing(drop_small: bool, crop: Sequence[int] | None) -> dict[str, Any]:
    """The dataset options with which a training run lists its training split: with ``--drop-small``,
    only the images at least as large as its crop. A holdout is taken from that list, so `fcnseg eval
    --holdout` must list the split the same way."""
    return {"drop_smaller_than": tuple(crop)} if drop_small and crop else {}
