"""`fcnseg download`: fetch, check and extract a public dataset (PASCAL VOC2012)."""
from __future__ import annotations

import argparse

from fcnseg.cli import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download", help="download and extract a dataset (voc2012)", formatter_class=options.DefaultsHelpFormatter,
        description="Downloads VOCtrainval_11-May-2012.tar (2 GB) into ROOT, checks its MD5 and extracts "
                    "ROOT/VOCdevkit/VOC2012. An interrupted download resumes; an archive already in ROOT "
                    "(for example downloaded by hand) is checked and used. A download that fails exits with "
                    "status 1 and says where to put an archive fetched by hand.",
    )
    parser.add_argument("dataset", choices=["voc2012"], help="the dataset to fetch")
    parser.add_argument("--root", default="data", help="folder to put it in")
    options.add_progress_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.data.download import download_voc2012

    options.check_output_folder(args.root, "--root")
    base = download_voc2012(args.root, progress=args.progress)
    print(f"VOC2012 ready at {base}; use --dataset voc2012 --root {args.root}")
    return 0
