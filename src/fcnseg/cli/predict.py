"""`fcnseg predict`: label maps, colour overlays and figures for photos, with a checkpoint.

For each input image it writes ``<stem>.png`` (a palette PNG whose pixel values are the class ids,
shown in the checkpoint's colours), ``<stem>_overlay.png`` (the colours blended over the photo)
and, with ``--grid``, ``<stem>_grid.png`` (image | prediction | ground truth, with a legend). A file
that cannot be read is reported and skipped; the exit status is 1 when any input failed. Ground-truth
masks (``--masks``) are read as training and ``fcnseg eval`` read them: a mask that cannot be read,
or that holds a colour or id outside the checkpoint's classes, fails its image the same way.
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fcnseg.errors import FcnsegError
from fcnseg.training.config import parse_size

if TYPE_CHECKING:
    import numpy as np

    from fcnseg.inference.segmenter import Segmenter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="segment images with a checkpoint",
        description="Writes <stem>.png (class ids as a palette PNG in the checkpoint's colours), "
                    "<stem>_overlay.png and, with --grid, <stem>_grid.png for each image. Unreadable files "
                    "are reported and skipped; the exit status is 1 when any input failed.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                   help="whole (default): one pass per image; sliding: overlapping windows, logits averaged")
    p.add_argument("--window", type=_size, metavar="HxW",
                   help="sliding window size; the checkpoint's training crop if not given, else 320x480")
    p.add_argument("--stride", type=_size, metavar="HxW", help="sliding stride; two thirds of the window if not given")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass in sliding mode (%(default)s)")
    p.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--grid", action="store_true", help="also write <stem>_grid.png: image | prediction | ground truth")
    p.add_argument("--masks", help="ground truth for the grid (implies --grid): a folder of masks named like "
                                   "the images, or one mask file for a single input")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay (%(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1...")
    p.add_argument("--amp", nargs="?", const="auto", default="none", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision (default none); bare --amp means auto: bf16 only on CPUs with native "
                        "bf16, where it is faster (emulated bf16 is several times slower), fp16/bf16 on GPUs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if not 0.0 <= args.alpha <= 1.0:
        raise FcnsegError(f"--alpha must be between 0 and 1, got {args.alpha}")
    if args.batch_size < 1:
        raise FcnsegError(f"--batch-size must be positive, got {args.batch_size}")
    files, failures = collect_inputs(args.inputs)
    masks = Path(args.masks) if args.masks else None
    if masks is not None and not masks.exists():
        raise FcnsegError(f"--masks {masks}: no such file or folder")
    if masks is not None and masks.is_file() and len(files) > 1:
        raise FcnsegError(f"--masks {masks} is one file but there are {len(files)} images; give a folder of masks")
    grid = args.grid or masks is not None
    out = Path(args.out)
    names = output_names(files)
    _refuse_overwriting_inputs(files, names, out, grid)

    segmenter = _load_segmenter(args)
    out.mkdir(parents=True, exist_ok=True)

    ok = 0
    bar = tqdm(files, desc="predict", unit="image", disable=args.no_progress or not files, file=sys.stderr)
    for path in bar:
        try:
            _predict_one(path, out, names[path], segmenter, masks, grid, args.alpha, bar)
        except (FcnsegError, OSError) as err:  # unreadable input or unwritable output: skip, go on
            failures.append((str(path), str(err)))
            bar.write(f"failed: {_describe(str(path), str(err))}", file=sys.stderr)
            continue
        ok += 1
    bar.close()

    print(f"{ok} ok, {len(failures)} failed; outputs in {out}")
    for where, reason in failures:
        print(f"  failed: {_describe(where, reason)}")
    return 1 if failures else 0


def _load_segmenter(args: argparse.Namespace) -> Segmenter:
    """The checkpoint's model as a Segmenter with the command's options; the window defaults to the training crop."""
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.inference.windows import DEFAULT_WINDOW
    from fcnseg.models.checkpoint import load_checkpoint
    from fcnseg.runtime import resolve_amp_dtype, select_device

    try:
        device = select_device(args.device)
    except (ValueError, RuntimeError) as err:
        raise FcnsegError(str(err)) from None
    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.get("config")
    crop = config.get("crop") if isinstance(config, dict) else None
    window = args.window or (tuple(crop) if crop else DEFAULT_WINDOW)
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, mode=args.mode, window=window, stride=args.stride,
                                          flip=args.flip, batch_size=args.batch_size,
                                          dtype=resolve_amp_dtype(args.amp, device))
    del checkpoint  # the model holds its own copy of the weights
    return segmenter


def _predict_one(path: Path, out: Path, name: str, segmenter: Segmenter, masks: Path | None, grid: bool,
                 alpha: float, bar) -> None:
    """Writes ``<name>.png``, ``<name>_overlay.png`` and, with ``grid``, ``<name>_grid.png`` into ``out``.

    Raises:
        FcnsegError: the image or its ground-truth mask cannot be read (nothing is written then).
        OSError: an output cannot be written.
    """
    from fcnseg.data.io import to_rgb_array
    from fcnseg.visualize import overlay, save_palette_png, save_prediction_grid, save_rgb_png

    image = to_rgb_array(path)
    # Ground truth first: a mask that breaks the class list fails this input before any output.
    target = _ground_truth(path, masks, image.shape[:2], segmenter, bar) if grid else None
    pred = segmenter.predict(image)
    save_palette_png(pred, segmenter.colors, out / f"{name}.png")
    save_rgb_png(overlay(image, pred, segmenter.colors, alpha, ignore_index=segmenter.ignore_index),
                 out / f"{name}_overlay.png")
    if grid:
        save_prediction_grid([(image, pred, target)], segmenter.classes, segmenter.colors,
                             out / f"{name}_grid.png", ignore_index=segmenter.ignore_index)


def _describe(where: str, reason: str) -> str:
    # Errors from fcnseg.data.io already start with the file name.
    return reason if reason.startswith(where) else f"{where}: {reason}"


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expands files, folders (their images, not recursive) and glob patterns, in order, without duplicates.

    Returns:
        The image files, and ``(input, reason)`` for inputs that name nothing.
    """
    from fcnseg.data.io import list_images

    files: list[Path] = []
    failures: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = list_images(path)
            if not found:
                failures.append((text, "folder holds no image files"))
        elif path.exists():
            found = [path]
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            found = [m for m in matches if m.is_file()]
            for folder in (m for m in matches if m.is_dir()):
                found.extend(list_images(folder))
            if not found:
                failures.append((text, "no files match this pattern"))
        else:
            failures.append((text, "no such file or folder"))
            continue
        files.extend(found)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), failures


def output_names(files: list[Path]) -> dict[Path, str]:
    """The output stem of each file: its own stem, made unique with -2, -3... when stems repeat."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for f in files:
        name, k = f.stem, 1
        while name in taken:
            k += 1
            name = f"{f.stem}-{k}"
        taken.add(name)
        names[f] = name
    return names


def _refuse_overwriting_inputs(files: list[Path], names: dict[Path, str], out: Path, grid: bool) -> None:
    # `--out` may be the photos' own folder; an input named like an output (x.png) would be replaced.
    inputs = {f.resolve() for f in files}
    suffixes = ["", "_overlay"] + (["_grid"] if grid else [])
    for f in files:
        for suffix in suffixes:
            target = (out / f"{names[f]}{suffix}.png").resolve()
            if target in inputs:
                raise FcnsegError(f"writing {target} would overwrite an input image; choose another --out folder")


def _ground_truth(path: Path, masks: Path | None, size: tuple[int, int], segmenter: Segmenter,
                  bar) -> np.ndarray | None:
    """The ground-truth mask of an image, or None (with a note) when there is none or it does not fit.

    The mask is read as training and ``fcnseg eval`` read it (`fcnseg.data.io.read_mask`, with the
    checkpoint's classes, colours and void id): a colour or id outside the class list is an error
    naming the mask, which fails this input, not a silently void region.

    Raises:
        DataError: the mask is unreadable or holds a colour or id that is no class and not void.
    """
    from fcnseg.constants import MASK_EXTENSIONS
    from fcnseg.data.io import read_mask

    if masks is None:
        return None
    if masks.is_file():
        candidate = masks
    else:
        candidates = [masks / f"{path.stem}{ext}" for ext in MASK_EXTENSIONS]
        candidate = next((c for c in candidates if c.is_file()), None)
        if candidate is None:
            return None
    target = read_mask(candidate, num_classes=segmenter.num_classes, void_id=segmenter.ignore_index,
                       colors=segmenter.colors).numpy()
    if target.shape != tuple(size):
        bar.write(f"warning: ground truth not shown: {candidate} is {target.shape[0]}x{target.shape[1]} "
                  f"but {path} is {size[0]}x{size[1]}", file=sys.stderr)
        return None
    return target


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except FcnsegError as err:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(err)) from None
