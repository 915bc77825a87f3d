"""`fcnseg tune`: a small, budgeted Optuna search over learning rate, weight decay, batch, crop, schedule."""
from __future__ import annotations

import argparse

from fcnseg.cli.options import (
    DefaultsHelpFormatter,
    add_training_flag,
    non_negative_int,
    positive_float,
    positive_int,
    size,
)
from fcnseg.cli.train import add_config_options, config_from_args, explicit_options
from fcnseg.errors import OptionError
from fcnseg.training.config import CHOICES, MIN_CROP, TrainConfig, parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search training hyper-parameters with Optuna",
        description="Search the learning rate, weight decay, batch size, crop size and schedule with Optuna's "
        "TPE sampler (seeded by --seed). Each trial is a training run into OUT/trial_NNN scored by its final "
        "val mIoU (with --holdout F: mIoU on a share F of the training split held out from training, so that the "
        "split you report never chooses the recipe; best.yaml then trains on all of it); the study is stored in OUT/study.db, so running the same command again continues it (an "
        "interrupted trial resumes from its last.pt). The best recipe is written to OUT/best.yaml, for "
        "`fcnseg train --config OUT/best.yaml`, and every trial to OUT/trials.json. The training options "
        "below set what every trial shares; a searched option given here (e.g. --lr 0.01) is fixed instead "
        "of searched. Needs Optuna: pip install 'fcnseg[tune]'.",
        formatter_class=DefaultsHelpFormatter,
    )
    search = p.add_argument_group("search")
    search.add_argument("--trials", type=positive_int, default=20, help="finished trials wanted in the study, earlier runs included")
    search.add_argument("--out", default="runs/tune", help="study folder: study.db, trial_NNN/, trials.json, best.yaml")
    add_training_flag(search, "--overwrite", dest="overwrite_study", default=False,
                      help="remove the study in --out and start a new one (without it, a study there is continued)")
    search.add_argument("--timeout", type=positive_float, metavar="MIN", help="start no new trial after MIN minutes")
    budget = search.add_mutually_exclusive_group()
    budget.add_argument("--iterations-per-trial", type=positive_int, metavar="K",
                        help="each trial's budget in optimiser steps (default: --epochs/--iterations)")
    budget.add_argument("--epochs-per-trial", type=positive_int, metavar="E",
                        help="each trial's budget in epochs: equal images seen whatever the batch size")
    search.add_argument("--lr-range", type=positive_float, nargs=2, metavar=("LOW", "HIGH"), default=(1e-3, 1e-1),
                        help="log-uniform learning-rate range (default: 0.001 0.1)")
    search.add_argument("--weight-decay-range", type=positive_float, nargs=2, metavar=("LOW", "HIGH"), default=(1e-5, 1e-3),
                        help="log-uniform weight-decay range (default: 1e-05 0.001)")
    search.add_argument("--batch-sizes", type=positive_int, nargs="+", metavar="N", default=(4, 8, 16), help="batch sizes to try (default: 4 8 16)")
    search.add_argument("--crops", type=size, nargs="+", metavar="HxW", default=("256x352", "320x480"),
                        help="training crops to try (default: 256x352 320x480)")
    search.add_argument("--schedules", nargs="+", choices=CHOICES["schedule"], default=("poly", "cosine"),
                        help="learning-rate schedules to try (default: poly cosine)")
    search.add_argument("--pruner", choices=("median", "none"), default="median",
                        help="median: stop a trial whose per-epoch val mIoU is below the median of earlier trials")
    search.add_argument("--startup-trials", type=non_negative_int, default=5,
                        help="random trials before TPE models the results and before pruning starts")
    add_config_options(p, run_dir=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.cli.options import check_input_folder, check_output_folder
    from fcnseg.training.tuning import SearchSpace, import_optuna, tune

    base = config_from_args(args)  # every option checked before Optuna or the data is touched
    crops = _checked_search_options(args)
    if args.print_config:
        print(_base_yaml(base), end="")
        return 0
    check_input_folder(base.root, "--root")
    check_output_folder(args.out, "--out")
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints one line per trial itself
    space = SearchSpace(lr=tuple(args.lr_range), weight_decay=tuple(args.weight_decay_range),
                        batch_size=tuple(args.batch_sizes), crop=crops, schedule=tuple(args.schedules))
    fixed = {k: v for k, v in explicit_options(args).items() if k in space.searched()}
    for key in fixed:
        setattr(space, key, None)
    if fixed:
        print("fixed, not searched: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    result = tune(base, args.out, trials=args.trials, space=space, timeout_minutes=args.timeout,
                  iterations_per_trial=args.iterations_per_trial, epochs_per_trial=args.epochs_per_trial,
                  pruning=args.pruner == "median", startup_trials=args.startup_trials, progress=args.progress,
                  overwrite=args.overwrite_study)
    print(format_trials(result.trials))
    if result.best_yaml is None:
        print(f"no trial of {result.study_path} completed; nothing written to best.yaml")
        return 1
    params = ", ".join(f"{k}={'x'.join(map(str, v)) if k == 'crop' else v}" for k, v in result.best_params.items())
    whole = f", whole groups of {base.holdout_groups!r}" if base.holdout_groups else ""
    scored_on = f"holdout ({base.holdout:g} of {base.train_split}{whole})" if base.holdout else "val"
    print(f"best: trial {result.best_number}, {scored_on} mIoU {result.best_miou:.4f} ({params})")
    print(f"wrote {result.best_yaml} and {result.out_dir / 'trials.json'}; "
          f"train it with: fcnseg train --config {result.best_yaml} --out runs/best")
    return 0


def _checked_search_options(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    """Refuses impossible search ranges as usage errors (exit status 2); returns the crops as pairs."""
    for option, (low, high) in (("--lr-range", args.lr_range), ("--weight-decay-range", args.weight_decay_range)):
        if not low < high:
            raise OptionError(f"{option} must be LOW HIGH with LOW < HIGH, got {low} {high}")
    crops = tuple(parse_size(c) if isinstance(c, str) else tuple(c) for c in args.crops)
    small = [f"{h}x{w}" for h, w in crops if min(h, w) < MIN_CROP]
    if small:
        raise OptionError(f"--crops must have both sides >= {MIN_CROP} (the output stride), got {', '.join(small)}")
    return crops


def _base_yaml(base: TrainConfig) -> str:
    """``--print-config``: the settings every trial starts from, as YAML, under a comment on the rest."""
    return ("# fcnseg tune: what every trial shares; each trial searches what is not fixed on the command line\n"
            + base.to_yaml())


def format_trials(records: list[dict], limit: int = 20) -> str:
    """A plain-text table of trials (the latest attempt of each run folder), best first."""
    latest: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["number"]):
        latest[r["run"]] = r
    rows = sorted(latest.values(), key=lambda r: (r["miou"] is None, -(r["miou"] or 0.0), r["number"]))
    lines = [f"{'trial':>5s} {'state':<9s} {'mIoU':>7s} {'seconds':>8s}  params"]
    for r in rows[:limit]:
        miou = f"{r['miou']:.4f}" if r["miou"] is not None else (
            f"({r['last_reported']['miou']:.3f})" if r.get("last_reported") else "-")
        seconds = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())
        number = int(r["run"].split("_")[-1])
        lines.append(f"{number:>5d} {r['state']:<9s} {miou:>7s} {seconds:>8s}  {params}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in trials.json")
    return "\n".join(lines)
