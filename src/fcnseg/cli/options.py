"""What the subcommands share: help formatting, value types and the options every command spells alike.

One convention for every subcommand (docs/ARCHITECTURE.md): booleans are ``--flag/--no-flag``;
sizes are ``HxW``; counts are checked here, so a bad value is a usage error (exit status 2) that
names the option before any work starts. Add an option used by two commands here, not in both.
"""
from __future__ import annotations

import argparse

from fcnseg.training.config import parse_size


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where the help already names its default or
    the default is None (argparse's marker for "not given", which tells a reader nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


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
    value = non_negative_float(text)
    if value == 0:
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
