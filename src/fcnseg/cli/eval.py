"""`fcnseg eval`: the FCN paper's metrics of a checkpoint on whole images of a split.

Everything the command line can get wrong is checked before the metrics are computed (which takes
minutes on a real split): the checkpoint path, ``--out``, the device, the dataset and its root (taken
from the checkpoint's training config when not given), the sliding window and stride.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fcnseg.cli import options
from fcnseg.errors import OptionError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint on whole images", formatter_class=options.DefaultsHelpFormatter,
        description="Computes pixel accuracy, mean accuracy, mean IoU and frequency-weighted IoU (void pixels "
                    "excluded) of a checkpoint on a dataset split; writes them as JSON with a confusion-matrix PNG. "
                    "Without --dataset and --root, the dataset the checkpoint was trained on is used.")
    p.add_argument("checkpoint", metavar="CKPT|MODEL_DIR",
                   help="a checkpoint written by fcnseg train, or a model folder (fcnseg export --format hf)")
    p.add_argument("--dataset", choices=("voc2012", "camvid", "folder"),
                   help="dataset kind (default: the one in the checkpoint's training config)")
    p.add_argument("--root", help="dataset root folder (default: the one in the checkpoint's training config)")
    options.add_data_options(p, split="val")
    p.add_argument("--holdout", type=options.positive_float, metavar="F",
                   help="only the images `fcnseg train --holdout F` held out of --split (pass --split train): "
                        "scores a run on its holdout, without reading the split it is reported on")
    p.add_argument("--holdout-groups", metavar="REGEX",
                   help="with --holdout: the groups `fcnseg train --holdout-groups REGEX` held out whole "
                        "(default: the checkpoint's training config's)")
    options.add_flag(p, "--border-as-background", help="VOC: read the void border around objects as background "
                     "(the chapter's reading) or leave it void and ignored (default: as the checkpoint's training run "
                     "read it, so a checkpoint gets the number its run reported)")
    options.add_window_options(p)
    options.add_scales_option(p)
    p.add_argument("--batch-size", type=options.positive_int, default=4, metavar="N",
                   help="images per forward pass (only equal sizes share one)")
    options.add_device_option(p)
    options.add_amp_option(p)
    options.add_max_pixels_option(p)
    options.add_progress_option(p)
    p.add_argument("--out", default="eval.json", help="JSON report; a confusion-matrix PNG is written beside it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.evaluation import evaluate_checkpoint, write_report
    from fcnseg.inference.windows import check_window
    from fcnseg.metrics import format_metrics_table
    from fcnseg.models.checkpoint import check_checkpoint_path, load_checkpoint
    from fcnseg.runtime import select_device

    checkpoint_path = check_checkpoint_path(args.checkpoint)
    out = options.check_output_file(args.out)
    options.check_output_file(out.with_suffix(".confusion.png"), "--out's confusion-matrix PNG")
    device = select_device(args.device)
    config = _training_config(load_checkpoint(checkpoint_path))
    dataset, root = _dataset_and_root(args, config)
    groups = _check_holdout(args, config)
    window = None
    if args.mode == "sliding":
        window = args.window or tuple(config.get("crop") or (320, 480))
        check_window(window, args.stride)

    with options.max_pixels(args.max_pixels):
        report = evaluate_checkpoint(checkpoint_path, dataset, root, args.split, mode=args.mode, window=window,
                                     stride=args.stride, flip=args.flip, scales=tuple(args.scales),
                                     batch_size=args.batch_size, device=device,
                                     amp=args.amp, workers=args.workers, max_images=args.max_images,
                                     progress=args.progress, border_as_background=args.border_as_background,
                                     holdout=args.holdout or 0.0, holdout_groups=groups)
    border = f"; {report.border}" if report.border else ""
    scales = f" + scales {' '.join(f'{s:g}' for s in args.scales)}" if tuple(args.scales) != (1.0,) else ""
    whole = f", whole groups of {groups!r}" if groups else ""
    held = f" held out of {args.split} ({args.holdout:g}{whole})" if args.holdout else ""
    print(f"{report.num_images} images{held}, {args.mode} mode{' + flip' if args.flip else ''}{scales}{border}")
    print(format_metrics_table(report.metrics, report.classes))
    path = write_report(report, out)
    print(f"wrote {path} and {path.with_suffix('.confusion.png')}")
    return 0


def _training_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The training config a checkpoint records (dataset, root, crop), or {} for one without."""
    config = checkpoint.get("config")
    return config if isinstance(config, dict) else {}


def _check_holdout(args: argparse.Namespace, config: dict[str, Any]) -> str:
    """Refuses a ``--holdout`` outside (0, 1), or of another split than the one the checkpoint trained on;
    returns the ``--holdout-groups`` regex to use: the one given, else the training run's (said so), else "".

    Raises:
        OptionError: naming the value and the split to pass, or --holdout-groups without --holdout.
    """
    if args.holdout is None:
        if args.holdout_groups is not None:
            raise OptionError("--holdout-groups chooses which images --holdout F holds out; give --holdout F too")
        return ""
    if not args.holdout < 1:
        raise OptionError(f"--holdout must be a fraction of the split, 0 < F < 1, got {args.holdout:g}")
    train_split = config.get("train_split", "train")
    if args.split != train_split:
        raise OptionError(f"--holdout selects images held out of the training split; pass --split {train_split} "
                          f"(got --split {args.split})")
    if args.holdout_groups is not None:
        from fcnseg.data.splits import group_pattern

        group_pattern(args.holdout_groups)
        return args.holdout_groups
    recorded = str(config.get("holdout_groups") or "")
    if recorded:
        print(f"holdout groups from the checkpoint's training config: --holdout-groups {recorded!r}")
    return recorded


def _dataset_and_root(args: argparse.Namespace, config: dict[str, Any]) -> tuple[str, Path]:
    """The dataset kind and root given, or else recorded in the checkpoint's training config (said so).

    The checkpoint's root is only used for its own dataset kind: ``--dataset camvid`` alone does not
    read a VOC folder recorded at training time.

    Raises:
        OptionError: neither given nor recorded, or the root is not a folder.
    """
    dataset = args.dataset or config.get("dataset")
    root = args.root
    if root is None and dataset == config.get("dataset"):
        root = config.get("root")
    if not dataset or not root:
        missing = " and ".join(name for name, value in (("--dataset", dataset), ("--root", root)) if not value)
        raise OptionError(f"the checkpoint records no dataset to evaluate on; pass {missing}")
    taken = [name for name, given in (("dataset", args.dataset), ("root", args.root)) if given is None]
    if taken:
        print(f"{' and '.join(taken)} from the checkpoint's training config: --dataset {dataset} --root {root}")
    where = "--root" if args.root is not None else "the checkpoint's dataset root (pass --root)"
    return dataset, options.check_input_folder(root, where)
