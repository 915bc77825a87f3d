"""The `fcnseg` command line: one module per subcommand, each with `add_parser` and `run`.

This package is the only code that reads argv or picks a device; nothing imports it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fcnseg import __version__
from fcnseg.errors import FcnsegError

# Subcommand modules, in the order `fcnseg --help` lists them. Each defines
# `add_parser(subparsers) -> None`, which sets `func=run` on its parser; heavy imports
# stay inside `run` so that `--help` is instant.
SUBCOMMANDS = [
    "demo",
    "train",
    "eval",
    "predict",
    "export",
    "download",
    "make_synthetic",
    "tune",
    "info",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="fcnseg",
        description="Semantic segmentation with Fully Convolutional Networks (FCN-32s/16s/8s).",
    )
    parser.add_argument("--version", action="version", version=f"fcnseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"fcnseg.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"fcnseg.cli.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fcnseg` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        status = args.func(args)
    except FcnsegError as err:
        print(f"fcnseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fcnseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)
