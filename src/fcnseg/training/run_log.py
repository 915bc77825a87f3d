"""What a run writes besides checkpoints: config.yaml, TensorBoard, metrics.jsonl, plots, metrics.json, printed lines.

Only rank 0 of a distributed run keeps a `RunLog`; the other ranks write nothing.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import yaml

from fcnseg.metrics import format_metrics_table
from fcnseg.training.config import TrainConfig

VAL_KEYS = ("val_loss", "pixel_acc", "miou", "fwiou", "mean_acc")
CHAPTER_KEYS = ("train_acc", "test_acc", "examples_per_sec")  # the d2l recipes' metrics (d2l_metrics.py)


class RunLog:
    """The output folder's logs of one run (one session of it when resumed)."""

    def __init__(self, out: Path, config: TrainConfig, global_step: int, cleanup: contextlib.ExitStack) -> None:
        """Creates ``out``, writes config.yaml and opens TensorBoard.

        Args:
            out: the run's folder.
            config: saved as config.yaml.
            global_step: the step the run resumes from; TensorBoard drops events logged after it by
                the interrupted session, so curves have no doubled stretch.
            cleanup: closes the TensorBoard writer even when the run stops early (divergence, a pruned
                tuning trial): a tuning process runs many trials and must not leak writer threads.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_plain_dict(), sort_keys=False))
        self.writer = cleanup.enter_context(SummaryWriter(str(out / "tensorboard"), purge_step=global_step or None))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        """The loss and learning rate of one optimiser step."""
        self.writer.add_scalar("train/loss", loss, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def validation(self, epoch: int, train_loss: float, val_loss: float, metrics: Any) -> None:
        """Prints the one-line summary of an evaluation epoch."""
        print(f"epoch {epoch}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
              f"pixel acc {metrics.pixel_acc:.4f}  mIoU {metrics.miou:.4f}")

    def final_validation(self, metrics: Any, matrix: Any, classes: list[str]) -> None:
        """Prints the per-class table and plots the confusion matrix of the run's last validation."""
        from fcnseg.visualize import plot_confusion_matrix

        print(format_metrics_table(metrics, classes))
        plot_confusion_matrix(matrix.matrix.cpu().numpy(), classes, self.out / "confusion.png")

    def epoch(self, record: dict[str, Any], global_step: int) -> None:
        """Appends the epoch's record to metrics.jsonl and its metrics to TensorBoard; prints the chapter's
        line (``epoch 1: loss 0.426, train acc 0.867, test acc 0.851, 37.1 examples/sec``) when it has its metrics."""
        from fcnseg.training.d2l_metrics import format_chapter_line

        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key in VAL_KEYS:
            if key in record:
                self.writer.add_scalar(f"val/{key}", record[key], global_step)
        for key in CHAPTER_KEYS:
            if key in record:
                self.writer.add_scalar(f"d2l/{key}", record[key], global_step)
        if "examples_per_sec" in record:
            print(f"epoch {record['epoch']}: {format_chapter_line(record)}")
        self.writer.add_scalar("train/epoch_loss", record["train_loss"], global_step)

    def curves(self, history: list[dict[str, Any]]) -> None:
        """Redraws curves.png; only after validations, as plotting costs a fraction of a second."""
        from fcnseg.visualize import plot_curves

        plot_curves(history, self.out / "curves.png")

    def finish(self, final_metrics: dict[str, Any] | None) -> None:
        """Closes TensorBoard and writes metrics.json, the run's final metrics, if it has any."""
        self.writer.close()
        if final_metrics is not None:
            (self.out / "metrics.json").write_text(json.dumps(final_metrics, indent=2))
