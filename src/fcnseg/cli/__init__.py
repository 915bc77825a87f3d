"""The `fcnseg` command line: one module per subcommand, each with `add_parser` and `run`.

This package is the only code that reads argv or picks a device; nothing imports it. Exit status:
0 on success, 2 for a usage error (what was typed is wrong), 1 for a failure at run time, 130 on
Ctrl-C, 141 when the reader of the output went away (fcnseg.errors). Errors and warnings are one
line each, without tracebacks or source paths.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from typing import Iterator, TextIO

from fcnseg import __version__
from fcnseg.errors import BROKEN_PIPE_EXIT_STATUS, INTERRUPTED_EXIT_STATUS, USAGE_EXIT_STATUS, FcnsegError

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
    "serve",
    "report",
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
    """Entry point of the `fcnseg` console script; returns the process exit status.

    An `FcnsegError` is printed as one line and exits with its `exit_status` (2 for a usage error, 1
    for a failure at run time); Ctrl-C exits 130, a closed output pipe 141; any other exception is a
    bug and keeps its traceback.
    """
    with one_line_warnings():
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if args.command is None else USAGE_EXIT_STATUS
        try:
            status = args.func(args)
        except FcnsegError as err:
            print(f"fcnseg {args.command}: error: {user_message(err)}", file=sys.stderr)
            return err.exit_status
        except KeyboardInterrupt:
            print(f"fcnseg {args.command}: interrupted", file=sys.stderr)
            return INTERRUPTED_EXIT_STATUS
        except BrokenPipeError:
            # The reader of stdout went away (`fcnseg info | head`). Stdout goes to /dev/null so that
            # the interpreter's last flush at exit does not raise again (Python's signal docs).
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return BROKEN_PIPE_EXIT_STATUS
    return int(status or 0)


def user_message(err: FcnsegError) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back from torch with the
    worker's traceback inside its message ("Caught DataError in DataLoader worker process 0 ...");
    its last line is the message fcnseg wrote."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """A warning as ``fcnseg: warning: <message>``: one line, without the source path and line that
    Python's default format shows (meaningless to someone running a command)."""
    text = " ".join(str(message).split())
    return f"fcnseg: warning: {text}\n"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    stream = file if file is not None else sys.stderr
    with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: as Python's own showwarning does
        stream.write(format_warning(message, category, filename, lineno, line))


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Shows warnings as `format_warning` does while a command runs, and restores Python's hooks after
    (so that tests and programs calling `main` keep their own warning handling)."""
    saved = warnings.showwarning, warnings.formatwarning
    warnings.showwarning, warnings.formatwarning = _show_warning, format_warning
    try:
        yield
    finally:
        warnings.showwarning, warnings.formatwarning = saved
