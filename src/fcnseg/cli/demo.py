"""`fcnseg demo`: the whole product in one command, offline, in a few minutes on a laptop CPU.

Makes the synthetic scenes dataset, trains an FCN-8s, evaluates it on whole validation images,
predicts a few of them, and writes everything under runs/demo/.
"""
from __future__ import annotations

import argparse

from fcnseg.cli.options import DefaultsHelpFormatter, add_training_flag, positive_int, size
from fcnseg.errors import OptionError
from fcnseg.training.config import TrainConfig

MIN_IMAGES = 10  # one batch of 8 training scenes; every 5th scene goes to validation


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="make synthetic data, train, evaluate and predict, in minutes",
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder")
    add_training_flag(p, "--overwrite", default=False,
                      help="replace an earlier demo's run in --out instead of refusing to start")
    p.add_argument("--epochs", type=positive_int, default=12, help="training epochs over the synthetic train split")
    p.add_argument("--images", type=positive_int, default=300,
                   help=f"synthetic images to draw, at least {MIN_IMAGES} (80%% train, 20%% val)")
    p.add_argument("--size", type=size, default="128x160", metavar="HxW",
                   help="synthetic image size, both sides >= 32 (also the training crop)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of training")
    add_training_flag(p, "--progress", default=True, help="progress bars on stderr")
    p.set_defaults(func=run)


def demo_config(args: argparse.Namespace, data_root: str) -> TrainConfig:
    """The demo's training run, resolved and checked (device, size) before any scene is drawn."""
    from fcnseg.training.config import resolve_config

    if args.images < MIN_IMAGES:
        raise OptionError(f"--images must be at least {MIN_IMAGES} (8 training scenes make one batch, every 5th "
                          f"scene is for validation), got {args.images}")
    return resolve_config({
        "dataset": "folder", "root": data_root, "model": "fcn_resnet18", "variant": "8s",
        "weights_backbone": "none", "crop": args.size, "scale_range": (0.75, 1.25), "hflip": True,
        "batch_size": 8, "epochs": args.epochs, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4,
        "schedule": "poly", "warmup_iters": 20, "device": args.device, "seed": args.seed,
        "out": args.out, "eval_every": 4, "overwrite": args.overwrite,
    })


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from fcnseg.cli.options import check_output_folder
    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.inference.segmenter import Segmenter
    from fcnseg.training.trainer import train
    from fcnseg.visualize import save_prediction_grid

    started = time.perf_counter()
    out = check_output_folder(args.out)
    config = demo_config(args, str(out / "data"))
    data_root = make_synthetic(out / "data", num_classes=6, n=args.images, size=config.crop, seed=args.seed,
                               progress=args.progress)
    print(f"synthetic scenes: {data_root}")
    result = train(config, progress=args.progress)

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
