"""`fcnseg make-synthetic`: write a procedural folder dataset to try training without downloads."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-synthetic", help="write a procedural segmentation dataset (a folder dataset)",
        description="Writes textured scenes of shapes as OUT/images, OUT/masks, OUT/classes.yaml, "
                    "OUT/train.txt and OUT/val.txt (80/20). Same arguments, same bytes.",
    )
    parser.add_argument("out", help="folder to create (empty, missing, or an earlier synthetic dataset)")
    parser.add_argument("--classes", type=int, default=5, help="number of classes including background (default 5)")
    parser.add_argument("--n", type=int, default=200, help="number of scenes (default 200)")
    parser.add_argument("--size", default="128x160", help="scene HxW (default 128x160)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.data.synthetic import make_synthetic
    from fcnseg.errors import DataError

    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise DataError(f"--size must look like 128x160 (height x width), not {args.size!r}") from None
    out = make_synthetic(args.out, num_classes=args.classes, n=args.n, size=(height, width), seed=args.seed,
                         progress=not args.no_progress)
    print(f"wrote {args.n} scenes with {args.classes} classes to {out}; train with --dataset folder --root {out}")
    return 0
