"""What the subcommands share: help formatting, value types and the options every command spells alike.

One convention for every subcommand (docs/ARCHITECTURE.md): booleans are ``--flag/--no-flag``;
sizes are ``HxW``; counts are checked here, so a bad value is a usage error (exit status 2) that
names the option before any work starts. Add an option used by two commands here, not in both.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Iterator

from fcnseg.errors import OptionError
from fcnseg.training.config import parse_size


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where the help already names its default or
    the default is None (argparse's marker for "not given", which tells a reader nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, FlagAction):  # "--hflip, --no-hflip": the older value spelling goes unmentioned
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return "" if isinstance(action, FlagAction) else super()._format_args(action, default_metavar)


def size(text: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) as an argparse type."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(kind: type, minimum: float, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


positive_int = _number(int, 1, "a whole number >= 1")
non_negative_int = _number(int, 0, "a whole number >= 0")
non_negative_float = _number(float, 0.0, "a number >= 0")


def positive_float(text: str) -> float:
    """A number > 0 (a learning rate, a tolerance), as an argparse type."""
    try:
        value = non_negative_float(text)
    except argparse.ArgumentTypeError:
        value = 0.0  # a negative number: the message below names the real bound, > 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *,
             help: str, default: bool | None = None, dest: str | None = None) -> None:  # noqa: A002
    """A boolean option as ``--name/--no-name`` (argparse's BooleanOptionalAction).

    Args:
        name: the positive spelling, e.g. "--hflip".
        default: None where "not given" must stay distinguishable (training options, which a
            recipe or a config file may set).
    """
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help,
                        **({"dest": dest} if dest else {}))


# The options of the commands that predict (eval, predict) and the checks every command makes before
# its work starts: one spelling, one default, one message for each.

def add_device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``, "auto" by default (as in train)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")


def add_amp_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--amp``, "auto" by default (as in train and `Segmenter`), so the fast path is the default one."""
    from fcnseg.constants import AMP_CHOICES

    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                        help="mixed precision; auto: bf16 on CPUs with native bf16 (where it is faster; emulated "
                             "bf16 is several times slower, so auto stays fp32 there), fp16/bf16 on CUDA")


def add_window_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--mode``, ``--window HxW``, ``--stride HxW`` and ``--flip/--no-flip``: how an image is predicted."""
    parser.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                        help="whole: one padded pass per image; sliding: overlapping windows, logits averaged")
    parser.add_argument("--window", type=size, metavar="HxW",
                        help="sliding window (default: the checkpoint's training crop, else 320x480)")
    parser.add_argument("--stride", type=size, metavar="HxW",
                        help="sliding stride, at most the window (default: two thirds of the window)")
    add_flag(parser, "--flip", default=False, help="horizontal-flip test-time augmentation")


def add_scales_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--scales S [S ...]``: multi-scale test-time augmentation, logits averaged over the scales."""
    parser.add_argument("--scales", type=positive_float, nargs="+", default=(1.0,), metavar="S",
                        help="also predict the image resized by these factors and average the logits, e.g. "
                             "--scales 0.75 1 1.25 (with --flip, flipped at every scale) (default: 1, the image "
                             "as it is)")


def add_data_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, split: str = "val") -> None:
    """``--split``, ``--max-images`` and ``--workers``, spelt and defaulted as in every command reading a dataset."""
    parser.add_argument("--split", default=split, help="split to read (train, val, ... as the dataset defines)")
    parser.add_argument("--max-images", type=positive_int, metavar="N", help="the first N images only (default: all)")
    parser.add_argument("--workers", type=non_negative_int, default=0, metavar="N", help="DataLoader worker processes")


def add_progress_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--progress/--no-progress``: progress bars on stderr, on by default."""
    add_flag(parser, "--progress", default=True, help="progress on stderr: a bar on a terminal, plain lines in a log")


def add_max_pixels_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--max-pixels N``: raises (or lowers) the cap above which an image is refused before decoding."""
    from fcnseg.constants import MAX_IMAGE_PIXELS

    parser.add_argument("--max-pixels", type=non_negative_int, metavar="N",
                        help=f"refuse images of more than N pixels (width x height) before decoding them; 0: no cap "
                             f"(default: {MAX_IMAGE_PIXELS:,})")


@contextlib.contextmanager
def max_pixels(limit: int | None) -> Iterator[None]:
    """The pixel cap of ``--max-pixels`` while a command runs, in this process and its DataLoader
    workers (None: the default cap). The cap lives in an environment variable
    (`fcnseg.data.io.set_max_image_pixels`); it is restored after, so that a program or test calling
    `fcnseg.cli.main` keeps its own."""
    if limit is None:
        yield
        return
    from fcnseg.constants import MAX_IMAGE_PIXELS_ENV
    from fcnseg.data.io import set_max_image_pixels

    saved = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    set_max_image_pixels(limit or None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(MAX_IMAGE_PIXELS_ENV, None)
        else:
            os.environ[MAX_IMAGE_PIXELS_ENV] = saved


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an existing file, or a usage error naming ``what`` (e.g. "checkpoint")."""
    path = Path(path)
    if not path.exists():
        raise OptionError(f"{what} not found: {path}")
    if path.is_dir():
        raise OptionError(f"{what} {path} is a folder, not a file")
    return path


def check_input_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an existing folder, or a usage error naming ``what`` (e.g. "--root")."""
    path = Path(path)
    if not path.exists():
        raise OptionError(f"{what} {path}: no such folder")
    if not path.is_dir():
        raise OptionError(f"{what} {path} is a file, not a folder")
    return path


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuses, before any work, an output file that is an existing folder or that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"{option} {path} is a folder; give a file name (e.g. {path / 'out'}{path.suffix})")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{option} {path}: the file exists and is not writable")
    _check_creatable(path.absolute().parent, path, option)
    return path


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuses, before any work, an output folder that is an existing file or that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path} is a file; give a folder (a new or an existing one)")
    _check_creatable(path.absolute(), path, option)
    return path


def _check_creatable(folder: Path, given: Path, option: str) -> None:
    """The nearest existing folder at or above ``folder`` must be a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"{option} {given}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {given}: cannot write in {existing} (permission denied)")


class FlagAction(argparse.BooleanOptionalAction):
    """``--flag/--no-flag`` that also takes the older spelling with a value, ``--flag true|false`` (or
    yes/no, on/off, 1/0), so that scripts written for it keep working. `DefaultsHelpFormatter` shows
    the two flag spellings only. For commands without positional arguments (a word after the flag
    is read as its value)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: str | None = None) -> None:
        from fcnseg.training.config import parse_bool

        negative = bool(option_string and option_string.startswith("--no-"))
        if values is None:
            setattr(namespace, self.dest, not negative)
            return
        if negative:
            raise argparse.ArgumentError(self, f"takes no value, got {values!r}")
        try:
            setattr(namespace, self.dest, parse_bool(values))
        except ValueError as err:
            raise argparse.ArgumentError(self, f"expected no value, or {err}; got {values!r}") from None


def add_training_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *,
                      help: str, default: bool | None = None, dest: str | None = None) -> None:  # noqa: A002
    """`add_flag` for the training commands (train, tune, demo), whose flags also accept the older
    ``--flag true|false`` spelling (`FlagAction`); default None: a recipe or config file may set them."""
    parser.add_argument(name, action=FlagAction, default=default, help=help, **({"dest": dest} if dest else {}))
