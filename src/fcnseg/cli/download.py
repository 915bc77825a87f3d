"""`fcnseg download`: fetch, check and extract a public dataset (PASCAL VOC2012)."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download", help="download and extract a dataset (voc2012)",
        description="Downloads VOCtrainval_11-May-2012.tar (2 GB) into ROOT, checks its MD5 and extracts "
                    "ROOT/VOCdevkit/VOC2012. An interrupted download resumes; an archive already in ROOT "
                    "(for example downloaded by hand) is checked and used.",
    )
    parser.add_argument("dataset", choices=["voc2012"], help="the dataset to fetch")
    parser.add_argument("--root", default="data", help="folder to put it in (default ./data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fcnseg.data.download import download_voc2012

    base = download_voc2012(args.root, progress=not args.no_progress)
    print(f"VOC2012 ready at {base}; use --dataset voc2012 --root {args.root}")
    return 0
