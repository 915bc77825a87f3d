"""Bulk prediction: folders and globs of any size to label maps and overlays on disk, streaming,
resumable, and shared out over the processes of a torchrun job.

`predict_files` is what ``fcnseg predict`` runs. Inputs are listed (paths only, never their pixels),
decoded in DataLoader workers, gathered into batches of equal size, predicted, and written by this
process as each batch finishes, every file under a temporary name then renamed. ``manifest.jsonl``
(`fcnseg.inference.manifest`) gets one record per input as it finishes; a rerun skips the inputs
whose record says "ok" and whose files are all there, so a killed run loses at most the images in
flight. Under torchrun each rank takes every ``world_size``-th input still to do, writes its own
outputs and manifest part, and rank 0 merges the parts at the end: every input once, one manifest.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fcnseg.constants import OVERLAY_FORMATS
from fcnseg.errors import FcnsegError, OptionError, UsageError
from fcnseg.inference.inputs import collect_inputs, describe, is_video, output_names
from fcnseg.inference.manifest import NAME as MANIFEST_NAME
from fcnseg.inference.manifest import Manifest, make_record
from fcnseg.inference.reading import ImageFiles, ImageItem, MaskSource, group_by_size, image_loader
from fcnseg.inference.writing import BackgroundWriter, BulkOptions, Predictor, predict_video_file, write_outputs
from fcnseg.ops.argmax import class_map


@dataclass
class BulkResult:
    """What a `predict_files` run did (over all ranks of a torchrun job).

    Attributes:
        ok: inputs predicted by this run.
        skipped: inputs an earlier run had finished (their outputs were kept).
        failures: ``(input, message)`` for each input that failed, the message naming the file.
        manifest: the ``manifest.jsonl`` that lists every input and its outputs.
    """

    ok: int
    skipped: int
    failures: list[tuple[str, str]]
    manifest: Path


@dataclass
class Plan:
    """The inputs of a run, their output names, and which ones are still to do."""

    out: Path
    files: list[Path]
    missing: list[tuple[str, str]]
    names: dict[Path, list[str]]
    manifest: Manifest
    todo: list[Path] = field(default_factory=list)

    def source(self, path: Path) -> str:
        return str(path.resolve())


def predict_files(
    segmenter: Predictor,
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 0,
    overwrite: bool = False,
    grid: bool = False,
    overlay: bool = True,
    overlay_format: str = "png",
    masks: str | os.PathLike | None = None,
    alpha: float = 0.5,
    frame_masks: bool = False,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> BulkResult:
    """Predicts every image and video of ``inputs`` into ``out``, resuming an interrupted run.

    For an image: ``<name>.png`` (class ids as a palette PNG), ``<name>_overlay.png`` and, with
    ``grid``, ``<name>_grid.png``; ``<name>`` is the file's stem, or ``<stem>-2``... when another
    input has the same stem. A video goes to `fcnseg.inference.video.predict_video`. Under torchrun
    (``torch.distributed`` initialised) every process calls this with the same arguments and
    predicts its share; ``out`` must then be a folder all of them see.

    Args:
        segmenter: a `Segmenter` (its mode, batch size, precision and engine apply; in whole mode
            ``batch_size`` images of equal size share a forward pass).
        inputs: image or video files, folders (their images and videos, not recursive), glob patterns.
        out: the output folder; ``manifest.jsonl`` in it lists every input and its outputs.
        workers: DataLoader processes decoding images (0: a thread of this process reads ahead).
        overwrite: redo every input, and replace files earlier runs wrote for other inputs (without
            it such a file is refused with `OptionError`, and finished inputs are skipped).
        grid: also write image | prediction | ground truth figures.
        overlay: write the colour overlays (False: label maps only, the cheapest run).
        overlay_format: "png" (lossless) or "jpg" (``<name>_overlay.jpg``: several times as fast to
            write, for bulk runs that must keep up with the model).
        masks: ground truth for the grids (implies ``grid``): a folder of masks named like the
            images, or one mask file.
        alpha: weight of the class colours in the overlays, 0 to 1.
        frame_masks: for videos, also write a label map per frame.
        progress: show progress on stderr.
        report: called with one line per failed input and per warning (default: printed to stderr).

    Returns:
        What the run did; inputs that failed are listed, the others went on.

    Raises:
        OptionError: a bad ``alpha`` or ``masks``, an input whose output would replace it, a file of
            another run in the way (without ``overwrite``), or an ``out`` that cannot be written.
    """
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"--alpha must be between 0 and 1, got {alpha}")
    if overlay_format not in OVERLAY_FORMATS:
        raise OptionError(f"--overlay-format must be one of {', '.join(OVERLAY_FORMATS)}, got {overlay_format!r}")
    rank, world_size = distributed_place()
    mask_source = _mask_source(segmenter, masks)
    options = BulkOptions(grid or mask_source is not None, mask_source, overlay, alpha, frame_masks, workers,
                          overlay_format)
    plan = plan_run(inputs, Path(out), grid=options.grid, overlay=overlay, overwrite=overwrite, rank=rank,
                    world_size=world_size, overlay_format=overlay_format)
    if mask_source is not None and mask_source.path.is_file() and len(plan.files) > 1:
        raise OptionError(f"--masks {mask_source.path} is one file but there are {len(plan.files)} inputs; "
                          "give a folder of masks")
    _barrier(world_size)  # every rank has read the earlier manifest before rank 0 rewrites it
    if rank == 0:
        start_run(plan)
    _barrier(world_size)
    run_share(segmenter, plan, plan.todo[rank::world_size], options, progress=progress, report=report)
    _barrier(world_size)
    if rank == 0:
        plan.manifest.finish()
    _barrier(world_size)
    return _result(plan)


def distributed_place() -> tuple[int, int]:
    """(rank, world size) of this process: from torch.distributed when initialised, else (0, 1).

    Raises:
        UsageError: launched by torchrun (WORLD_SIZE > 1) without a process group, where every
            process would predict every input.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("launched by torchrun but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group() before predict_files")
    return 0, 1


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _mask_source(segmenter: Predictor, masks: str | os.PathLike | None) -> MaskSource | None:
    if masks is None:
        return None
    path = Path(masks)
    if not path.exists():
        raise OptionError(f"--masks {path}: no such file or folder")
    return MaskSource(path, len(segmenter.classes), tuple(tuple(c) for c in segmenter.colors), segmenter.ignore_index)


def plan_run(inputs: Iterable[str | os.PathLike], out: Path, *, grid: bool, overwrite: bool, rank: int = 0,
             world_size: int = 1, overlay: bool = True, overlay_format: str = "png") -> Plan:
    """The run's inputs, outputs and work still to do, after the checks that need no model.

    Raises:
        OptionError: an output would replace an input, or a file another run wrote (or that no
            manifest lists) is in the way and ``overwrite`` is not set.
    """
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out} is a file; give a folder (a new or an existing one)")
    files, missing = collect_inputs(inputs)
    names = output_names(files, grid, overlay, overlay_format)
    plan = Plan(out, files, missing, names, Manifest(out, rank=rank, world_size=world_size))
    _refuse_overwriting_inputs(plan)
    plan.todo = [f for f in files if overwrite or not _done(plan, f)]
    if not overwrite:
        _refuse_clobbering(plan)
    return plan


def _done(plan: Plan, path: Path) -> bool:
    record = plan.manifest.latest.get(plan.source(path))
    if not plan.manifest.done(plan.source(path)):
        return False
    return is_video(path) or record["outputs"] == plan.names[path]  # asked for a grid now: not done


def _refuse_overwriting_inputs(plan: Plan) -> None:
    """`--out` may be the photos' own folder; an input named like an output (x.png) would be replaced."""
    inputs = {f.resolve() for f in plan.files}
    for f in plan.files:
        for name in plan.names[f] if not is_video(f) else ():
            target = (plan.out / name).resolve()
            if target in inputs:
                raise OptionError(f"writing {target} would overwrite an input image; choose another --out folder")


def _refuse_clobbering(plan: Plan) -> None:
    """Refuses to replace a file in ``out`` unless the manifest says the same input wrote it (or was
    writing it when a run was killed).

    Raises:
        OptionError: naming the first such file and where it came from.
    """
    for f in plan.todo:
        for name in plan.names[f] if not is_video(f) else ():
            target = plan.out / name
            if not (target.exists() or target.is_symlink()):
                continue
            owner = plan.manifest.owner(name)
            if owner == plan.source(f):
                continue
            origin = f"written for {owner} by an earlier run" if owner else f"not listed in {MANIFEST_NAME}"
            raise OptionError(f"{target} exists ({origin}) and would be replaced by the output of {f}; pass "
                              "--overwrite to replace it, or choose another --out folder")


def start_run(plan: Plan) -> None:
    """Creates the folder, removes temporary files a killed run left, and writes the manifest's
    records known at the start (rank 0 only)."""
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(f"--out {plan.out}: cannot create the folder ({err.strerror or err})") from None
    planned = {name for names in plan.names.values() for name in names} | {MANIFEST_NAME}
    for entry in os.scandir(plan.out):
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.name[1:].rsplit(".", 2)[0] in planned:
            Path(entry.path).unlink(missing_ok=True)
    todo = set(plan.todo)
    records = [make_record(plan.source(f), [] if is_video(f) else plan.names[f], None, None, status="pending")
               if f in todo else plan.manifest.latest[plan.source(f)] for f in plan.files]
    records += [make_record(text, [], None, reason) for text, reason in plan.missing]
    try:
        plan.manifest.start(records, replacing={plan.source(f) for f in plan.files} | {t for t, _ in plan.missing},
                            outputs={n for f in plan.files for n in plan.names[f]})
    except OSError as err:
        raise OptionError(f"--out {plan.out}: cannot write {MANIFEST_NAME} ({err.strerror or err})") from None


def run_share(segmenter: Predictor, plan: Plan, share: Sequence[Path], options: BulkOptions, *,
              progress: bool, report: Callable[[str], None] | None = None) -> None:
    """Predicts this process's share of the inputs, writing outputs and manifest records as each finishes."""
    from fcnseg.progress import progress_bar

    bar = progress_bar(total=len(share), desc="predict", unit="input", disable=not progress or not share,
                       file=sys.stderr)
    tell = report or (lambda line: bar.write(line, file=sys.stderr))
    images = [f for f in share if not is_video(f)]

    def finish(job: tuple[Path, ImageItem, np.ndarray | None]) -> None:  # in the writer thread
        path, item, pred = job
        if item.note:
            tell(item.note)
        error = item.error
        if error is None:
            try:
                write_outputs(segmenter, item, pred, plan.out, plan.names[path], options)
            except OSError as err:
                error = describe(str(path), f"cannot write its outputs in {plan.out} ({err.strerror or err})")
        _record(plan, path, error, None if error else tuple(item.image.shape[:2]), tell)
        bar.update()

    writer = BackgroundWriter(finish, depth=2 * segmenter.batch_size)
    try:
        for item, pred in predictions(segmenter, images, options):
            writer.submit((images[item.index], item, pred))
    finally:
        writer.close()
    for path in (f for f in share if is_video(f)):
        error, written = None, []
        try:
            written = predict_video_file(segmenter, path, plan.out, plan.names[path][0], options)
        except (FcnsegError, OSError) as err:
            error = describe(str(path), str(err))
        _record(plan, path, error, None, tell, written)
        bar.update()
    bar.close()


def _record(plan: Plan, path: Path, error: str | None, size: tuple[int, int] | None, tell: Callable[[str], None],
            outputs: list[str] | None = None) -> None:
    if error:
        tell(f"failed: {error}")
        plan.manifest.add(make_record(plan.source(path), [], None, error))
        return
    names = plan.names[path] if outputs is None else outputs
    plan.manifest.add(make_record(plan.source(path), names, size, None, folder=plan.out))


def predictions(segmenter: Predictor, paths: Sequence[Path], options: BulkOptions
                ) -> Iterator[tuple[ImageItem, np.ndarray | None]]:
    """``(item, class ids (H, W))`` for each image as its batch finishes; failed items with None."""
    if not paths:
        return
    per_pass = segmenter.batch_size if segmenter.mode == "whole" else 1  # sliding: batches of windows
    mean, std = segmenter.mean.cpu().flatten().tolist(), segmenter.std.cpu().flatten().tolist()
    loader = image_loader(ImageFiles(paths, options.masks, mean, std), workers=options.workers, per_pass=per_pass)
    for group in group_by_size(loader, per_pass):
        if group[0].image is None:
            yield group[0], None
            continue
        # Normalised in the workers as Segmenter.preprocess does it: a file predicts as segmenter.predict(path).
        batch = torch.stack([item.input for item in group]).to(segmenter.device)
        for item in group:
            item.input = None  # the writer keeps the photo for the overlay, not the model's input
        with torch.inference_mode():
            logits = segmenter.logits(batch)
            ids = class_map(logits)
            # uint8 ids when they fit: the label PNG and the overlay's look-ups take them as they are
            preds = (ids.to(torch.uint8) if logits.shape[1] <= 256 else ids).cpu().numpy()
        yield from zip(group, preds)


def _result(plan: Plan) -> BulkResult:
    manifest = Manifest(plan.out)  # the merged manifest, the same in every rank
    ok, failures = 0, []
    for f in plan.todo:
        record = manifest.latest.get(plan.source(f), {})
        if record.get("status") == "ok":
            ok += 1
        else:
            failures.append((str(f), record.get("error") or f"{f}: no record of it in {manifest.path}"))
    failures += [(text, describe(text, reason)) for text, reason in plan.missing]
    return BulkResult(ok, len(plan.files) - len(plan.todo), failures, manifest.path)
