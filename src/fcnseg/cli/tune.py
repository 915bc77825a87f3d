"""`fcnseg tune`: a small, budgeted Optuna search over learning rate, weight decay, batch, crop, schedule."""
from __future__ import annotations

import argparse

from fcnseg.cli.train import add_config_options, config_from_args, explicit_options
from fcnseg.training.config import CHOICES, parse_size


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="search training hyper-parameters with Optuna",
        description="Search the learning rate, weight decay, batch size, crop size and schedule with Optuna's "
        "TPE sampler (seeded by --seed). Each trial is a training run into OUT/trial_NNN scored by its final "
        "val mIoU; the study is stored in OUT/study.db, so running the same command again continues it (an "
        "interrupted trial resumes from its last.pt). The best recipe is written to OUT/best.yaml, for "
        "`fcnseg train --config OUT/best.yaml`, and every trial to OUT/trials.json. The training options "
        "below set what every trial shares; a searched option given here (e.g. --lr 0.01) is fixed instead "
        "of searched. Needs Optuna: pip install 'fcnseg[tune]'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search = p.add_argument_group("search")
    search.add_argument("--trials", type=int, default=20, help="finished trials wanted in the study, earlier runs included")
    search.add_argument("--out", default="runs/tune", help="study folder: study.db, trial_NNN/, trials.json, best.yaml")
    search.add_argument("--timeout", type=float, metavar="MIN", help="start no new trial after MIN minutes")
    budget = search.add_mutually_exclusive_group()
    budget.add_argument("--iterations-per-trial", type=int, metavar="K",
                        help="each trial's budget in optimiser steps (default: --epochs/--iterations)")
    budget.add_argument("--epochs-per-trial", type=int, metavar="E",
                        help="each trial's budget in epochs: equal images seen whatever the batch size")
    search.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(1e-3, 1e-1),
                        help="log-uniform learning-rate range")
    search.add_argument("--weight-decay-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=(1e-5, 1e-3),
                        help="log-uniform weight-decay range")
    search.add_argument("--batch-sizes", type=int, nargs="+", metavar="N", default=(4, 8, 16), help="batch sizes to try")
    search.add_argument("--crops", type=parse_size, nargs="+", metavar="HxW", default=("256x352", "320x480"),
                        help="training crops to try")
    search.add_argument("--schedules", nargs="+", choices=CHOICES["schedule"], default=("poly", "cosine"),
                        help="learning-rate schedules to try")
    search.add_argument("--pruner", choices=("median", "none"), default="median",
                        help="median: stop a trial whose per-epoch val mIoU is below the median of earlier trials")
    search.add_argument("--startup-trials", type=int, default=5,
                        help="random trials before TPE models the results and before pruning starts")
    add_config_options(p, run_dir=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.training.tuning import SearchSpace, import_optuna, tune

    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune prints one line per trial itself
    base = config_from_args(args)
    crops = tuple(parse_size(c) if isinstance(c, str) else tuple(c) for c in args.crops)
    space = SearchSpace(lr=tuple(args.lr_range), weight_decay=tuple(args.weight_decay_range),
                        batch_size=tuple(args.batch_sizes), crop=crops, schedule=tuple(args.schedules))
    fixed = {k: v for k, v in explicit_options(args).items() if k in space.searched()}
    for key in fixed:
        setattr(space, key, None)
    if fixed:
        print("fixed, not searched: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    result = tune(base, args.out, trials=args.trials, space=space, timeout_minutes=args.timeout,
                  iterations_per_trial=args.iterations_per_trial, epochs_per_trial=args.epochs_per_trial,
                  pruning=args.pruner == "median", startup_trials=args.startup_trials, progress=not args.no_progress)
    print(format_trials(result.trials))
    if result.best_yaml is None:
        print(f"no trial of {result.study_path} completed; nothing written to best.yaml")
        return 1
    params = ", ".join(f"{k}={'x'.join(map(str, v)) if k == 'crop' else v}" for k, v in result.best_params.items())
    print(f"best: trial {result.best_number}, val mIoU {result.best_miou:.4f} ({params})")
    print(f"wrote {result.best_yaml} and {result.out_dir / 'trials.json'}; "
          f"train it with: fcnseg train --config {result.best_yaml} --out runs/best")
    return 0


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
