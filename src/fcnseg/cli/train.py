"""`fcnseg train`: train an FCN on VOC2012, CamVid or a folder of images and masks."""
from __future__ import annotations

import argparse
import os

from fcnseg.training.config import CHOICES, TrainConfig, parse_size

_DEFAULTS = TrainConfig()


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an FCN",
        description="Train an FCN. Option precedence: built-in defaults (the recommended recipe) < --recipe < "
        "--config FILE < options given here. The resolved config is saved as RUN_DIR/config.yaml; "
        "checkpoints go to RUN_DIR/last.pt and RUN_DIR/best.pt. Under torchrun the same command trains with DDP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(p)
    p.set_defaults(func=run_train)


def add_config_options(p: argparse.ArgumentParser, *, run_dir: bool = True) -> None:
    """Adds the options that make a TrainConfig; `fcnseg tune` reuses them with ``run_dir=False``
    (it owns --out and --resume)."""
    d = _DEFAULTS
    # Every option defaults to None here so that resolve_config can tell what was given; the
    # help shows the effective default of the default recipe.
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=CHOICES["dataset"], help=f"dataset kind (default {d.dataset})")
    data.add_argument("--root", help="dataset root folder (VOC: the folder holding VOCdevkit/)")
    data.add_argument("--train-split", help=f"default {d.train_split}")
    data.add_argument("--val-split", help=f"default {d.val_split}")
    data.add_argument("--crop", type=parse_size, help="random crop HxW (default 320x480)")
    data.add_argument("--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"), help="random scale range (default 0.5 2.0)")
    data.add_argument("--no-scale", dest="scale_range", action="store_const", const="none", help="no random scaling")
    data.add_argument("--hflip", type=_bool, help=f"random horizontal flip (default {d.hflip})")
    data.add_argument("--color-jitter", type=float, help=f"colour jitter strength (default {d.color_jitter})")
    data.add_argument("--drop-small", type=_bool, help="drop images smaller than the crop, as the chapter does (default: pad them)")
    data.add_argument("--workers", type=int, help=f"DataLoader workers (default {d.workers} on this machine: 0 with 2 cores or fewer, else half "
                      "the cores, at most 4)")
    model = p.add_argument_group("model")
    model.add_argument("--model", help=f"fcn_resnet18, fcn_resnet34, fcn_resnet50, fcn_mobilenet_v2 (default {d.model})")
    model.add_argument("--variant", choices=CHOICES["variant"], help=f"default {d.variant}")
    model.add_argument("--upsampler", choices=CHOICES["upsampler"], help=f"default {d.upsampler}")
    model.add_argument("--weights-backbone", help="DEFAULT (torchvision ImageNet), none, or a state-dict file (default DEFAULT)")
    model.add_argument("--freeze-backbone", type=_bool, nargs="?", const=True, help="train the head only")
    model.add_argument("--cache-features", type=int, metavar="V",
                       help="with --freeze-backbone: run the body once on V augmented views of each image and train "
                       "the head on the cached features, epoch e on view e mod V (default 0: off)")
    model.add_argument("--feature-cache", metavar="DIR", help="keep the feature cache in memory-mapped files in DIR "
                       "(reused by later runs with the same data, views and backbone) instead of in memory")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    optim.add_argument("--iterations", type=int, help="optimiser steps; overrides --epochs")
    optim.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    optim.add_argument("--accumulate", type=int, help="gradient accumulation steps (default 1)")
    optim.add_argument("--optimizer", choices=CHOICES["optimizer"], help=f"default {d.optimizer}")
    optim.add_argument("--lr", type=float, help=f"default {d.lr}")
    optim.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    optim.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    optim.add_argument("--schedule", choices=CHOICES["schedule"], help=f"default {d.schedule}")
    optim.add_argument("--warmup-iters", type=int, help="linear warm-up steps (default 0)")
    optim.add_argument("--loss-reduction", choices=CHOICES["loss_reduction"], help="mean, or d2l (sum of per-image means)")
    optim.add_argument("--class-weights", choices=CHOICES["class_weights"], help="default none")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default auto)")
    hw.add_argument("--amp", choices=CHOICES["amp"], help="mixed precision (default auto: bf16 on capable CPUs, fp16/bf16 on CUDA)")
    hw.add_argument("--channels-last", type=_bool, help=f"default {d.channels_last}")
    run = p.add_argument_group("run")
    if run_dir:
        run.add_argument("--out", help=f"run directory (default {d.out})")
        run.add_argument("--resume", action="store_const", const=True, help="continue from RUN_DIR/last.pt")
    run.add_argument("--recipe", choices=CHOICES["recipe"], help="d2l: the chapter's exact setting")
    run.add_argument("--config", dest="config_file", help="YAML file of option: value defaults")
    run.add_argument("--checkpoint-every", type=int, help="also write last.pt every N steps (default: each epoch)")
    run.add_argument("--eval-every", type=int, help="validate every N epochs (default 1)")
    run.add_argument("--save-every", type=int, help="write last.pt every N epochs (default 1; always at the end)")
    run.add_argument("--eval-mode", choices=CHOICES["eval_mode"], help="whole images in one pass, or sliding windows")
    run.add_argument("--max-val-images", type=int, help="validate on the first N images only")
    run.add_argument("--seed", type=int, help=f"default {d.seed}")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def explicit_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (None: not given; --no-scale: "none")."""
    from fcnseg.training.config import FIELD_NAMES

    return {k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolves defaults, --recipe, --config FILE and the options given into a TrainConfig."""
    from fcnseg.training.config import resolve_config

    return resolve_config(explicit_options(args), args.config_file, args.recipe)


def run_train(args: argparse.Namespace) -> int:
    from fcnseg.runtime import keep_freed_memory
    from fcnseg.training.trainer import train

    config = config_from_args(args)
    keep_freed_memory()  # speed only: large tensors reuse freed memory instead of new pages
    result = train(config, progress=not args.no_progress)
    is_rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if is_rank0 and result.final_metrics is not None and (result.out_dir / "metrics.json").exists():
        print(f"done in {result.train_seconds:.0f} s: best mIoU {result.best_miou:.4f}; "
              f"checkpoints {result.last_checkpoint}, {result.best_checkpoint}; curves {result.out_dir / 'curves.png'}")
    return 0
