"""Which physical objects a thin class's IoU is made of, and which of them a model finds.

A diagnostic for CamVid's Pole on val, outside every recipe's choice. CamVid's val split is one
6.7-second stretch of sequence 0016E5 at 15 frames per second, so the same few poles appear in
frame after frame. This script follows each object of one class through consecutive frames of a
sequence and reports each object's share of the class's pixels in the split and, given a
checkpoint, the share of its pixels the model predicts as that class (its recall).

An object in one frame is a run of adjacent image columns holding pixels of the class: poles are
upright, so a pole is one such run. (A connected-components labelling would do the same here;
scipy is not a dependency of fcnseg, and this one-dimensional form needs only numpy.) An object
continues the previous frame's object of the same sequence whose columns it overlaps within
``--tolerance`` pixels. Linking assumes frames close in time: in val (15 fps) an object is one
pole; in train (1 fps) a pole moves far between frames, so a link there means little.

    python experiments/pole_objects.py --split val
    python experiments/pole_objects.py --split val --checkpoint runs/<run>/last.pt --scales 1 1.5 2 --flip \
        --figure docs/figures/camvid_val_poles.png
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from repo_paths import shared_data_dir

from fcnseg.data import build_dataset
from fcnseg.data.splits import group_names

SEQUENCE = "^[^_]+"  # CamVid's sequence of a file name: 0016E5 of 0016E5_08061.png (--holdout-groups)


@dataclass
class Track:
    """One object followed through frames: per frame, its columns and pixel counts."""

    frames: list[int] = field(default_factory=list)
    columns: list[tuple[int, int]] = field(default_factory=list)
    pixels: int = 0
    found: int = 0  # pixels predicted as the class

    @property
    def recall(self) -> float:
        return self.found / self.pixels if self.pixels else 0.0


def column_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of adjacent columns of the boolean ``mask`` (H, W) holding a True."""
    occupied = np.concatenate([[False], mask.any(axis=0), [False]])
    edges = np.flatnonzero(np.diff(occupied.astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def follow(masks: list[tuple[str, np.ndarray]], tolerance: int,
           predictions: list[np.ndarray] | None = None) -> list[Track]:
    """The class's objects (boolean masks, in frame order) linked through consecutive frames.

    Args:
        masks: ``(file name, boolean (H, W))`` per frame, in frame order.
        tolerance: columns an object may move between consecutive frames and stay the same object.
        predictions: boolean ``(H, W)`` per frame where the model predicts the class, or None.

    Returns:
        The tracks, the largest (in pixels) first.
    """
    tracks: list[Track] = []
    previous: list[tuple[tuple[int, int], Track]] = []
    sequences = group_names([Path(name).stem for name, _ in masks], SEQUENCE)
    for index, (_, mask) in enumerate(masks):
        if index and sequences[index] != sequences[index - 1]:
            previous = []
        current = []
        for start, stop in column_runs(mask):
            track = next((t for (a, b), t in previous if a - tolerance < stop and start < b + tolerance), None)
            if track is None or (track.frames and track.frames[-1] == index):
                track = Track()
                tracks.append(track)
            region = mask[:, start:stop]
            track.frames.append(index)
            track.columns.append((start, stop))
            track.pixels += int(region.sum())
            if predictions is not None:
                track.found += int((region & predictions[index][:, start:stop]).sum())
            current.append(((start, stop), track))
        previous = current
    return sorted(tracks, key=lambda t: -t.pixels)


def table(tracks: list[Track], names: list[str], rows: int, with_recall: bool) -> str:
    """The largest ``rows`` tracks as a Markdown table."""
    total = sum(t.pixels for t in tracks)
    head = "| object | share of the class's pixels | cumulative | frames | columns (first-last) |" + (" recall |" if with_recall else "")
    lines = [head, "|---:|---:|---:|:---|:---|" + ("---:|" if with_recall else "")]
    cumulative = 0
    for rank, track in enumerate(tracks[:rows], 1):
        cumulative += track.pixels
        first, last = names[track.frames[0]], names[track.frames[-1]]
        left = min(a for a, _ in track.columns)
        right = max(b for _, b in track.columns) - 1  # inclusive
        row = (f"| {rank} | {100 * track.pixels / total:.1f}% | {100 * cumulative / total:.1f}% | "
               f"{len(track.frames)} ({Path(first).stem} to {Path(last).stem}) | {left}-{right} |")
        lines.append(row + (f" {100 * track.recall:.1f}% |" if with_recall else ""))
    return "\n".join(lines)


def load_masks(split: str, class_name: str) -> tuple[list[str], list[np.ndarray], list[Path], list[str]]:
    """File names, boolean masks of the class, image paths and class names of a CamVid split."""
    dataset = build_dataset("camvid", shared_data_dir() / "camvid", split)
    if class_name not in dataset.classes:
        raise SystemExit(f"--class {class_name!r} is not a CamVid class; one of {', '.join(dataset.classes)}")
    class_id = dataset.classes.index(class_name)
    images = [Path(path) for path in dataset.image_paths]
    masks = [dataset.read_mask(index).numpy() == class_id for index in range(len(dataset))]
    return [p.name for p in images], masks, images, list(dataset.classes)


def predictor(args: argparse.Namespace, class_id: int) -> Callable[[Path], np.ndarray]:
    """Where the checkpoint's model predicts the class, as one image path's boolean map."""
    from fcnseg.inference.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(args.checkpoint, device="cpu", scales=tuple(args.scales), flip=args.flip)
    return lambda path: segmenter.predict(path) == class_id


def figure(path: Path, image_path: Path, mask: np.ndarray, prediction: np.ndarray) -> None:
    """The frame twice: the class's ground truth outlined in red, then the model's pixels of it in green."""
    from PIL import Image

    photo = np.asarray(Image.open(image_path).convert("RGB"))
    truth = photo.copy()
    edge = mask & ~(np.roll(mask, 1, axis=1) & np.roll(mask, -1, axis=1))
    truth[edge] = (255, 0, 0)
    found = photo.copy()
    found[prediction] = (0, 255, 0)
    gap = np.full((photo.shape[0], 8, 3), 255, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([truth, gap, found], axis=1)).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="val", help="CamVid split (default: val)")
    parser.add_argument("--class", dest="class_name", default="Pole", help="the class followed (default: Pole)")
    parser.add_argument("--tolerance", type=int, default=8, help="columns an object may move between frames")
    parser.add_argument("--rows", type=int, default=8, help="objects listed")
    parser.add_argument("--checkpoint", help="also each object's recall under this model")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test-time scales (as fcnseg predict)")
    parser.add_argument("--flip", action="store_true", help="test-time flip (as fcnseg predict)")
    parser.add_argument("--figure", type=Path, help="with --checkpoint: the frame with most of the class, as a PNG")
    args = parser.parse_args(argv)
    names, masks, images, classes = load_masks(args.split, args.class_name)
    predictions = None
    if args.checkpoint:
        predict = predictor(args, classes.index(args.class_name))
        predictions = [predict(path) for path in images]
    tracks = follow(list(zip(names, masks)), args.tolerance, predictions)
    print(f"{args.split}: {len(names)} frames, {sum(t.pixels for t in tracks)} {args.class_name} pixels "
          f"in {len(tracks)} objects")
    print(table(tracks, names, args.rows, predictions is not None))
    if predictions is not None and args.figure:
        busiest = int(np.argmax([m.sum() for m in masks]))
        figure(args.figure, images[busiest], masks[busiest], predictions[busiest])
        print(f"figure: {args.figure} ({names[busiest]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
