"""`fcnseg train`: train an FCN on VOC2012, CamVid or a folder of images and masks."""
from __future__ import annotations

import argparse
import os

from fcnseg.cli.options import (
    DefaultsHelpFormatter,
    add_training_flag,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    size,
)
from fcnseg.training.config import CHOICES, TrainConfig

_DEFAULTS = TrainConfig()
_Group = argparse.ArgumentParser | argparse._ArgumentGroup


def _default(name: str) -> str:
    """"(default: X)" with the default recipe's value of field ``name``, spelt as the option takes it.

    The training options themselves default to None (so that resolve_config can tell what was given),
    so the help names the effective default here, in the form `DefaultsHelpFormatter` gives others."""
    value = getattr(_DEFAULTS, name)
    if name == "crop":
        value = "x".join(map(str, value))
    elif isinstance(value, tuple):
        value = " ".join(map(str, value))
    return f"(default: {value})"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an FCN",
        description="Train an FCN. Option precedence: built-in defaults (the recommended recipe) < --recipe < "
        "--config FILE < options given here. The resolved config is saved as RUN_DIR/config.yaml "
        "(--print-config shows it without training); checkpoints go to RUN_DIR/last.pt and RUN_DIR/best.pt. "
        "Under torchrun the same command trains with DDP.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_config_options(p)
    p.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="torch, or jax: the optimiser steps in JAX/Flax (pip install 'fcnseg[jax]'; docs/JAX.md)")
    p.set_defaults(func=run_train)


def add_config_options(p: argparse.ArgumentParser, *, run_dir: bool = True) -> None:
    """Adds the options that make a TrainConfig; `fcnseg tune` reuses them with ``run_dir=False``
    (it owns --out, --resume and --overwrite). Every option defaults to None here so that
    resolve_config can tell what was given; the help shows the default recipe's value."""
    _add_data_options(p.add_argument_group("data"))
    _add_model_options(p.add_argument_group("model"))
    _add_optimisation_options(p.add_argument_group("optimisation"))
    _add_hardware_options(p.add_argument_group("hardware"))
    _add_run_options(p.add_argument_group("run"), run_dir=run_dir)


def _add_data_options(data: _Group) -> None:
    data.add_argument("--dataset", choices=CHOICES["dataset"], help=f"dataset kind {_default('dataset')}")
    data.add_argument("--root", help="dataset root folder (VOC: the folder holding VOCdevkit/)")
    data.add_argument("--train-split", help=_default("train_split"))
    data.add_argument("--val-split", help=_default("val_split"))
    data.add_argument("--holdout", type=non_negative_float, metavar="F",
                      help="validate on a share F of the training split held out from training (runs of "
                      "consecutive images), not on --val-split: to choose recipes without looking at the split "
                      "you report (default: 0, off)")
    data.add_argument("--holdout-groups", metavar="REGEX",
                      help="hold out whole groups of images instead: the match of REGEX in each image's file name "
                      "names its group, e.g. '^[^_]+' for CamVid's video sequences, so that no held-out frame has a "
                      "neighbour in training (default: runs of consecutive images)")
    data.add_argument("--crop", type=size, metavar="HxW", help=f"random crop, both sides >= 32 {_default('crop')}")
    data.add_argument("--scale-range", type=positive_float, nargs=2, metavar=("MIN", "MAX"),
                      help=f"random scale range {_default('scale_range')}")
    data.add_argument("--no-scale", dest="scale_range", action="store_const", const="none",
                      help="no random scaling (the same as scale_range: none in a config file)")
    add_training_flag(data, "--hflip", help=f"random horizontal flip {_default('hflip')}")
    data.add_argument("--color-jitter", type=non_negative_float, metavar="S",
                      help="scale each crop's brightness, contrast and saturation by random factors in [1-S, 1+S] "
                      f"(0: off) {_default('color_jitter')}")
    data.add_argument("--hue-jitter", type=non_negative_float, metavar="H",
                      help="shift each crop's hue by a random amount in [-H, H] turns of the colour wheel, H at most "
                      f"0.5 (0: off) {_default('hue_jitter')}")
    data.add_argument("--copy-paste", metavar="CLASSES",
                      help="paste the pixels of these classes (comma-separated names, e.g. Pole) from another "
                      "training image, shifted sideways, before the random scale and crop, so that thin classes are "
                      "seen against new backgrounds (default: off)")
    data.add_argument("--copy-paste-prob", type=non_negative_float, metavar="P",
                      help=f"share of training samples that get a paste, 0 to 1 {_default('copy_paste_prob')}")
    add_training_flag(data, "--drop-small", help="drop images smaller than the crop, as the chapter does "
                      "(default: False, which pads them)")
    add_training_flag(data, "--cache-images", help="decode the training images once and keep them in memory "
                      "instead of on every epoch (CamVid's train split: 254 MB; the same augmentation); refused "
                      "if it would take more than half of the free memory (default: False)")
    data.add_argument("--workers", type=non_negative_int, help=f"DataLoader workers (default: {_DEFAULTS.workers} on "
                      "this machine: 0 with 2 cores or fewer, else half the cores, at most 4)")


def _add_model_options(model: _Group) -> None:
    from fcnseg.models import list_models

    # No argparse `choices` for --model: the registry's names are checked with the other values,
    # in the same message form whether the name comes from here or from a config file.
    model.add_argument("--model", help=f"{', '.join(list_models())} {_default('model')}")
    model.add_argument("--variant", choices=CHOICES["variant"], help=_default("variant"))
    model.add_argument("--upsampler", choices=CHOICES["upsampler"], help=_default("upsampler"))
    add_training_flag(model, "--upsampler-bias", help="a per-class bias on the last transposed convolution, as the "
                      f"chapter's nn.ConvTranspose2d (the paper's FCN has none) {_default('upsampler_bias')}")
    model.add_argument("--weights-backbone", help=f"DEFAULT (torchvision ImageNet), none, or a state-dict file "
                       f"{_default('weights_backbone')}")
    add_training_flag(model, "--freeze-backbone", help=f"train the head only {_default('freeze_backbone')}")
    model.add_argument("--cache-features", type=non_negative_int, metavar="V",
                       help="with --freeze-backbone: run the body once on V augmented views of each image and train "
                       "the head on the cached features, epoch e on view e mod V (default: 0, off)")
    model.add_argument("--feature-cache", metavar="DIR", help="keep the feature cache in memory-mapped files in DIR "
                       "(reused by later runs with the same data, views and backbone) instead of in memory")


def _add_optimisation_options(optim: _Group) -> None:
    optim.add_argument("--epochs", type=positive_int, help=_default("epochs"))
    optim.add_argument("--iterations", type=positive_int, help="optimiser steps; overrides --epochs")
    optim.add_argument("--batch-size", type=positive_int, help=f"per process {_default('batch_size')}")
    optim.add_argument("--accumulate", type=positive_int, help=f"gradient accumulation steps {_default('accumulate')}")
    optim.add_argument("--optimizer", choices=CHOICES["optimizer"], help=_default("optimizer"))
    optim.add_argument("--lr", type=positive_float, help=f"learning rate {_default('lr')}")
    optim.add_argument("--momentum", type=non_negative_float, help=f"SGD momentum {_default('momentum')}")
    optim.add_argument("--weight-decay", type=non_negative_float, help=_default("weight_decay"))
    optim.add_argument("--schedule", choices=CHOICES["schedule"], help=_default("schedule"))
    optim.add_argument("--warmup-iters", type=non_negative_int, help=f"linear warm-up steps {_default('warmup_iters')}")
    optim.add_argument("--loss-reduction", choices=CHOICES["loss_reduction"],
                       help=f"mean, or d2l (sum of per-image means) {_default('loss_reduction')}")
    optim.add_argument("--class-weights", choices=CHOICES["class_weights"], help=_default("class_weights"))
    optim.add_argument("--loss", choices=CHOICES["loss"], help="ce (cross-entropy), or for thin and rare classes: "
                       "ohem (hardest pixels), lovasz (Lovasz-softmax), ce+dice, ce+lovasz " + _default("loss"))


def _add_hardware_options(hw: _Group) -> None:
    hw.add_argument("--device", help=f"auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps {_default('device')}")
    hw.add_argument("--amp", choices=CHOICES["amp"],
                    help=f"mixed precision: bf16 on capable CPUs, fp16/bf16 on CUDA {_default('amp')}")
    add_training_flag(hw, "--channels-last", help=f"channels-last memory layout {_default('channels_last')}")


def _add_run_options(run: _Group, *, run_dir: bool) -> None:
    if run_dir:
        run.add_argument("--out", metavar="RUN_DIR", help=f"run directory {_default('out')}")
        add_training_flag(run, "--resume", help="continue from RUN_DIR/last.pt (default: False)")
        add_training_flag(run, "--overwrite", help="replace the finished or abandoned run in RUN_DIR instead of "
                          "refusing to start (default: False)")
    run.add_argument("--recipe", choices=CHOICES["recipe"],
                     help="d2l: the chapter's exact setting (PyTorch edition), printing its loss, train acc, test acc "
                     "and examples/sec; d2l-mxnet, d2l-jax: its other editions (docs/CHAPTER.md) (default: default)")
    run.add_argument("--config", dest="config_file", metavar="FILE", help="YAML file of option: value defaults")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration as YAML (as RUN_DIR/config.yaml holds it) and exit")
    run.add_argument("--checkpoint-every", type=non_negative_int, metavar="N",
                     help="also write last.pt every N steps (default: 0, at the end of each epoch only)")
    run.add_argument("--eval-every", type=positive_int, metavar="N", help=f"validate every N epochs {_default('eval_every')}")
    run.add_argument("--save-every", type=positive_int, metavar="N",
                     help=f"write last.pt every N epochs, always at the end {_default('save_every')}")
    run.add_argument("--eval-mode", choices=CHOICES["eval_mode"],
                     help=f"whole images in one pass, or sliding windows {_default('eval_mode')}")
    run.add_argument("--max-val-images", type=positive_int, metavar="N", help="validate on the first N images only")
    run.add_argument("--seed", type=int, help=_default("seed"))
    add_training_flag(run, "--progress", default=True, help="progress bars on stderr")


def explicit_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (None: not given; --no-scale: "none")."""
    from fcnseg.training.config import FIELD_NAMES

    return {k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolves defaults, --recipe, --config FILE and the options given into a TrainConfig.

    Every value is checked here, before any dataset is read (an unknown --model, --device cuda
    without CUDA, a crop below 32, a config file's "epochs: two" are usage errors, exit status 2).
    """
    from fcnseg.training.config import resolve_config

    return resolve_config(explicit_options(args), args.config_file, args.recipe,
                          require_root=not getattr(args, "print_config", False))


def check_paths(config: TrainConfig) -> None:
    """Refuses, before any work, a --root that is not a folder and a --out that is a file or unwritable."""
    from fcnseg.cli.options import check_input_folder, check_output_folder

    check_input_folder(config.root, "--root")
    check_output_folder(config.out, "--out")


def run_train(args: argparse.Namespace) -> int:
    from fcnseg.runtime import keep_freed_memory
    from fcnseg.training.trainer import train

    config = config_from_args(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    check_paths(config)
    keep_freed_memory()  # speed only: large tensors reuse freed memory instead of new pages
    if getattr(args, "backend", "torch") == "jax":
        result = _train_jax(config, progress=args.progress)
    else:
        result = train(config, progress=args.progress)
    is_rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if is_rank0 and result.final_metrics is not None and (result.out_dir / "metrics.json").exists():
        print(f"done in {result.train_seconds:.0f} s: best mIoU {result.best_miou:.4f}; "
              f"checkpoints {result.last_checkpoint}, {result.best_checkpoint}; curves {result.out_dir / 'curves.png'}")
    return 0


def _train_jax(config: TrainConfig, *, progress: bool):
    """`fcnseg.jax_backend.train.train_jax`, or a usage error naming the extra when JAX is not installed."""
    from fcnseg.errors import OptionError

    try:
        from fcnseg.jax_backend.train import train_jax
    except ModuleNotFoundError as err:
        raise OptionError(f"--backend jax needs the package {err.name!r}: pip install 'fcnseg[jax]'") from None
    return train_jax(config, progress=progress)
