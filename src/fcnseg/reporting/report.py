"""``fcnseg report``: a run folder, its checkpoint evaluated image by image, as one HTML page."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fcnseg.errors import UsageError
from fcnseg.reporting.page import ReportContent, render, thumbnails
from fcnseg.reporting.per_image import ImageResult, evaluate_images
from fcnseg.reporting.run_folder import RunFolder, read_run_folder

DEFAULT_IMAGES = 50


@dataclass
class RunReport:
    """What `write_run_report` wrote and measured.

    Attributes:
        path: the HTML file.
        checkpoint: the checkpoint evaluated.
        split: the split read.
        images: per-image results, worst first.
        metrics: the metrics of all of them together (`SegmentationMetrics`).
        confusion: their (C, C) confusion matrix.
        total_images: the number of images in the split.
    """

    path: Path
    checkpoint: Path
    split: str
    images: list[ImageResult]
    metrics: Any
    confusion: torch.Tensor
    total_images: int


def write_run_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    images: int = DEFAULT_IMAGES,
    checkpoint: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    amp: str = "auto",
    progress: bool = False,
) -> RunReport:
    """Writes the report of a training run: curves, confusion matrix, per-class IoU, images worst first.

    Args:
        run_dir: the ``--out`` folder of ``fcnseg train``.
        out: the HTML file; None for ``run_dir/report.html``.
        split: the split to evaluate; None for the run's validation split (config.yaml's ``val_split``).
        images: evaluate the first ``images`` images of the split (0: all of them); each one is shown.
        checkpoint: the checkpoint to evaluate; None for best.pt, else last.pt.
        root: the dataset's folder; None for the run's own (config.yaml's ``root``).
        device, amp: as for `Segmenter`.
        progress: a progress bar on stderr.

    Raises:
        UsageError: not a run folder, no checkpoint, dataset not found, or classes that differ.
        CheckpointError, DataError: an unreadable checkpoint, image or mask.
    """
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.models.checkpoint import load_checkpoint

    run = read_run_folder(run_dir)
    path = Path(out) if out is not None else run.path / "report.html"
    checkpoint_path = run.checkpoint(checkpoint)
    state = load_checkpoint(checkpoint_path)
    split = split or str(run.config.get("val_split") or "val")
    dataset = _dataset(run, state, split, root)
    segmenter = Segmenter.from_checkpoint(state, device=device, amp=amp)
    indices = range(len(dataset) if not images else min(images, len(dataset)))
    results, matrix = evaluate_images(segmenter, dataset, indices,
                                      thumbnails(segmenter.colors, segmenter.ignore_index), _progress(progress))
    results.sort(key=lambda r: r.sort_key)
    metrics = matrix.compute()
    content = ReportContent(
        title=run.name, facts=_facts(run, checkpoint_path, state, split, len(results), len(dataset), metrics),
        classes=segmenter.classes, colors=segmenter.colors, metrics=metrics,
        truth_pixels=matrix.matrix.sum(1).tolist(), history=run.history, confusion=matrix.matrix.cpu().numpy(),
        images=results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(content), encoding="utf-8")
    return RunReport(path, checkpoint_path, split, results, metrics, matrix.matrix.cpu(), len(dataset))


def _dataset(run: RunFolder, state: dict[str, Any], split: str, root: str | os.PathLike | None):
    """The run's dataset split, raw (no transforms), VOC's border read as the run read it."""
    from fcnseg.data import build_dataset
    from fcnseg.evaluation import border_policy

    name = str(run.config.get("dataset") or "folder")
    as_background, _ = border_policy(state, name, None)
    dataset = build_dataset(name, run.dataset_root(root), split,
                            **({"border_as_background": True} if as_background else {}))
    if list(dataset.classes) != list(state["classes"]):
        raise UsageError(f"the checkpoint predicts {len(state['classes'])} classes ({', '.join(state['classes'][:4])}"
                         f", ...) but the {name} dataset has {len(dataset.classes)} "
                         f"({', '.join(dataset.classes[:4])}, ...); give the run's data with --root")
    if len(dataset) == 0:
        raise UsageError(f"split {split!r} of {name} has no images; choose another --split")
    return dataset


def _facts(run: RunFolder, checkpoint: Path, state: dict[str, Any], split: str, evaluated: int, total: int,
           metrics: Any) -> list[tuple[str, str]]:
    config = run.config
    epoch = state.get("epoch")
    model = f"{config.get('model', state.get('model_name', '?'))} FCN-{config.get('variant', '?')}"
    facts = [("run folder", str(run.path)), ("model", model),
             ("checkpoint", f"{checkpoint.name}" + (f" (epoch {epoch})" if epoch is not None else "")),
             ("dataset", f"{config.get('dataset', '?')} at {config.get('root', '?')}, split {split}"),
             ("evaluated", f"{evaluated} of {total} images, whole-image prediction, void excluded"),
             ("mIoU", f"{metrics.miou:.4f}"), ("pixel accuracy", f"{metrics.pixel_acc:.4f}")]
    if run.final and isinstance(run.final.get("miou"), (int, float)):
        facts.append(("the run's last validation", f"mIoU {run.final['miou']:.4f}, pixel accuracy "
                                                  f"{run.final.get('pixel_acc', float('nan')):.4f}"))
    if run.history:
        facts.append(("epochs logged", str(len(run.history))))
    return facts


def _progress(enabled: bool):
    import sys

    from fcnseg.progress import progress_bar

    return lambda items: progress_bar(items, desc="report", unit="image", disable=not enabled, file=sys.stderr)
