"""`fcnseg report`: one self-contained HTML file showing a training run and where its model fails.

The page holds the training curves (metrics.jsonl), the confusion matrix and per-class IoU of the
checkpoint on a split, and each evaluated image as image | prediction | ground truth with its own
IoU, worst first. Figures are embedded: the file opens anywhere, offline, and can be mailed.
"""
from __future__ import annotations

import argparse

from fcnseg.cli import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="an HTML report of a training run", formatter_class=options.DefaultsHelpFormatter,
        description="Writes one self-contained HTML file (figures embedded, nothing fetched from the network): "
                    "the run's training curves, the confusion matrix and per-class IoU of its checkpoint on a "
                    "split, and each evaluated image as image | prediction | ground truth with its own IoU, "
                    "sorted worst first.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of fcnseg train")
    p.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--split", help="split to evaluate (default: the run's validation split)")
    p.add_argument("--images", type=options.non_negative_int, default=50, metavar="N",
                   help="evaluate and show the first N images of the split; 0: all")
    p.add_argument("--checkpoint", help="checkpoint to evaluate (default: RUN_DIR/best.pt, else last.pt)")
    p.add_argument("--root", help="the dataset's folder (default: the run's, from RUN_DIR/config.yaml)")
    options.add_device_option(p)
    options.add_amp_option(p)
    options.add_max_pixels_option(p)
    options.add_progress_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fcnseg.reporting.report import write_run_report
    from fcnseg.runtime import select_device

    options.check_input_folder(args.run_dir, "run folder")
    out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    options.check_output_file(out)
    device = select_device(args.device)
    with options.max_pixels(args.max_pixels):
        report = write_run_report(args.run_dir, out, split=args.split, images=args.images,
                                  checkpoint=args.checkpoint, root=args.root, device=device, amp=args.amp,
                                  progress=args.progress)
    worst = report.images[0] if report.images else None
    print(f"{report.path}: {len(report.images)} of {report.total_images} {report.split} images, "
          f"mIoU {report.metrics.miou:.4f}, pixel accuracy {report.metrics.pixel_acc:.4f}"
          + (f"; worst: {worst.name} (mIoU {worst.metrics.miou:.4f})" if worst else ""))
    return 0
