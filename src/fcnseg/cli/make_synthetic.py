"""`fcnseg make-synthetic`: write a procedural folder dataset to try training without downloads."""
from __future__ import annotations

import argparse

from fcnseg.cli import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-synthetic", help="write a procedural segmentation dataset (a folder dataset)",
        formatter_class=options.DefaultsHelpFormatter,
        description="Writes textured scenes of shapes as OUT/images, OUT/masks, OUT/classes.yaml, "
                    "OUT/train.txt and OUT/val.txt (80/20). Same arguments, same bytes.",
    )
    parser.add_argument("out", help="folder to create (empty, missing, or an earlier synthetic dataset)")
    parser.add_argument("--classes", type=int, default=5, help="number of classes including background (at least 2)")
    parser.add_argument("--n", type=options.positive_int, default=200, help="number of scenes")
    parser.add_argument("--size", default="128x160", help="scene HxW, at least 16x16")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    options.add_progress_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.errors import DataError, OptionError

    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise OptionError(f"--size must look like 128x160 (height x width), not {args.size!r}") from None
    options.check_output_folder(args.out, "OUT")
    try:
        out = make_synthetic(args.out, num_classes=args.classes, n=args.n, size=(height, width), seed=args.seed,
                             progress=args.progress)
    except DataError as err:  # make_synthetic checks its arguments and OUT before it writes: what was typed
        raise OptionError(str(err)) from None
    print(f"wrote {args.n} scenes with {args.classes} classes to {out}; train with --dataset folder --root {out}")
    return 0
