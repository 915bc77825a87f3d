"""`fcnseg predict`: label maps, colour overlays and figures for photos, with a checkpoint.

For each input image it writes ``<stem>.png`` (a palette PNG whose pixel values are the class ids,
shown in the checkpoint's colours), ``<stem>_overlay.png`` (the colours blended over the photo)
and, with ``--grid``, ``<stem>_grid.png`` (image | prediction | ground truth, with a legend). Nothing
is lost silently: inputs with the same stem (a/x.jpg, b/x.jpg) get distinct names (x, x-2), every run
lists its inputs and their outputs in ``manifest.jsonl`` (`Manifest`), and a file an earlier run wrote
for another input is replaced only with ``--overwrite``. A file
that cannot be read is reported and skipped; the exit status is 1 when any input failed. Ground-truth
masks (``--masks``) are read as training and ``fcnseg eval`` read them: a mask that cannot be read,
or that holds a colour or id outside the checkpoint's classes, fails its image the same way.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcnseg.cli import options
from fcnseg.errors import FcnsegError, OptionError

if TYPE_CHECKING:
    import numpy as np

    from fcnseg.inference.segmenter import Segmenter

OUTPUT_SUFFIXES = ("", "_overlay", "_grid")  # <name>.png, <name>_overlay.png, <name>_grid.png


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="segment images with a checkpoint", formatter_class=options.DefaultsHelpFormatter,
        description="Writes <stem>.png (class ids as a palette PNG in the checkpoint's colours), "
                    "<stem>_overlay.png and, with --grid, <stem>_grid.png for each image (inputs with the same "
                    "stem get <stem>-2... names), and OUT/manifest.jsonl: one record per input with its outputs. "
                    "Files of an earlier run are replaced only when they came from the same input, or with "
                    "--overwrite. Unreadable files are reported and skipped; the exit status is 1 when any input "
                    "failed.")
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    options.add_flag(p, "--overwrite", default=False,
                     help="replace files in --out that an earlier run wrote for other inputs (or that no "
                          "manifest.jsonl accounts for)")
    options.add_window_options(p)
    p.add_argument("--batch-size", type=options.positive_int, default=8, metavar="N",
                   help="windows per forward pass in sliding mode")
    options.add_flag(p, "--grid", default=False, help="also write <stem>_grid.png: image | prediction | ground truth")
    p.add_argument("--masks", help="ground truth for the grid (implies --grid): a folder of masks named like "
                                   "the images, or one mask file for a single input")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay, 0 to 1")
    options.add_device_option(p)
    options.add_amp_option(p)
    options.add_max_pixels_option(p)
    options.add_progress_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.progress import progress_bar
    from fcnseg.runtime import select_device

    device = select_device(args.device)
    files, failures, masks, grid = _checked_arguments(args)
    out = Path(args.out)
    names = output_names(files, grid)
    _refuse_overwriting_inputs(files, names, out)
    manifest = Manifest(out)
    _refuse_clobbering(files, names, out, manifest, overwrite=args.overwrite)

    segmenter = _load_segmenter(args, device)
    out.mkdir(parents=True, exist_ok=True)
    manifest.start(replacing={str(f.resolve()) for f in files} | {text for text, _ in failures},
                   outputs={n for ns in names.values() for n in ns})
    for text, reason in failures:
        manifest.add(text, [], None, reason)

    ok = 0
    bar = progress_bar(files, desc="predict", unit="image", disable=not args.progress or not files, file=sys.stderr)
    for path in bar:
        try:
            with options.max_pixels(args.max_pixels):
                size = _predict_one(path, out, names[path], segmenter, masks, args.alpha, bar)
        except (FcnsegError, OSError) as err:  # unreadable input or unwritable output: skip, go on
            failures.append((str(path), str(err)))
            manifest.add(str(path.resolve()), [], None, _describe(str(path), str(err)))
            bar.write(f"failed: {_describe(str(path), str(err))}", file=sys.stderr)
            continue
        manifest.add(str(path.resolve()), names[path], size, None)
        ok += 1
    bar.close()

    print(f"{ok} ok, {len(failures)} failed; outputs in {out}, listed in {manifest.path}")
    for where, reason in failures:
        print(f"  failed: {_describe(where, reason)}")
    return 1 if failures else 0


def _checked_arguments(args: argparse.Namespace) -> tuple[list[Path], list[tuple[str, str]], Path | None, bool]:
    """The inputs, the inputs that name nothing, the masks and whether grids are drawn, after every
    check of the command line that needs no model (each mistake a usage error, before any work).

    Raises:
        OptionError: a bad --alpha, checkpoint path, --out, window or stride, or --masks.
    """
    from fcnseg.inference.windows import check_window

    if not 0.0 <= args.alpha <= 1.0:
        raise OptionError(f"--alpha must be between 0 and 1, got {args.alpha}")
    options.check_input_file(args.checkpoint, "checkpoint")
    options.check_output_folder(args.out)
    if args.mode == "sliding" and args.window is not None:
        check_window(args.window, args.stride)  # with the training crop as the window: once it is known
    files, failures = collect_inputs(args.inputs)
    masks = Path(args.masks) if args.masks else None
    if masks is not None and not masks.exists():
        raise OptionError(f"--masks {masks}: no such file or folder")
    if masks is not None and masks.is_file() and len(files) > 1:
        raise OptionError(f"--masks {masks} is one file but there are {len(files)} images; give a folder of masks")
    return files, failures, masks, args.grid or masks is not None


def _load_segmenter(args: argparse.Namespace, device) -> Segmenter:
    """The checkpoint's model as a Segmenter with the command's options; the window defaults to the training crop.

    Raises:
        OptionError: the stride exceeds the window (the training crop when --window is not given).
        CheckpointError: the file is not a readable fcnseg checkpoint.
    """
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.inference.windows import DEFAULT_WINDOW, check_window
    from fcnseg.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    config = checkpoint.get("config")
    crop = config.get("crop") if isinstance(config, dict) else None
    window = args.window or (tuple(crop) if crop else DEFAULT_WINDOW)
    if args.mode == "sliding":
        check_window(window, args.stride)
    segmenter = Segmenter.from_checkpoint(checkpoint, device=device, mode=args.mode, window=window, stride=args.stride,
                                          flip=args.flip, batch_size=args.batch_size, amp=args.amp)
    del checkpoint  # the model holds its own copy of the weights
    return segmenter


def _predict_one(path: Path, out: Path, files: list[str], segmenter: Segmenter, masks: Path | None,
                 alpha: float, bar: Any) -> tuple[int, int]:
    """Writes ``files`` (`output_files`: the label map, the overlay and, when there are three, the grid)
    into ``out``; returns the image's (height, width).

    Raises:
        FcnsegError: the image or its ground-truth mask cannot be read (nothing is written then).
        OSError: an output cannot be written.
    """
    from fcnseg.data.io import to_rgb_array
    from fcnseg.visualize import overlay, save_palette_png, save_prediction_grid, save_rgb_png

    image = to_rgb_array(path)
    grid = len(files) > 2
    # Ground truth first: a mask that breaks the class list fails this input before any output.
    target = _ground_truth(path, masks, image.shape[:2], segmenter, bar) if grid else None
    pred = segmenter.predict(image)
    save_palette_png(pred, segmenter.colors, out / files[0])
    save_rgb_png(overlay(image, pred, segmenter.colors, alpha, ignore_index=segmenter.ignore_index), out / files[1])
    if grid:
        save_prediction_grid([(image, pred, target)], segmenter.classes, segmenter.colors, out / files[2],
                             ignore_index=segmenter.ignore_index)
    return int(image.shape[0]), int(image.shape[1])


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


def output_files(name: str, grid: bool) -> list[str]:
    """The files written for an input whose output name is ``name``: label map, overlay (and grid)."""
    return [f"{name}{suffix}.png" for suffix in OUTPUT_SUFFIXES[:3 if grid else 2]]


def output_names(files: list[Path], grid: bool = False) -> dict[Path, list[str]]:
    """The output files of each input (`output_files`), none shared by two inputs.

    An input keeps its stem unless one of its files would be another input's (a/x.jpg and b/x.jpg;
    x.jpg and x_overlay.jpg), in which case it gets the first free ``<stem>-2``, ``<stem>-3``...
    Names are compared case-insensitively, as macOS and Windows file systems compare them.
    """
    taken: set[str] = set()
    names: dict[Path, list[str]] = {}
    for f in files:
        name, k = f.stem, 1
        while any(candidate.casefold() in taken for candidate in output_files(name, grid=True)):
            k += 1
            name = f"{f.stem}-{k}"
        taken.update(candidate.casefold() for candidate in output_files(name, grid=True))
        names[f] = output_files(name, grid)
    return names


def _refuse_overwriting_inputs(files: list[Path], names: dict[Path, list[str]], out: Path) -> None:
    """`--out` may be the photos' own folder; an input named like an output (x.png) would be replaced."""
    inputs = {f.resolve() for f in files}
    for f in files:
        for name in names[f]:
            target = (out / name).resolve()
            if target in inputs:
                raise OptionError(f"writing {target} would overwrite an input image; choose another --out folder")


def _refuse_clobbering(files: list[Path], names: dict[Path, list[str]], out: Path, manifest: Manifest, *,
                       overwrite: bool) -> None:
    """Refuses to replace a file in ``out`` unless the earlier run's manifest says the same input wrote
    it (running the same command again), or ``overwrite`` is set.

    Raises:
        OptionError: naming the first such file and where it came from.
    """
    if overwrite:
        return
    for f in files:
        for name in names[f]:
            target = out / name
            if not (target.exists() or target.is_symlink()):
                continue
            owner = manifest.owner(name)
            if owner == str(f.resolve()):
                continue
            origin = f"written for {owner} by an earlier run" if owner else f"not listed in {manifest.path.name}"
            raise OptionError(f"{target} exists ({origin}) and would be replaced by the output of {f}; pass "
                              "--overwrite to replace it, or choose another --out folder")


class Manifest:
    """``manifest.jsonl`` in an output folder: one JSON record per input, what it became.

    A record is ``{"input", "outputs", "size", "status", "error"}``: the input's absolute path (or the
    text given, for a path or pattern that names nothing), its output files relative to the folder,
    its size ``[height, width]``, ``"ok"`` or ``"failed"`` and the reason of a failure. The file lists
    the folder's content: a run keeps the records of earlier runs for other inputs whose files it does
    not replace, and appends its own as each input finishes (a killed run leaves the records of what
    it finished). Self-contained, so that streaming and resumable prediction can build on it.
    """

    NAME = "manifest.jsonl"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / self.NAME
        self.earlier = self._read()
        self._owners = {name: r.get("input") for r in self.earlier for name in r.get("outputs") or []}

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill: the files it named are unaccounted for
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def owner(self, name: str) -> str | None:
        """The input whose output ``name`` is, according to the earlier runs; None if unlisted."""
        return self._owners.get(name)

    def start(self, replacing: set[str], outputs: set[str]) -> None:
        """Rewrites the manifest with the earlier records that this run neither repeats nor overwrites."""
        kept = [r for r in self.earlier
                if r.get("input") not in replacing and not outputs.intersection(r.get("outputs") or [])]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def add(self, source: str, outputs: list[str], size: tuple[int, int] | None, error: str | None) -> None:
        """Appends the record of one input (``error`` None: it succeeded)."""
        record = {"input": source, "outputs": outputs, "size": list(size) if size else None,
                  "status": "failed" if error else "ok", "error": error}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")


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
        bar.write(f"fcnseg: warning: ground truth not shown: {candidate} is {target.shape[0]}x{target.shape[1]} "
                  f"but {path} is {size[0]}x{size[1]}", file=sys.stderr)
        return None
    return target
