"""`fcnseg demo`: the whole product in one command, offline, in a few minutes on a laptop CPU.

Makes the synthetic scenes dataset, trains an FCN-8s, evaluates it on whole validation images,
predicts a few of them, and writes everything under runs/demo/.
"""
from __future__ import annotations

import argparse

from fcnseg.cli.options import DefaultsHelpFormatter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="make synthetic data, train, evaluate and predict, in minutes",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=int, default=12, help="training epochs over the synthetic train split")
    p.add_argument("--images", type=int, default=300, help="synthetic images to draw (80%% train, 20%% val)")
    p.add_argument("--size", default="128x160", help="synthetic image size HxW")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.training.config import parse_size, resolve_config
    from fcnseg.training.trainer import train
    from fcnseg.visualize import save_prediction_grid

    started = time.perf_counter()
    out = Path(args.out)
    height, width = parse_size(args.size)
    data_root = make_synthetic(out / "data", num_classes=6, n=args.images, size=(height, width), seed=args.seed,
                               progress=not args.no_progress)
    print(f"synthetic scenes: {data_root}")
    config = resolve_config({
        "dataset": "folder", "root": str(data_root), "model": "fcn_resnet18", "variant": "8s",
        "weights_backbone": "none", "crop": (height, width), "scale_range": (0.75, 1.25), "hflip": True,
        "batch_size": 8, "epochs": args.epochs, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4,
        "schedule": "poly", "warmup_iters": 20, "device": args.device, "seed": args.seed,
        "out": str(out), "eval_every": 4,
    })
    result = train(config, progress=not args.no_progress)

    segmenter = Segmenter.from_checkpoint(result.last_checkpoint, device=args.device)
    from fcnseg.data import build_dataset

    val = build_dataset("folder", data_root, "val")
    rows = []
    for i in range(min(4, len(val))):
        image, target = val.read_pair(i)
        rows.append((image.permute(1, 2, 0).numpy(), segmenter.predict(image), target.numpy()))
    grid = save_prediction_grid(rows, segmenter.classes, segmenter.colors, out / "predictions.png")
    metrics = result.final_metrics or {}
    summary = {
        "val_miou": metrics.get("miou"), "val_pixel_acc": metrics.get("pixel_acc"),
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "checkpoint": str(result.last_checkpoint), "metrics": str(out / "metrics.json"),
        "curves": str(out / "curves.png"), "predictions": str(grid),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfcnseg demo finished in {summary['minutes']} min: validation mIoU {metrics.get('miou', float('nan')):.3f}, "
          f"pixel accuracy {metrics.get('pixel_acc', float('nan')):.3f}")
    for key in ("checkpoint", "metrics", "curves", "predictions"):
        print(f"  {key:12s} {summary[key]}")
    return 0
