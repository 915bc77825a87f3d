"""`fcnseg eval`: the FCN paper's metrics of a checkpoint on whole images of a split."""
from __future__ import annotations

import argparse

from fcnseg.cli.options import DefaultsHelpFormatter
from fcnseg.training.config import parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on whole images",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint written by fcnseg train")
    p.add_argument("--dataset", required=True, choices=("voc2012", "camvid", "folder"), help="dataset kind")
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--split", default="val", help="split to evaluate (train, val, ... as the dataset defines)")
    p.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                   help="whole: one padded pass per image; sliding: overlapping windows, logits averaged")
    p.add_argument("--window", type=parse_size, help="sliding window HxW (default: the training crop)")
    p.add_argument("--stride", type=parse_size, help="sliding stride HxW (default: two thirds of the window)")
    p.add_argument("--flip", action="store_true", help="horizontal-flip test-time augmentation")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (only equal sizes share one)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="none", help="mixed precision (auto: bf16 only on CPUs with native bf16)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--out", default="eval.json", help="JSON report; a confusion-matrix PNG is written beside it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.evaluation import evaluate_checkpoint, write_report
    from fcnseg.metrics import format_metrics_table
    from fcnseg.runtime import select_device

    report = evaluate_checkpoint(args.checkpoint, args.dataset, args.root, args.split, mode=args.mode,
                                 window=args.window, stride=args.stride, flip=args.flip, batch_size=args.batch_size,
                                 device=select_device(args.device), amp=args.amp, workers=args.workers,
                                 max_images=args.max_images)
    print(f"{report.num_images} images, {args.mode} mode{' + flip' if args.flip else ''}")
    print(format_metrics_table(report.metrics, report.classes))
    path = write_report(report, args.out)
    print(f"wrote {path} and {path.with_suffix('.confusion.png')}")
    return 0
